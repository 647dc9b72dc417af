"""A decode-only forward for one new token per row, over a static KV cache.

`Transformer.forward` serves training, prompt processing and scoring; at one
token per step its generality (module calls, (B, T, ·) shapes, masks, GQA
repeats) costs about as much as the matmuls themselves on a small model. The
`Decoder` here computes the same function for T = 1 from the same weights with
a short, fixed sequence of tensor ops:

- the prompt goes through `Transformer.forward` with a `KVCache` (so the cache
  holds exactly what the model computes); each later token is one `step`;
- keys and values are written in place into the preallocated cache, no
  concatenation or reallocation per token;
- attention of one query needs no mask: it sees the whole filled cache; grouped
  heads read their shared key/value head through a view (no repeat);
- with more than one row, the weights are used transposed to (in, out) and
  contiguous: oneDNN/MKL run a small-M matmul on that layout about 1.6× faster
  than `F.linear` on (out, in) here (benchmarks/LOG.md, goal 4); one row is a
  matrix-vector product bound by memory bandwidth, where the layout does not
  matter, so no copy is made.

Only the plain model qualifies (`Decoder.supports`); a wrapped model or a
replaced linear layer (LoRA) goes through `Transformer.forward`. Training never
runs this code, so it cannot change training numerics; tests check it against
the full forward and against HF `generate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from lmforge.components import NORMS
from lmforge.config import ModelConfig
from lmforge.model.attend import attend_one
from lmforge.model.transformer import (
    MLP,
    Attention,
    Block,
    KVCache,
    Transformer,
    apply_rope,
    head_dim,
)

# ModelConfig fields whose every value `Decoder.step` implements (or that only concern
# training or initialisation). A model that sets any other field away from its default
# (a variant added later) is decoded by `Transformer.forward` until this file learns it.
_UNDERSTOOD = {
    "preset", "vocab_size", "context_length", "n_layers", "d_model", "n_heads", "n_kv_heads",
    "d_ff", "norm", "position", "qk_norm", "tie_embeddings", "bias", "qkv_bias", "dropout",
    "rope_theta", "norm_eps", "init_std", "zero_init_proj", "logit_softcap",
    "head_dim", "norm_placement", "qk_norm_scope", "gate_act", "embed_scale", "attn_scale",
    "attn_softcap",
    "objective",  # checked by value in `Decoder.supports`
    # Components: `step` applies the model's own (their decode form, or the module).
    "mlp",
}  # fmt: skip


def _mm_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w + b for a weight stored transposed, (in, out)."""
    y = torch.mm(x, w)
    return y if b is None else y.add_(b)


# (in, out) copies of weights, kept while their parameter lives and is unchanged: a
# server or an evaluation calls `generate` over and over, and transposing the 14M
# model of the benchmark took ≈ 60 ms of each ≈ 0.8 s batch-8 call. An in-place update
# (an optimizer step, `load_state_dict`) bumps the parameter's version; assigning
# `.data` changes its storage; either makes the copy stale, and it is rebuilt.
_TRANSPOSED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def transposed_weight(w: torch.Tensor) -> torch.Tensor:
    """`w.t().contiguous()`, cached per parameter until `w` changes."""
    key = (w._version, w.data_ptr(), w.shape, w.dtype, w.device)
    hit = _TRANSPOSED.get(w)
    if hit is not None and hit[0] == key:
        return hit[1]
    t = w.detach().t().contiguous()
    _TRANSPOSED[w] = (key, t)
    return t


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _plain(m: nn.Module | None, kind: type[nn.Module]) -> bool:
    return m is None or type(m) is kind


