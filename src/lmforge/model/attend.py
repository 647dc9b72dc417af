"""Causal and bidirectional attention on (B, H, T, D) tensors, every backend behind `attend`.

`attend` picks, for what it is given:

- `PackedSmallCausalAttention` / `SmallCausalAttention`: short causal bf16/fp16
  training on a CPU, where torch's flash kernel is slow (see `SMALL_ATTENTION_MAX_T`):
  fp32 scores and softmax, a hand-written backward, and the C kernel of
  `lmforge.kernels` when it is built. The packed form reads q, k and v from the fused
  projection's output when nothing touched them in between;
- `causal_attention_math`: the same math as plain ops while torch.compile traces;
- `softcapped_attention`: Gemma 2's capped scores (no fused kernel has the cap);
- `F.scaled_dot_product_attention` for everything else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.model.arith import SMALL_ATTENTION_MAX_T

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


def _small_cpu(q: torch.Tensor, fused: torch.Tensor, causal: bool, start: int,
               mask: torch.Tensor | None, scale: float | None, softcap: float,
               dropout_p: float) -> bool:  # fmt: skip
    """Whether short causal bf16/fp16 attention on a CPU goes through the fp32 path."""
    T = q.size(-2)
    return (
        causal
        and scale is None
        and not softcap
        and start == 0
        and mask is None
        and 1 < T <= SMALL_ATTENTION_MAX_T
        and not dropout_p
        and q.device.type == "cpu"
        and fused.dtype in (torch.bfloat16, torch.float16)
    )


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: torch.Tensor, *,
    causal: bool = True, start: int = 0, mask: torch.Tensor | None = None,
    scale: float | None = None, softcap: float = 0.0, dropout_p: float = 0.0,
    packed: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Attention of queries q (B, H, T, D) at positions start.. over keys and values
    (B, K, T', D) (T' = start + T with a cache; K divides H); returns (B, T, H, D).

    `fused`: the q/k/v projection's output (B, T, (H + 2K)·D), whose dtype says the
    compute dtype; `packed`: q, k and v are its untouched slices (no RoPE, QK-norm,
    cache or grouped heads), so the packed kernel may read it directly. `mask`: bool,
    True = may attend, broadcasting to (B, H, T, T') (packed examples); `scale` None =
    1/√D; `softcap` 0 = none.
    """
    H, T = q.size(1), q.size(2)
    small_cpu = _small_cpu(q, fused, causal, start, mask, scale, softcap, dropout_p)
    if small_cpu and packed and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return PackedSmallCausalAttention.apply(fused, H)
    is_causal = causal and start == 0 and T > 1 and mask is None
    if causal and start > 0 and T > 1:
        # Chunk appended to a cache: query i (absolute start+i) sees keys ≤ start+i.
        q_pos = torch.arange(start, start + T, device=q.device)[:, None]
        mask = torch.arange(start + T, device=q.device)[None, :] <= q_pos
    K = k.size(1)
    if K != H:
        k = k.repeat_interleave(H // K, dim=1)  # (B, H, T', D)
        v = v.repeat_interleave(H // K, dim=1)
    if small_cpu and torch.compiler.is_compiling():
        # Dynamo cannot trace the Function's saved views; the same math as plain ops
        # lets inductor fuse the mask and softmax (torch's flash kernel would be
        # slow here in bf16, compiled or not).
        return causal_attention_math(q, k, v)
    if small_cpu and torch.is_grad_enabled():
        return SmallCausalAttention.apply(q, k, v)
    if softcap:
        return softcapped_attention(q, k, v, mask, is_causal, scale, softcap, dropout_p)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale
    ).transpose(1, 2)


def attend_one(
    q: torch.Tensor, kv: torch.Tensor, L: int, scale: float, softcap: float = 0.0
) -> torch.Tensor:
    """One new query per row over the first L cached positions, for decoding: (B·K, G, D).

    q: (B, H, D) or (B, H·D) with H = K·G; kv: (2, B, K, T_max, D), keys then values. One query
    sees every cached position, so no mask. Query heads of a group are consecutive
    (h = k·G + g, as `repeat_interleave` in `attend`), so a group's G queries share
    their key/value head as rows of one matmul, with no repeat.
    """
    _, B, K, _, D = kv.shape
    G = q.numel() // (B * K * D)  # query heads per key/value head
    att = torch.baddbmm(
        torch.empty(B * K, G, L, device=q.device, dtype=q.dtype),
        q.reshape(B * K, G, D),
        kv[0, :, :, :L].view(B * K, L, D).transpose(1, 2),
        beta=0.0,
        alpha=scale,
    )  # (B·K, G, L)
    if softcap:  # as `softcapped_attention`
        att = softcap * torch.tanh(att / softcap)
    if att.dtype == torch.float32:
        att = att.softmax(dim=-1)
    else:  # half precision: normalise in float32, as SDPA does
        att = att.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(att, kv[1, :, :, :L].view(B * K, L, D))
