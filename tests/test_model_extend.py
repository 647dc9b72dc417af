"""Adding a model variant is one component in one file: a norm and an attention defined
here, registered, chosen through the config, built, counted, decoded."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmforge.components import ATTENTIONS, NORMS, Attention, Norm
from lmforge.config import ConfigError, load_config
from lmforge.model.arith import count_params, flops_per_token
from lmforge.model.decode import Decoder
from lmforge.model.generate import generate
from lmforge.model.transformer import ComponentNorm, Transformer


class ScaleNorm(Norm):
    """ScaleNorm (Nguyen & Salazar 2019): g·√d·x / max(‖x‖, eps), one learned scalar g."""

    name = "scalenorm"

    def weights(self, cfg, dim: int) -> dict[str, int]:
        return {"weight": 1}

    def forward(self, x, p, eps: float):
        norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
        return p["weight"] * math.sqrt(x.size(-1)) * x / norm


@pytest.fixture
def scalenorm():
    NORMS.register(ScaleNorm)
    yield
    NORMS.unregister("scalenorm")


def scalenorm_config(*extra: str):
    cfg = load_config("quickstart", ["model.norm=scalenorm", "model.vocab_size=61", *extra])
    return cfg.model


def test_unregistered_norm_is_refused_with_the_known_names():
    with pytest.raises(ConfigError, match=r"model\.norm: 'scalenorm' is not one of 'layernorm'"):
        scalenorm_config()


def test_a_norm_defined_in_a_test_file_builds_counts_and_decodes(scalenorm):
    cfg = scalenorm_config("model.n_layers=2", "model.d_model=64", "model.context_length=32")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    norms = [m for m in model.modules() if isinstance(m, ComponentNorm)]
    assert len(norms) == 2 * cfg.n_layers + 1  # two per pre-norm block and the final one

    # The registry's count is the module's real one, and the model's total follows.
    assert NORMS["scalenorm"].params(cfg, cfg.d_model) == sum(
        p.numel() for p in norms[0].parameters()
    )
    assert count_params(cfg)["total"] == model.num_params()

    # The module against the formula in float64. fp32 rounding: the squared norm sums
    # d = 64 terms (relative error ≤ d·2⁻²⁴ worst case, halved by the square root), then
    # a division and two products of ≈ 2⁻²⁴ each: rtol 64·2⁻²⁴ bounds all of it.
    norm = norms[0]
    with torch.no_grad():
        norm.weight.fill_(0.7)
        x = torch.randn(3, 5, cfg.d_model, generator=torch.Generator().manual_seed(1))
        got = norm(x)
    x64 = x.double()
    ref = 0.7 * math.sqrt(cfg.d_model) * x64 / x64.pow(2).sum(-1, keepdim=True).sqrt()
    rtol = cfg.d_model * 2.0**-24
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())

    # Decoding applies the model's own norm modules: one-token steps give the logits of
    # the full forward (same fp32 ops on the same values, different matmul shapes).
    seq = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    assert Decoder.supports(model)
    with torch.no_grad():
        full = model(seq)
        dec = Decoder(model, 2, 12)
        steps = [dec.prefill(seq[:, :4])] + [dec.step(seq[:, t]) for t in range(4, 12)]
        ref64 = copy.deepcopy(model).double()(seq)
    got_steps = torch.stack(steps, 1)
    # Both fp32 paths as close to the float64 model as each other, within fp32 rounding
    # over the widest reduction (the head's d_model terms) of logits of size ≈ 1.
    err_full = (full[:, 3:].double() - ref64[:, 3:]).abs().max().item()
    err_dec = (got_steps.double() - ref64[:, 3:]).abs().max().item()
    assert err_dec <= max(4 * err_full, cfg.d_model * 2.0**-24)


class PlainSoftmax(Attention):
    """softmax(q·kᵀ/√D + causal mask)·v written out: the built-in's function, by formula."""

    name = "plain-softmax"

    def attend(self, q, k, v, *, causal, start, mask, scale, softcap, dropout_p):
        H, T, Tk = q.size(1), q.size(2), k.size(2)
        k, v = (t.repeat_interleave(H // t.size(1), dim=1) for t in (k, v))
        scores = q @ k.transpose(-2, -1) * (scale or q.size(-1) ** -0.5)
        if causal:  # query i sits at position start + i and sees keys up to it
            q_pos = torch.arange(start, start + T)[:, None]
            scores = scores.masked_fill(torch.arange(Tk)[None, :] > q_pos, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.fixture
def plain_softmax():
    ATTENTIONS.register(PlainSoftmax)
    yield
    ATTENTIONS.unregister("plain-softmax")


def test_an_attention_defined_in_a_test_file_computes_what_softmax_does(plain_softmax):
    shape = ["model.n_layers=2", "model.d_model=64", "model.n_kv_heads=2", "model.vocab_size=61"]
    shape += ["model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu"]
    builtin = load_config("quickstart", shape).model
    variant = load_config("quickstart", [*shape, "model.attention=plain-softmax"]).model
    assert flops_per_token(variant) == flops_per_token(builtin)
    torch.manual_seed(0)
    ours = Transformer(variant).double().eval()
    ref = Transformer(builtin).double().eval()
    ref.load_state_dict(ours.state_dict())
    seq = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # float64 on both sides: the two differ by summation order only (≈ 1e-15).
        torch.testing.assert_close(ours(seq), ref(seq), rtol=1e-10, atol=1e-10)
        # Decoding a registered variant takes the general path (the cache, start > 0).
        assert not Decoder.supports(ours)
        cached = generate(ours, seq[:, :5], 10, temperature=0)
        full = generate(ref, seq[:, :5], 10, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