class Decoder:
    """Greedy or sampled decoding state for `batch` rows of at most `max_len` tokens."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True for a `Transformer` built of the stock layers (not wrapped, no adapters, no hooks)."""
        if type(model) is not Transformer or model.training:
            return False
        cfg, default = model.cfg, ModelConfig()
        if cfg.objective != "causal":
            return False
        for f in fields(cfg):
            if f.name not in _UNDERSTOOD and getattr(cfg, f.name) != getattr(default, f.name):
                return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return False  # someone observes or changes activations: keep the module calls
        if not _plain(model.lm_head, nn.Linear) or not _plain(model.pos_emb, nn.Embedding):
            return False
        for block in model.blocks:
            if type(block) is not Block:  # e.g. an activation-checkpointing wrapper
                return False
            a, m = block.attn, block.mlp
            if type(a) is not Attention or type(m) is not MLP:
                return False
            if not all(_plain(x, nn.Linear) for x in (a.qkv, a.proj, m.up, m.down)):
                return False
            if not all(_plain(x, nn.RMSNorm) for x in (a.q_norm, a.k_norm)):
                return False
        return True

    def __init__(
        self,
        model: Transformer,
        batch: int,
        max_len: int,
        transpose: bool | None = None,
    ):
        if not self.supports(model):
            raise ValueError("Decoder needs a plain Transformer in eval mode (not wrapped)")
        cfg = model.cfg
        if max_len > cfg.context_length:
            raise ValueError(f"max_len {max_len} exceeds context_length {cfg.context_length}")
        model.ensure_rope(max_len)  # `step` reads the tables up to max_len
        self.model = model
        p = model.lm_head.weight
        self.H = cfg.n_heads
        self.K = cfg.n_kv_heads or cfg.n_heads
        self.D = head_dim(cfg)
        # Keys and values of a layer side by side in one (2, B, K, T_max, D) tensor: the new
        # token's k|v (adjacent in the qkv output) lands in it with one copy, and each half
        # is a (B, K, T_max, D) view whose (B, K) dims merge for a batched matmul.
        # Uninitialised: a position is written (prefill or `step`) before attention reads it.
        self.kv = [
            torch.empty(2, batch, self.K, max_len, self.D, device=p.device, dtype=p.dtype)
            for _ in range(cfg.n_layers)
        ]
        self.cache = KVCache([kv[0] for kv in self.kv], [kv[1] for kv in self.kv])
        self.C = cfg.d_model
        self.softcap = float(getattr(cfg, "logit_softcap", 0.0) or 0.0)
        self.eps = cfg.norm_eps
        # SDPA's default 1/sqrt(D) (Vaswani et al. 2017), or the model's own (Gemma 2).
        self.scale = cfg.attn_scale or 1.0 / math.sqrt(self.D)
        self.attn_softcap = cfg.attn_softcap
        self.qk_full = cfg.qk_norm_scope == "full"
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 0.0
        # Transposed copies pay off only for a real matrix product (see the module docstring).
        self.transposed = batch > 1 if transpose is None else transpose

        def lin(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
            w = m.weight.detach()
            return (transposed_weight(m.weight) if self.transposed else w), (
                None if m.bias is None else m.bias.detach()
            )

        component = NORMS[cfg.norm]

        def norm(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
            # The norm component's decode form; absent norms (post-norm blocks) pass x on.
            return _identity if type(m) is nn.Identity else component.decode_fn(m)

        def qk_norm(m: nn.Module | None) -> torch.Tensor | None:
            return None if m is None else cast(torch.Tensor, m.weight).detach()

        blocks = cast(list[Block], list(model.blocks))  # checked by `supports`
        self.layers = [
            (
                norm(b.attn_norm),
                lin(b.attn.qkv),
                qk_norm(b.attn.q_norm),
                qk_norm(b.attn.k_norm),
                lin(b.attn.proj),
                norm(b.attn_out_norm),
                norm(b.mlp_norm),
                lin(b.mlp.up),
                b.mlp.act,
                lin(b.mlp.down),
                norm(b.mlp_out_norm),
            )
            for b in blocks
        ]
        self.final_norm = norm(model.norm)
        self.head = lin(model.lm_head)
        self.tok_emb = model.tok_emb.weight.detach()
        self.pos_emb = None if model.pos_emb is None else model.pos_emb.weight.detach()

    @property
    def length(self) -> int:
        """Positions filled in the cache so far."""
        return self.cache.length

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) through the model into the cache; last position's logits (B, V)."""
        return self.model(idx, cache=self.cache, last_only=True)[:, -1]

    # ------------------------------------------------------------------ one token

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) at the next position; logits (B, V) for the one after."""
        pos = self.cache.length
        if pos >= self.cache.keys[0].size(2):
            raise ValueError(f"the cache holds {pos} positions and is full")
        # Everything the loop touches in locals, ATen ops called directly (`torch.layer_norm`,
        # not the `F.layer_norm` wrapper): at ~100 ops per token the Python around each op
        # is a measurable share (benchmarks/LOG.md, goal 4).
        B = tokens.size(0)
        H, K, D, eps = self.H, self.K, self.D, self.eps
        L = pos + 1  # positions attended to, the new one included
        lin = _mm_bias if self.transposed else F.linear
        x = torch.embedding(self.tok_emb, tokens)  # (B, C)
        if self.embed_scale:  # in x's dtype, as `Transformer.forward`
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb[pos]
        rope = None
        m = self.model
        if m.rope_cos is not None and m.rope_sin is not None:
            rope = (m.rope_cos[pos], m.rope_sin[pos])  # (D/2,) each
        for kv, (n1, qkv, qn, kn, proj, n1o, n2, up, act, down, n2o) in zip(
            self.kv, self.layers, strict=True
        ):
            # kv: (2, B, K, T_max, D)
            h = lin(n1(x), *qkv)  # (B, (H + 2K)·D)
            q = h[:, : H * D]
            if qn is None and rope is None:
                kv[:, :, :, pos] = h[:, H * D :].view(B, 2, K, D).transpose(0, 1)
            else:
                k = h[:, H * D : (H + K) * D]
                if qn is not None and self.qk_full:  # over the whole projection (OLMo 2)
                    q = torch.rms_norm(q, (H * D,), qn, eps)
                    k = torch.rms_norm(k, (K * D,), kn, eps)
                q = q.reshape(B, H, D)
                k = k.reshape(B, K, D)
                if qn is not None and not self.qk_full:
                    q = torch.rms_norm(q, (D,), qn, eps)
                    k = torch.rms_norm(k, (D,), kn, eps)
                if rope is not None:
                    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
                kv[0, :, :, pos] = k
                kv[1, :, :, pos] = h[:, (H + K) * D :].view(B, K, D)
            y = attend_one(q, kv, L, self.scale, self.attn_softcap)  # (B·K, G, D)
            x = x + n1o(lin(y.view(B, H * D), *proj))
            x = x + n2o(lin(act(lin(n2(x), *up)), *down))
        self.cache.length = L
        logits = lin(self.final_norm(x), *self.head)  # (B, V)
        if self.softcap:  # as Transformer.forward: cap·tanh(logits / cap), in float32
            logits = self.softcap * torch.tanh(logits.float() / self.softcap)
        return logits
