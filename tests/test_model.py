import copy

import pytest
import torch
from numerics_helpers import assert_as_accurate_as, assert_rounded_once, unit_roundoff
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge.config import ModelConfig
from lmforge.model import KVCache, Transformer, count_params, flops_per_token
from lmforge.model.generate import filter_logits, generate

VARIANTS = {
    "gpt2": dict(bias=True),
    "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=False),
    "gqa-qknorm": dict(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_heads=2, qk_norm=True),
    "mqa-dropout": dict(n_kv_heads=1, dropout=0.1),
}


def make(variant: str, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97,
        context_length=24,
        n_layers=2,
        d_model=32,
        n_heads=4,
        **{**VARIANTS[variant], **kw},
    )
    return Transformer(cfg).eval()


def float64_forward(model: Transformer, seq: torch.Tensor) -> torch.Tensor:
    """The logits of `model` in float64: the reference the fp32 paths are measured against."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(seq)


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_count_matches_model(variant):
    model = make(variant)
    groups = count_params(model.cfg)
    assert groups["total"] == model.num_params()
    assert sum(v for k, v in groups.items() if k != "total") == groups["total"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_match_flop_counter(variant):
    model = make(variant, dropout=0.0).train()
    x = torch.randint(0, 97, (2, 24))
    # The math backend decomposes attention into matmuls the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    assert counter.get_total_flops() == flops_per_token(model.cfg, 24) * x.numel()


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    model = make(variant)
    x = torch.randint(0, 97, (1, 20))
    base, ref = model(x), float64_forward(model, x)
    for t in (0, 7, 18):
        y = x.clone()
        y[0, t + 1 :] = torch.randint(0, 97, (19 - t,))
        out = model(y)
        # Positions ≤ t see the same tokens: the same function of the same inputs, equal
        # but for the summation order a kernel may pick (MKL's depends on alignment).
        assert_as_accurate_as(out[0, : t + 1], base[0, : t + 1], ref[0, : t + 1])
        assert not torch.allclose(out[0, t + 1 :], base[0, t + 1 :])


def test_masked_objective_is_bidirectional():
    model = make("gpt2", objective="masked")
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 97
    assert not torch.allclose(model(x)[0, 0], model(y)[0, 0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_equals_recompute(variant):
    model = make(variant)
    prompt = torch.randint(0, 97, (3, 5))
    cached = generate(model, prompt, 15, temperature=0, use_cache=True)
    full = generate(model, prompt, 15, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    # logits step by step, including a multi-token chunk appended to a cache
    seq = cached
    cache = KVCache.empty(model.cfg, 3, 20, torch.device("cpu"), torch.float32)
    parts = [model(seq[:, :5], cache=cache), model(seq[:, 5:9], cache=cache)]
    parts += [model(seq[:, i : i + 1], cache=cache) for i in range(9, 20)]
    assert_as_accurate_as(torch.cat(parts, dim=1), model(seq), float64_forward(model, seq))


def test_sampling_is_seeded_and_stops():
    model = make("gpt2")
    a = generate(model, [1, 2, 3], 10, temperature=1.0, top_k=10, seed=5)
    b = generate(model, [1, 2, 3], 10, temperature=1.0, top_k=10, seed=5)
    assert torch.equal(a, b)
    greedy = generate(model, [1, 2, 3], 10, temperature=0)
    stop = int(greedy[0, 5])  # the third generated token
    first = next(i for i in range(3, 13) if int(greedy[0, i]) == stop)
    out = generate(model, [1, 2, 3], 10, temperature=0, stop_ids=[stop])
    assert out.shape[1] == first + 1 and int(out[0, -1]) == stop
    assert torch.equal(out, greedy[:, : first + 1])


def test_generation_past_context_slides():
    model = make("llama")
    out = generate(model, torch.randint(0, 97, (1, 20)), 10, temperature=0)
    assert out.shape == (1, 30)


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.85))
    assert kept.tolist() == [[True, True, True, False]]


def test_context_overflow_is_an_error():
    model = make("gpt2")
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(torch.zeros(1, 25, dtype=torch.long))


def _packed_attention(x: torch.Tensor) -> torch.Tensor:
    """`PackedSmallCausalAttention` on x (B, T, 3, H, D), as the fused projection gives it."""
    from lmforge.model.transformer import PackedSmallCausalAttention

    B, T, _, H, D = x.shape
    return PackedSmallCausalAttention.apply(x.reshape(B, T, 3 * H * D), H)


def _split_attention(fn):
    """fn(q, k, v) on q, k, v sliced out of x (B, T, 3, H, D): (B, H, T, D), strided."""
    return lambda x: fn(*(t.transpose(1, 2) for t in x.unbind(2)))


@pytest.mark.parametrize("form", ["split", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_small_causal_attention_matches_float64_sdpa(dtype, form, attention_impl):
    """The CPU attention for short bf16 sequences, on q/k/v sliced out of one fused
    projection (`SmallCausalAttention`) or on the projection itself
    (`PackedSmallCausalAttention`), with the C kernel and with its torch form: outputs
    and input gradients against torch's SDPA in float64. (T = 40 is not a multiple of
    the kernel's block: its padding is exercised too.)"""
    from lmforge.model.transformer import SmallCausalAttention

    torch.manual_seed(0)
    B, T, H, D = 3, 40, 4, 16
    # Inputs rounded to the dtype first: the reference sees what the function sees.
    base = torch.randn(B, T, 3, H, D).to(dtype).double()
    grad_out = torch.randn(B, T, H, D).to(dtype).double()

    def run(fn, x):
        x = x.clone().requires_grad_()
        y = fn(x)  # (B, T, H, D)
        y.backward(grad_out.to(y.dtype))
        return y.double(), x.grad.double()

    sdpa = _split_attention(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True
        ).transpose(1, 2)
    )
    ref_y, ref_g = run(sdpa, base)
    fn = _packed_attention if form == "packed" else _split_attention(SmallCausalAttention.apply)
    y, g = run(fn, base.to(dtype))
    assert y.shape == ref_y.shape and g.shape == ref_g.shape
    # fp32 math inside, one rounding to the dtype at the end. The output sums T
    # probabilities × values after D-long score dot products; the gradient chains two
    # such reductions (dP = dY·Vᵀ, then dq = dS·K, dk = dSᵀ·Q, dv = Pᵀ·dY).
    assert_rounded_once(y, ref_y, dtype, terms=T + D)
    assert_rounded_once(g, ref_g, dtype, terms=2 * (T + D))


