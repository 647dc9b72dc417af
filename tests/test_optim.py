"""Muon and the model options of the speed recipe, against straightforward references."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, load_config
from lmforge.export.hf import ExportError, hf_architecture
from lmforge.model.transformer import Transformer
from lmforge.train.loop import make_optimizer
from lmforge.train.optim import NS_COEFFS, Muon, muon_param_groups, orthogonalize


def small_cfg(*overrides):
    base = [
        "model.vocab_size=50",
        "model.context_length=16",
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=4",
    ]
    return load_config(None, [*base, *overrides])


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 48), (3, 40, 24)])
def test_orthogonalize_keeps_singular_vectors_and_squeezes_values(shape):
    torch.manual_seed(0)
    # Random singular vectors, singular values spread over [0.2, 1] × 3. (Much smaller
    # ones stay small after five steps: Muon only approximates the polar factor.)
    *batch, m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(*batch, m, k)).Q
    v = torch.linalg.qr(torch.randn(*batch, n, k)).Q
    s = 3 * torch.linspace(0.2, 1.0, k)
    g = u @ torch.diag_embed(s.expand(*batch, k)) @ v.mT
    o = orthogonalize(g, dtype=torch.float32)
    assert o.shape == g.shape
    for gi, oi in zip(g.reshape(-1, *shape[-2:]), o.reshape(-1, *shape[-2:]), strict=True):
        u, _, vh = torch.linalg.svd(gi, full_matrices=False)
        core = u.mT @ oi @ vh.mT  # diagonal when o shares g's singular vectors
        diag = torch.diagonal(core)
        off = core - torch.diag(diag)
        assert off.abs().max() < 1e-4
        # Five quintic steps land every singular value in about [0.68, 1.2] (Jordan et al.)
        assert diag.min() > 0.6 and diag.max() < 1.25


def reference_muon_update(grad, buf, momentum, split):
    """Nesterov momentum and Newton-Schulz for one matrix, block by block, in fp32."""
    buf = momentum * buf + grad
    g = grad + momentum * buf
    out = []
    for blk in g.split(split, dim=0) if split else [g]:
        x = blk.T if blk.shape[0] > blk.shape[1] else blk
        x = x / (x.norm() + 1e-7)
        a, b, c = NS_COEFFS
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        out.append(x.T if blk.shape[0] > blk.shape[1] else x)
    rows, cols = out[0].shape
    return torch.cat(out) * math.sqrt(max(1.0, rows / cols)), buf


def test_muon_step_matches_a_per_matrix_reference():
    cfg = small_cfg("model.mlp=swiglu", "model.n_kv_heads=2")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    groups = muon_param_groups(model, 1e-3, 0.1, 0.02, 0.9, 0.0, (0.9, 0.95), 1e-8)
    opt = Muon(groups, ns_dtype=torch.float32)
    splits = {id(p): g["split"] for g in groups if g["muon"] for p in g["params"]}
    assert len(splits) == 4 * cfg.model.n_layers  # qkv, proj, up, down per block
    before = {id(p): p.detach().clone() for p in model.parameters()}
    bufs = {id(p): torch.zeros_like(p) for p in model.parameters()}
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        expected = {}
        for p in model.parameters():
            if id(p) in splits:
                upd, bufs[id(p)] = reference_muon_update(p.grad, bufs[id(p)], 0.9, splits[id(p)])
                expected[id(p)] = before[id(p)] - 0.02 * upd
        opt.step()
        for p in model.parameters():
            if id(p) in splits:
                torch.testing.assert_close(p.detach(), expected[id(p)], atol=2e-5, rtol=1e-4)
            before[id(p)] = p.detach().clone()


def test_muon_groups_use_adamw_exactly_like_torch_for_the_rest():
    cfg = small_cfg("model.tie_embeddings=false", "model.bias=true")
    torch.manual_seed(0)
    ours = Transformer(cfg.model)
    ref = Transformer(cfg.model)
    ref.load_state_dict(ours.state_dict())
    groups = muon_param_groups(ours, 3e-3, 0.1, 0.02, 0.95, 0.0, (0.9, 0.99), 1e-8)
    opt = Muon(groups)
    names = {id(p): n for n, p in ours.named_parameters()}
    adam_names = [names[id(p)] for g in groups if not g["muon"] for p in g["params"]]
    assert "tok_emb.weight" in adam_names and "lm_head.weight" in adam_names
    assert not any(n.endswith(("qkv.weight", "up.weight")) for n in adam_names)
    ref_params = dict(ref.named_parameters())
    decay = [ref_params[n] for n in adam_names if ref_params[n].dim() >= 2]
    no_decay = [ref_params[n] for n in adam_names if ref_params[n].dim() < 2]
    ref_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.99),
        eps=1e-8,
    )
    for _ in range(4):
        for (_, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for n in adam_names:
        torch.testing.assert_close(dict(ours.named_parameters())[n], ref_params[n])


def test_muon_trains_and_the_schedule_scales_each_group(tmp_path):
    cfg = small_cfg("train.optimizer=muon", "train.lr=2e-3", "train.muon_lr=0.04")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, Muon)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == [1.0, pytest.approx(20.0)]
    x = torch.randint(0, 50, (8, 16))
    y = x.clone()  # learnable by a causal model: predict the token just read
    first = None
    for _ in range(30):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < 0.5 * first


def test_relu2_softcap_and_zero_init_match_their_definitions():
    cfg = small_cfg("model.mlp=relu2", "model.logit_softcap=5", "model.zero_init_proj=true")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights(seed=0)
    block = model.blocks[0]
    assert block.attn.proj.weight.abs().max() == 0 and block.mlp.down.weight.abs().max() == 0
    torch.nn.init.normal_(block.mlp.down.weight)
    h = torch.randn(2, 3, 32)
    expected = F.linear(F.relu(F.linear(h, block.mlp.up.weight)) ** 2, block.mlp.down.weight)
    torch.testing.assert_close(block.mlp(h), expected)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)  # large logits, so the cap matters
    idx = torch.randint(0, 50, (2, 16))
    capped = model(idx)
    model.cfg.logit_softcap = 0.0
    raw = model(idx)
    assert raw.abs().max() > 5
    torch.testing.assert_close(capped, 5 * torch.tanh(raw / 5))


def test_export_and_config_refuse_what_they_cannot_express():
    with pytest.raises(ExportError, match="logit_softcap"):
        hf_architecture(small_cfg("model.logit_softcap=30").model)
    with pytest.raises(ExportError, match="mlp=relu2"):
        hf_architecture(small_cfg("model.mlp=relu2").model)
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        small_cfg("train.optimizer=muon", "train.parallel=fsdp")
    with pytest.raises(ConfigError, match=r"train\.muon_lr"):
        small_cfg("train.optimizer=muon", "train.muon_lr=0")
