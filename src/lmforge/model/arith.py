"""Sizes and costs of a transformer from its config alone: no torch needed.

`lmforge plan`, the CLI's argument parsing and the reports use these without
importing torch; `lmforge.model.transformer` re-exports them.
"""

from __future__ import annotations

from lmforge.components import ATTENTIONS, MLPS, NORMS, POSITIONS
from lmforge.config import ModelConfig

# Up to this many positions, bf16/fp16 training attention on a CPU runs through
# `attend.SmallCausalAttention` (fp32 scores, saved probabilities) rather than
# torch's flash kernel; `lmforge plan` counts its memory accordingly.
SMALL_ATTENTION_MAX_T = 256


def derived_d_ff(cfg: ModelConfig) -> int:
    """Hidden width of the MLP: `d_ff`, or the MLP component's own when it is 0.

    GELU: 4·C (GPT-2). SwiGLU: 8/3·C keeps the parameter count of a 4·C GELU MLP
    (Shazeer 2020), rounded up to a multiple of 64 for matmul-friendly shapes.
    """
    return MLPS[cfg.mlp].hidden(cfg)


def head_dim(cfg: ModelConfig) -> int:
    """Size of one attention head: `head_dim`, or d_model / n_heads when it is 0."""
    return cfg.head_dim or cfg.d_model // cfg.n_heads


def qk_norm_params(cfg: ModelConfig) -> int:
    """QK-norm weights per layer: per head (2·D) or over the whole q and k projections."""
    if not cfg.qk_norm:
        return 0
    if cfg.qk_norm_scope == "full":
        return (cfg.n_heads + (cfg.n_kv_heads or cfg.n_heads)) * head_dim(cfg)
    return 2 * head_dim(cfg)


def _qkv_out(cfg: ModelConfig) -> int:
    """Width of the fused q/k/v projection's output, (H + 2·K)·D."""
    return (cfg.n_heads + 2 * (cfg.n_kv_heads or cfg.n_heads)) * head_dim(cfg)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by group, from the config alone; `total` equals `Transformer.num_params`."""
    C, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    D = head_dim(cfg)
    norm = NORMS[cfg.norm].params(cfg, C)
    b = 1 if cfg.bias else 0
    qkv_out = _qkv_out(cfg)
    qkv_b = 1 if cfg.bias or cfg.qkv_bias else 0
    attn = C * qkv_out + qkv_b * qkv_out + cfg.n_heads * D * C + b * C + qk_norm_params(cfg)
    groups = {
        "embedding": V * C,
        "position": POSITIONS[cfg.position].params(cfg),
        "attention": L * attn,
        "mlp": L * MLPS[cfg.mlp].params(cfg),
        # Two per block, four with sandwich norms (Gemma 2), and the final one.
        "norms": L * (4 if cfg.norm_placement == "sandwich" else 2) * norm + norm,
        "lm_head": 0 if cfg.tie_embeddings else V * C,
    }
    groups["total"] = sum(groups.values())
    return groups


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: everything but embeddings, norms
    and biases. The head counts even when tied, since it still multiplies every position.
    """
    attention = _qkv_out(cfg) * cfg.d_model + cfg.n_heads * head_dim(cfg) * cfg.d_model
    block = attention + MLPS[cfg.mlp].matmul_params(cfg)
    return cfg.n_layers * block + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> int:
    """Matmul FLOPs per token, attention included (Kaplan et al. 2020; PaLM appendix B).

    Forward: 2·N_matmul for the weights, plus the attention component's own FLOPs
    per layer (softmax: 2·2·T·H·D for QKᵀ and AV over a full, unmasked T×T score
    matrix — the convention of PaLM and nanoGPT, and what `torch.utils.flop_counter`
    counts for SDPA). Training (forward + backward)
    is 3× forward.
    """
    T = seq_len or cfg.context_length
    forward = 2 * matmul_params(cfg) + cfg.n_layers * ATTENTIONS[cfg.attention].flops(cfg, T)
    return 3 * forward if training else forward