def test_packed_and_split_small_attention_are_bitwise_equal(attention_impl):
    """The two forms run the same fp32 math: in bf16, outputs and gradients are equal."""
    from lmforge.model.transformer import SmallCausalAttention

    torch.manual_seed(0)
    base = torch.randn(4, 24, 3, 2, 8).bfloat16()
    grad_out = torch.randn(4, 24, 2, 8).bfloat16()
    results = []
    for fn in (_packed_attention, _split_attention(SmallCausalAttention.apply)):
        x = base.clone().requires_grad_()
        y = fn(x)
        y.backward(grad_out)
        results.append((y, x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    ("variant", "kw", "packed"),
    [("gpt2", {}, True), ("llama", {}, False), ("gpt2", {"n_kv_heads": 2}, False)],
)
def test_bf16_cpu_training_routes_attention_by_what_touches_q_and_k(
    monkeypatch, variant, kw, packed
):
    """bf16 training on a CPU: a model that uses the projection's q, k and v as they are
    (GPT-2) takes `PackedSmallCausalAttention`; RoPE or grouped heads change them first,
    so those take `SmallCausalAttention`. Inference and fp32 take neither."""
    import lmforge.model.transformer as tr

    calls = {"packed": 0, "split": 0}
    for name, cls in (
        ("packed", tr.PackedSmallCausalAttention),
        ("split", tr.SmallCausalAttention),
    ):
        original = cls.apply

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(cls, "apply", counted)
    model = make(variant, **kw).train()
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    model(idx, idx).backward()  # fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)
    assert calls == {"packed": 0, "split": 0}
    model.to(torch.bfloat16)(idx, idx).backward()
    n = model.cfg.n_layers
    assert calls == ({"packed": n, "split": 0} if packed else {"packed": 0, "split": n})


def test_causal_attention_math_matches_the_function():
    """The plain-ops form compiled code uses computes what `SmallCausalAttention` does."""
    from lmforge.model.transformer import SmallCausalAttention, causal_attention_math

    torch.manual_seed(0)
    base = torch.randn(2, 20, 3, 4, 8)
    grad_out = torch.randn(2, 20, 4, 8)
    results = []
    for fn in (SmallCausalAttention.apply, causal_attention_math):
        x = base.clone().requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
        y = fn(q, k, v)
        y.backward(grad_out)
        results.append((y, x.grad))
    x = base.double().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    ref_y = causal_attention_math(q, k, v)  # float64
    ref_y.backward(grad_out.double())
    # Two fp32 evaluations of one function: each within fp32 rounding of float64.
    assert_as_accurate_as(results[0][0], results[1][0], ref_y)
    assert_as_accurate_as(results[0][1], results[1][1], x.grad)
    assert_as_accurate_as(results[1][0], results[0][0], ref_y)
    assert_as_accurate_as(results[1][1], results[0][1], x.grad)


def _bf16_tolerances(model: Transformer, idx: torch.Tensor) -> tuple[float, float]:
    """How far bf16 autocast may move the loss (absolute) and each gradient (relative,
    in norm) from fp32, from bf16's unit roundoff u = 2^-8.

    Loss: cross-entropy's gradient in the logits has ℓ1 norm ≤ 2, so the mean loss moves
    by at most twice the largest logit error; a logit comes out of bf16 matmuls whose
    inputs and output are rounded (≤ 3u relative each), over blocks that add their own:
    allow 4u of the largest fp32 logit. Gradients: each passes through ≈ 12 roundings
    (2 blocks × 6 matmuls), independent, of rms u/√3 each: ≈ 2u in norm; allow 4u."""
    u = unit_roundoff(torch.bfloat16)
    with torch.no_grad():
        max_logit = model(idx).abs().max().item()
    return 2 * 4 * u * max_logit, 4 * u


def test_bf16_autocast_attention_path_agrees_with_flash():
    """Under CPU bf16 autocast a short causal sequence takes `SmallCausalAttention`;
    with the threshold at 0 the same model takes torch's flash kernel. Both must be
    within bf16 rounding of the fp32 model, in loss and in every gradient."""
    import lmforge.model.transformer as tr

    model = make("gpt2").train()
    idx = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, dims=1)

    def loss_and_grads(autocast: bool, max_t: int):
        old, tr.SMALL_ATTENTION_MAX_T = tr.SMALL_ATTENTION_MAX_T, max_t
        try:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(idx, targets)
            loss.backward()
        finally:
            tr.SMALL_ATTENTION_MAX_T = old
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = loss_and_grads(False, 256)
    loss_tol, grad_rtol = _bf16_tolerances(model, idx)
    for max_t in (256, 0):  # small path, then flash
        loss, grads = loss_and_grads(True, max_t)
        assert loss == pytest.approx(ref_loss, abs=loss_tol)
        # (≈ 0.6% measured on a Xeon, either path; dropping the 1/√D scale from dq
        # alone gives 2%.)
        for g, r in zip(grads, ref_grads, strict=True):
            assert (g - r).norm() <= grad_rtol * r.norm() + 1e-6


def test_bf16_autocast_training_forward_compiles():
    """`train.compile` with bf16 on a CPU: dynamo cannot trace `SmallCausalAttention`'s
    saved views, so compiled code takes `causal_attention_math`; the eager and
    compiled losses and gradients agree to bf16 rounding. (aot_eager: dynamo's
    tracing, without inductor's slow C++ build.)"""
    model = make("gpt2").train()
    idx = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager")
    results = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(idx, idx.roll(-1, dims=1))
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    loss_tol, grad_rtol = _bf16_tolerances(model, idx)
    # Both sides are bf16, each within the bounds of fp32: twice the bounds apart.
    assert l1 == pytest.approx(l0, abs=2 * loss_tol)
    for a, b in zip(g0, g1, strict=True):
        assert (a - b).norm() <= 2 * grad_rtol * b.norm() + 1e-6
