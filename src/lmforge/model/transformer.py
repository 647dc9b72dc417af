"""The transformer, top to bottom: embeddings, blocks (attention + MLP), norm, head.

Variants are fields of `ModelConfig`, not subclasses. Three name components of
`lmforge.components` (each with its parameter and FLOP counts and decode form; a new
one is a registered class):

- norm: LayerNorm (GPT-2) or RMSNorm (Llama; Zhang & Sennrich 2019)
- position: learned absolute embeddings (GPT-2) or RoPE (Su et al. 2021)
- mlp: GELU (tanh form as GPT-2, or exact as nanoGPT), SwiGLU (Shazeer 2020) or
  squared ReLU (So et al. 2021)

The others are settings of the fixed layers:

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

Attention itself (SDPA, the CPU paths with the C kernel, soft-capping) is
`lmforge.model.attend.attend`. Written for one device; parallelism (DDP/FSDP, compile, activation checkpointing)
is applied from outside. Shapes in comments: B batch, T time, C = d_model,
H heads, K kv heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.components import ATTENTIONS, MLPS, NORMS, POSITIONS
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

# Re-exported: the CPU attention paths lived here before `attend` took them.
from lmforge.model.attend import (  # noqa: F401
    PackedSmallCausalAttention,
    SmallCausalAttention,
    attend,
    causal_attention_math,
    softcapped_attention,
)


class ComponentNorm(nn.Module):
    """A norm component's `forward` over the parameters its `weights` declares."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.component, self.eps = NORMS[cfg.norm], cfg.norm_eps
        sizes = self.component.weights(cfg, dim)
        for name, n in sizes.items():
            self.register_parameter(name, nn.Parameter(torch.ones(n)))
        self.names = tuple(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.component.forward(x, {k: getattr(self, k) for k in self.names}, self.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """The `model.norm` component's module over `dim` values."""
    module = NORMS[cfg.norm].module(cfg, dim)
    return ComponentNorm(cfg, dim) if module is None else module


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
        # A registered variant's formula, or None: the built-in softmax (`attend`).
        self.variant = None if cfg.attention == "softmax" else ATTENTIONS[cfg.attention]

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
        dropout_p = self.dropout if self.training else 0.0
        if self.variant is not None:
            y = self.variant.attend(
                q, k, v, causal=self.causal, start=start, mask=attn_mask, scale=self.scale,
                softcap=self.softcap, dropout_p=dropout_p,
            )  # fmt: skip
        else:
            fused_ok = cache is None and rope is None and self.q_norm is None and K == H
            y = attend(
                q, k, v, qkv, causal=self.causal, start=start, mask=attn_mask, scale=self.scale,
                softcap=self.softcap, dropout_p=dropout_p, packed=fused_ok,
            )  # fmt: skip
        return self.proj(y.reshape(B, T, H * D))  # H·D = C, or C/tp on a tensor-parallel rank


class MLP(nn.Module):
    """down(act(up(x))); the `model.mlp` component gives the hidden width and `act`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        component = MLPS[cfg.mlp]
        hidden = derived_d_ff(cfg)
        self.swiglu = component.gates == 2  # gated: up is (C → 2·hidden), gate and value
        self.act = component.activation(cfg)
        self.up = nn.Linear(cfg.d_model, hidden * component.gates, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


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
        position = POSITIONS[cfg.position]
        self.pos_emb = cast(nn.Embedding | None, position.embedding(cfg))  # (T, C) rows
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos = sin = None
        if position.rotary:
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
