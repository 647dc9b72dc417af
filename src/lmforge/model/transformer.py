"""The transformer, top to bottom: embeddings, blocks (attention + MLP), norm, head.

Variants are fields of `ModelConfig`, not subclasses:

- norm: LayerNorm (GPT-2) or RMSNorm (Llama; Zhang & Sennrich 2019)
- position: learned absolute embeddings (GPT-2) or RoPE (Su et al. 2021)
- mlp: GELU (tanh form as GPT-2, or exact as nanoGPT), SwiGLU (Shazeer 2020) or
  squared ReLU (So et al. 2021)
- gate_act: the gated MLP's gate, silu (SwiGLU) or tanh-GELU (GeGLU, Gemma)
- norm_placement: pre-norm (GPT-2, Llama), post-norm inside the residual branch
  (OLMo 2) or both (Gemma 2)
- logit_softcap: cap·tanh(logits/cap) on the output logits (Gemma 2); attn_softcap
  the same on attention scores, attn_scale a softmax scale other than 1/√D
- embed_scale: embeddings multiplied by √C (Gemma)
- n_kv_heads: MHA (= n_heads), GQA (Ainslie et al. 2023) or MQA (= 1)
- qk_norm: RMSNorm on queries and keys (Dehghani et al. 2023), per head or over the
  whole projection (qk_norm_scope, OLMo 2)
- tie_embeddings, bias, dropout
- objective: causal (next token) or masked (bidirectional attention)

Written for one device; parallelism (DDP/FSDP, compile, activation checkpointing)
is applied from outside. Shapes in comments: B batch, T time, C = d_model,
H heads, K kv heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.config import ModelConfig

# Re-exported: the counting functions lived here before `arith` (torch-free) took them.
from lmforge.model.arith import (  # noqa: F401
    SMALL_ATTENTION_MAX_T,
    count_params,
    derived_d_ff,
    flops_per_token,
    head_dim,
    matmul_params,
)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies (D/2,) in float64, with the model's frequency scaling.

    "llama3" (Meta's Llama 3.1 reference; transformers' "llama3" rope type): with
    L = rope_original_context, wavelengths 2π/f above L / low_freq_factor are divided
    by `rope_factor` (f / factor), those below L / high_freq_factor are kept, and in
    between f is interpolated with s = (L / wavelength - low) / (high - low):
    (1 - s) · f / factor + s · f.
    """
    D = head_dim(cfg)
    exponent = torch.arange(0, D, 2, dtype=torch.float64) / D
    inv_freq = 1.0 / (cfg.rope_theta**exponent)
    if cfg.rope_scaling != "llama3":
        return inv_freq
    low, high, factor = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = ((cfg.rope_original_context / wavelen - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_tables(cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, D/2) for rotary embeddings, computed in float64 for accuracy."""
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), rope_inv_freq(cfg))
    return angles.cos().float(), angles.sin().float()


# RoPE tables start at most this long and grow (doubling, up to context_length) when a
# longer sequence comes: an imported model may allow 131072 positions, whose tables
# would take 64 MiB at head size 128 and are rarely all used.
ROPE_TABLE_START = 4096


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) — the "rotate half" layout HF Llama uses.

    x: (B, H, T, D); cos/sin: (T, D/2).
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# Up to this many positions, bf16 attention on a CPU goes through `SmallCausalAttention`
# instead of torch's CPU flash kernel, whose bf16 backward is slow at small head
# sizes. Forward + backward, 2 threads, ms (fp32 flash for comparison):
#   (B, H, T, D) = (12, 4, 64, 32): 2.0 against 6.9 (fp32 flash 1.6)
#                  (8, 4, 128, 32): 3.2 against 10.7 (2.6)
#                  (8, 8, 256, 32): 20.0 against 27.9; (4, 8, 256, 64): 12.1 against 13.8
#                  (2, 12, 512, 64): 42.5 against 40.1, so flash from here on.
# In fp32 flash is as fast or faster, and is kept. (SMALL_ATTENTION_MAX_T = 256, in `arith`.)

_causal_bias_cache: dict[tuple[int, str], torch.Tensor] = {}


def _causal_bias(T: int, device: torch.device) -> torch.Tensor:
    """(T, T) additive mask: 0 on and below the diagonal, -inf above (cached)."""
    key = (T, str(device))
    bias = _causal_bias_cache.get(key)
    if bias is None:
        bias = torch.full((T, T), float("-inf"), device=device).triu(1)
        _causal_bias_cache[key] = bias
    return bias


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` with contiguous strides, in one copy (none when it already is)."""
    # `.to` ignores memory_format when the dtype does not change; `.contiguous()` then
    # copies, and costs nothing after `.to` has copied.
    return t.to(dtype, memory_format=torch.contiguous_format).contiguous()


def _small_attention_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of x = (3, B, H, T, D) fp32 (q, k, v stacked, contiguous).

    Returns y (B, H, T, D) fp32 and the probabilities (B·H, T, T) fp32."""
    _, B, H, T, D = x.shape
    with torch.autocast("cpu", enabled=False):  # fp32 throughout, whatever the caller's
        q3, k3, v3 = (t.view(B * H, T, D) for t in x.unbind(0))
        scores = torch.baddbmm(
            _causal_bias(T, x.device), q3, k3.transpose(1, 2), alpha=1.0 / math.sqrt(D)
        )
        # In place: the (B·H, T, T) tensors are what this spends its time moving, and
        # writing over the scores keeps them in cache (≈ 2% of a baby-GPT step).
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        return torch.bmm(probs, v3).view(B, H, T, D), probs


def _small_attention_backward(dy: torch.Tensor, x: torch.Tensor, probs: torch.Tensor):
    """Gradients (3, B, H, T, D) fp32 of q, k and v, from dy (B, T, H, D) in any dtype."""
    _, B, H, T, D = x.shape
    q3, k3, v3 = (t.view(B * H, T, D) for t in x.unbind(0))
    dy3 = _dense(dy.transpose(1, 2), torch.float32).view(B * H, T, D)
    g = torch.empty_like(x)
    dq, dk, dv = (t.view(B * H, T, D) for t in g.unbind(0))
    torch.bmm(probs.transpose(1, 2), dy3, out=dv)
    dprobs = torch.bmm(dy3, v3.transpose(1, 2))
    dscores = torch.ops.aten._softmax_backward_data.out(
        dprobs, probs, -1, probs.dtype, grad_input=dprobs
    )  # in place, as the forward's softmax
    torch.bmm(dscores, k3, out=dq)
    torch.bmm(dscores.transpose(1, 2), q3, out=dk)
    g[:2].mul_(1.0 / math.sqrt(D))  # dq and dk, in one pass
    return g


def _kernel_for(*ts: torch.Tensor) -> kernels.CpuKernels | None:
    """The C attention kernel, if it is built and can read these (B, H, T, D) tensors."""
    dtype = ts[0].dtype
    if not kernels.supports(dtype) or any(t.dtype != dtype or t.stride(-1) != 1 for t in ts):
        return None
    return kernels.get()


# Strides (batch, head, time) of a contiguous (B, T, H, D) tensor: the kernel's output layout.
def _bthd(T: int, H: int, D: int) -> tuple[int, int, int]:
    return (T * H * D, D, H * D)


def _kernel_forward(
    kern: kernels.CpuKernels, q: kernels.View, k: kernels.View, v: kernels.View,
    shape: tuple[int, int, int, int], like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The kernel's forward: y (B, T, H, D) contiguous in `like`'s dtype, and the saved
    probabilities, for views q, k, v of shape (B, H, T, D)."""
    B, H, T, D = shape
    y = torch.empty((B, T, H, D), dtype=like.dtype, device=like.device)
    probs = torch.empty(B * H * kern.padded(T) ** 2, device=like.device)
    kern.attention_forward(
        q, k, v, kernels.view(y, 0, _bthd(T, H, D)), probs, B, H, T, D, like.dtype, D**-0.5
    )
    return y, probs


class SmallCausalAttention(torch.autograd.Function):
    """Causal softmax(q·kᵀ/√D)·v for short sequences on a CPU: fp32 math, hand-written backward.

    Uses the C kernel of `lmforge.kernels` (one pass per batch and head, in cache, reading
    q, k and v where they lie) when it is available, else three batched matmuls forward
    and four backward, one softmax and its derivative. Either way it is several times
    faster than torch's CPU flash kernel for bf16 inputs (autocast) at the baby GPT's
    size (see `SMALL_ATTENTION_MAX_T`), and more accurate, since the scores and softmax
    stay in fp32. It saves the (B·H, T, T) probabilities, which is why it is used only
    up to `SMALL_ATTENTION_MAX_T` positions.

    q, k, v: (B, H, T, D), any dtype and strides. Returns (B, T, H, D), contiguous, in
    q's dtype: the layout the output projection reads, so the caller's transpose costs
    nothing. `PackedSmallCausalAttention` is the same computation on the fused
    projection's output, for models that do not touch q and k between projection and
    attention.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, H, T, D = q.shape
        kern = _kernel_for(q, k, v)
        ctx.kernel = kern
        if kern is not None:
            views = kernels.view(q), kernels.view(k), kernels.view(v)
            y, probs = _kernel_forward(kern, *views, (B, H, T, D), q)
            ctx.save_for_backward(q, k, v, probs)
            return y
        x = torch.empty((3, *q.shape), dtype=torch.float32, device=q.device)
        for dst, src in zip(x.unbind(0), (q, k, v), strict=True):
            dst.copy_(src)
        y, probs = _small_attention_forward(x)
        ctx.save_for_backward(x, probs)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return _dense(y.transpose(1, 2), q.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        if ctx.kernel is not None:
            q, k, v, probs = ctx.saved_tensors
            B, H, T, D = q.shape
            dy = dy.contiguous()
            # (B, T, H, D) buffers seen as (B, H, T, D): the layout q, k and v were sliced
            # from, so the transposes and split backward that follow copy nothing.
            g = [torch.empty((B, T, H, D), dtype=q.dtype, device=q.device) for _ in range(3)]
            bthd = _bthd(T, H, D)
            ctx.kernel.attention_backward(
                kernels.view(q), kernels.view(k), kernels.view(v),
                kernels.view(dy, 0, bthd), probs,
                *(kernels.view(t, 0, bthd) for t in g), B, H, T, D, q.dtype, D**-0.5,
            )  # fmt: skip
            return tuple(t.transpose(1, 2) for t in g)
        x, probs = ctx.saved_tensors
        g = _small_attention_backward(dy, x, probs)

        def back(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            # (B, H, T, D) with the strides of (B, T, H, D), as above.
            return _dense(g.transpose(1, 2), dtype).transpose(1, 2)

        return tuple(back(gi, dt) for gi, dt in zip(g.unbind(0), ctx.dtypes, strict=True))


class PackedSmallCausalAttention(torch.autograd.Function):
    """`SmallCausalAttention` on the fused q/k/v projection's output, (B, T, 3·H·D).

    The C kernel reads q, k and v straight from it and writes their gradients into one
    buffer of its shape. Without the kernel, one copy brings q, k and v into fp32 in the
    layout the matmuls read, and one copy takes their gradients back. The (q, k, v) form
    needs three copies each way and autograd's concatenation of the split: ≈ 10% of the
    attention's time at the baby GPT's size (benchmarks/LOG.md).
    Returns (B, T, H, D), contiguous, in qkv's dtype.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_heads: int) -> torch.Tensor:  # type: ignore[override]
        B, T, C3 = qkv.shape
        H, C = n_heads, C3 // 3
        D = C // H
        qkv = qkv.contiguous()
        kern = _kernel_for(qkv)
        ctx.kernel = kern
        if kern is not None:
            y, probs = _kernel_forward(kern, *_packed_views(qkv, H), (B, H, T, D), qkv)
            ctx.save_for_backward(qkv, probs)
            ctx.n_heads = H
            return y
        x = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        x = _dense(x, torch.float32)
        y, probs = _small_attention_forward(x)
        ctx.save_for_backward(x, probs)
        ctx.dtype = qkv.dtype
        return _dense(y.transpose(1, 2), qkv.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        if ctx.kernel is not None:
            qkv, probs = ctx.saved_tensors
            B, T, C3 = qkv.shape
            H = ctx.n_heads
            D = C3 // (3 * H)
            dy = dy.contiguous()
            g = torch.empty_like(qkv)
            ctx.kernel.attention_backward(
                *_packed_views(qkv, H), kernels.view(dy, 0, _bthd(T, H, D)), probs,
                *_packed_views(g, H), B, H, T, D, qkv.dtype, D**-0.5,
            )  # fmt: skip
            return g, None
        x, probs = ctx.saved_tensors
        _, B, H, T, D = x.shape
        g = _small_attention_backward(dy, x, probs).permute(1, 3, 0, 2, 4)  # (B, T, 3, H, D)
        return _dense(g, ctx.dtype).view(B, T, 3 * H * D), None


def _packed_views(qkv: torch.Tensor, H: int) -> tuple[kernels.View, kernels.View, kernels.View]:
    """The kernel's (B, H, T, D) views of q, k and v inside a contiguous (B, T, 3·H·D)."""
    _, T, C3 = qkv.shape
    C = C3 // 3
    strides = (T * C3, C // H, C3)
    return tuple(kernels.view(qkv, i * C, strides) for i in range(3))  # type: ignore[return-value]


def causal_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What `SmallCausalAttention` computes, as plain differentiable ops (for compiled code).

    q, k, v: (B, H, T, D); returns (B, T, H, D) in q's dtype, scores and softmax in fp32.
    """
    T, D = q.shape[-2], q.shape[-1]
    scores = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(D))
    # Built here, not taken from `_causal_bias`'s cache: compiled code folds it in.
    scores = scores + torch.full((T, T), float("-inf"), device=q.device).triu(1)
    y = scores.softmax(dim=-1) @ v.float()
    return y.transpose(1, 2).to(q.dtype)


@dataclass
class KVCache:
    """Pre-allocated keys and values for incremental decoding: (B, K, T_max, D) per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0  # positions filled so far

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        kv = cfg.n_kv_heads or cfg.n_heads
        shape = (batch, kv, max_len, head_dim(cfg))
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
        )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = head_dim(cfg)
        self.causal = cfg.objective == "causal"
        self.dropout = cfg.dropout
        # One fused projection for q, k and v: fewer, larger matmuls (faster on CPU).
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        # QK-norm per head (D values) or over the whole projection (H·D and K·D values).
        full = cfg.qk_norm_scope == "full"
        q_dim, k_dim = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim)
        self.qk_full = full
        self.q_norm = (
            nn.RMSNorm(q_dim if full else self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        )
        self.k_norm = (
            nn.RMSNorm(k_dim if full else self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        )
        self.scale = cfg.attn_scale or None  # None: SDPA's 1/sqrt(D)
        self.softcap = cfg.attn_softcap

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x)
        dropout_p = self.dropout if self.training else 0.0
        # Short causal bf16/fp16 training on a CPU: torch's flash kernel is slow there
        # (see SMALL_ATTENTION_MAX_T); fp32 attention with a hand-written backward.
        small_cpu = (
            self.causal
            and self.scale is None
            and not self.softcap
            and (cache is None or cache.length == 0)
            and attn_mask is None
            and 1 < T <= SMALL_ATTENTION_MAX_T
            and not dropout_p
            and x.device.type == "cpu"
            and qkv.dtype in (torch.bfloat16, torch.float16)
        )
        if (
            small_cpu
            and cache is None
            and rope is None
            and self.q_norm is None
            and K == H
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            # Nothing happens to q and k between the projection and the attention.
            return self.proj(PackedSmallCausalAttention.apply(qkv, H).view(B, T, H * D))
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        if self.qk_full and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over (H·D,) and (K·D,)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if not self.qk_full and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over (D,)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        start = 0
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k = cache.keys[layer][:, :, : start + T]
            v = cache.values[layer][:, :, : start + T]

        mask = attn_mask  # (B, 1, T, T) bool, True = may attend (packed examples)
        is_causal = self.causal and start == 0 and T > 1 and mask is None
        if self.causal and start > 0 and T > 1:
            # Chunk appended to a cache: query i (absolute start+i) sees keys ≤ start+i.
            q_pos = torch.arange(start, start + T, device=x.device)[:, None]
            mask = torch.arange(start + T, device=x.device)[None, :] <= q_pos
        if K != H:
            k = k.repeat_interleave(H // K, dim=1)  # (B, H, T', D)
            v = v.repeat_interleave(H // K, dim=1)
        if small_cpu and torch.compiler.is_compiling():
            # Dynamo cannot trace the Function's saved views; the same math as plain ops
            # lets inductor fuse the mask and softmax (torch's flash kernel would be
            # slow here in bf16, compiled or not).
            y = causal_attention_math(q, k, v)  # (B, T, H, D)
        elif small_cpu and torch.is_grad_enabled():
            y = SmallCausalAttention.apply(q, k, v)  # (B, T, H, D)
        elif self.softcap:
            y = softcapped_attention(q, k, v, mask, is_causal, self.scale, self.softcap, dropout_p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=self.scale
            ).transpose(1, 2)  # (B, T, H, D)
        y = y.reshape(B, T, H * D)  # H * D = C, or C/tp on a tensor-parallel rank
        return self.proj(y)


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    is_causal: bool, scale: float | None, cap: float, dropout_p: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """softmax(cap·tanh(q·kᵀ·scale / cap) + mask)·v, Gemma 2's attention (no fused kernel has
    the cap). q, k, v: (B, H, T, D) (keys may be longer than T, from a cache); mask: bool,
    True = may attend, broadcasting to (B, H, T, T'), or `is_causal`. Returns (B, T, H, D)."""
    scale = scale or q.size(-1) ** -0.5
    if is_causal:
        T = q.size(-2)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T')
    scores = cap * torch.tanh(scores / cap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), dropout_p)
    return (probs @ v).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = derived_d_ff(cfg)
        self.swiglu = cfg.mlp == "swiglu"
        self.relu2 = cfg.mlp == "relu2"
        self.gate_act = F.silu if cfg.gate_act == "silu" else partial(F.gelu, approximate="tanh")
        self.gelu_approx = "none" if cfg.mlp == "gelu_exact" else "tanh"
        # SwiGLU's gate and up projections fused into one matmul: (C → 2·hidden).
        self.up = nn.Linear(cfg.d_model, hidden * (2 if self.swiglu else 1), bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = self.gate_act(gate) * up
        elif self.relu2:
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate=self.gelu_approx)  # tanh: GPT-2's gelu_new
        return self.down(h)


class Block(nn.Module):
    """Residual block: x + attn(·), then x + mlp(·), with norms where `norm_placement` says.

    pre: x + f(norm(x)); post: x + out_norm(f(x)) (OLMo 2); sandwich: x +
    out_norm(f(norm(x))) (Gemma 2). An absent norm is an `nn.Identity`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()

        def norm(present: bool) -> nn.Module:
            return make_norm(cfg, cfg.d_model) if present else nn.Identity()

        before, after = cfg.norm_placement != "post", cfg.norm_placement != "pre"
        self.attn_norm = norm(before)
        self.attn = Attention(cfg)
        self.attn_out_norm = norm(after)
        self.mlp_norm = norm(before)
        self.mlp = MLP(cfg)
        self.mlp_out_norm = norm(after)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0, attn_mask=None):
        h = self.attn(self.attn_norm(x), rope, cache, layer, attn_mask)
        x = x + self.drop(self.attn_out_norm(h))
        return x + self.drop(self.mlp_out_norm(self.mlp(self.mlp_norm(x))))


def packed_mask_and_positions(
    doc_ids: torch.Tensor, causal: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal attention mask (B, 1, T, T) and per-example positions (B, T).

    `doc_ids` (B, T) must be non-decreasing along T (examples are contiguous).
    """
    _B, T = doc_ids.shape
    mask = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T): same example
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # Position = t minus the index where the current example began.
    begin = torch.where(first, t, torch.zeros_like(t)).cummax(dim=1).values
    return mask[:, None], t - begin


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (take it from the tokenizer)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.context_length, cfg.d_model) if cfg.position == "learned" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos = sin = None
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg, min(cfg.context_length, ROPE_TABLE_START))
        self.rope_cos: torch.Tensor | None
        self.rope_sin: torch.Tensor | None
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def ensure_rope(self, length: int) -> None:
        """Grow the RoPE tables to cover `length` positions (doubling, up to the context)."""
        if self.rope_cos is None or length <= self.rope_cos.size(0):
            return
        n = min(self.cfg.context_length, max(length, 2 * self.rope_cos.size(0)))
        cos, sin = rope_tables(self.cfg, n)
        like = self.rope_cos
        self.rope_cos = cos.to(like.device, like.dtype)
        self.rope_sin = sin.to(like.device, like.dtype)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """All initialisation in one place.

        | tensor                           | init                                  |
        |----------------------------------|---------------------------------------|
        | tok_emb, pos_emb                 | N(0, init_std)                        |
        | attn.qkv, mlp.up                 | N(0, init_std)                        |
        | attn.proj, mlp.down (residual)   | N(0, init_std / sqrt(2·n_layers))     |
        |   (model.zero_init_proj)         |   0                                   |
        | lm_head (when untied)            | N(0, init_std)                        |
        | biases                           | 0                                     |
        | norm weights                     | 1                                     |

        The residual scaling keeps the residual stream's variance independent of
        depth (GPT-2, Radford et al. 2019).
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm weights
                p.fill_(1.0)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                if self.cfg.zero_init_proj:
                    p.zero_()  # each block starts as the identity (modded-nanogpt)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * residual_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T); or the mean loss when `targets` given.

        `last_only`: logits of the last position only, (B, 1, V) — what prompt
        processing for generation needs, without the head's matmul over every position.

        Targets equal to -100 are ignored (loss masks for fine-tuning and masked LM).
        With a `cache`, `idx` continues the cached sequence and the cache is advanced.
        `doc_ids` (B, T) marks packed examples: a token attends only to tokens with its
        own id, and positions restart at 0 with each example, so a packed row computes
        exactly what each example would alone.
        """
        _B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds context_length {self.cfg.context_length}"
            )
        mask, pos = None, None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed examples) cannot be combined with a KV cache")
            mask, pos = packed_mask_and_positions(doc_ids, self.cfg.objective == "causal")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.cfg.embed_scale:
            # In the activations' dtype, as Gemma rounds √C (≈ 48.0 in bf16 for C = 2304).
            x = x * torch.tensor(self.cfg.d_model**0.5, dtype=x.dtype)
        if self.pos_emb is not None:
            x = x + (
                self.pos_emb(pos) if pos is not None else self.pos_emb.weight[start : start + T]
            )
        x = self.drop(x)
        rope = None
        self.ensure_rope(start + T)
        if self.rope_cos is not None and self.rope_sin is not None:
            if pos is not None:  # per-row positions: (B, 1, T, D/2) broadcasts over heads
                rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])
            else:
                rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, mask)
        if cache is not None:
            cache.length += T
        if last_only and targets is None:
            x = x[:, -1:]
        x = self.norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
        )

    # --------------------------------------------------------------- counting

    def num_params(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())
