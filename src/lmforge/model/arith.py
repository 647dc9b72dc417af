"""Sizes and costs of a transformer from its config alone: no torch needed.

`lmforge plan`, the CLI's argument parsing and the reports use these without
importing torch; `lmforge.model.transformer` re-exports them.
"""

from __future__ import annotations

import math

from lmforge.config import ModelConfig

# Up to this many positions, bf16/fp16 training attention on a CPU runs through
# `transformer.SmallCausalAttention` (fp32 scores, saved probabilities) rather than
# torch's flash kernel; `lmforge plan` counts its memory accordingly.
SMALL_ATTENTION_MAX_T = 256


def derived_d_ff(cfg: ModelConfig) -> int:
    """Hidden width of the MLP when `d_ff` is 0.

    GELU: 4·C (GPT-2). SwiGLU: 8/3·C keeps the parameter count of a 4·C GELU MLP
    (Shazeer 2020), rounded up to a multiple of 64 for matmul-friendly shapes.
    """
    if cfg.d_ff:
        return cfg.d_ff
    if cfg.mlp == "swiglu":
        return 64 * math.ceil(8 * cfg.d_model / 3 / 64)
    return 4 * cfg.d_model


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


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by group, from the config alone; `total` equals `Transformer.num_params`."""
    C, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    D = head_dim(cfg)
    kv = cfg.n_kv_heads or cfg.n_heads
    hidden = derived_d_ff(cfg)
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    b = 1 if cfg.bias else 0
    qkv_out = (cfg.n_heads + 2 * kv) * D
    qkv_b = 1 if cfg.bias or cfg.qkv_bias else 0
    attn = C * qkv_out + qkv_b * qkv_out + cfg.n_heads * D * C + b * C + qk_norm_params(cfg)
    up_out = hidden * (2 if cfg.mlp == "swiglu" else 1)
    mlp = C * up_out + b * up_out + hidden * C + b * C
    groups = {
        "embedding": V * C,
        "position": cfg.context_length * C if cfg.position == "learned" else 0,
        "attention": L * attn,
        "mlp": L * mlp,
        # Two per block, four with sandwich norms (Gemma 2), and the final one.
        "norms": L * (4 if cfg.norm_placement == "sandwich" else 2) * norm + norm,
        "lm_head": 0 if cfg.tie_embeddings else V * C,
    }
    groups["total"] = sum(groups.values())
    return groups


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: everything but embeddings and norms.

    The head counts even when tied, since it still multiplies every position.
    """
    g = count_params(cfg)
    bias_free = g["attention"] + g["mlp"]
    if cfg.bias:  # biases add, they do not multiply
        kv = cfg.n_kv_heads or cfg.n_heads
        D = head_dim(cfg)
        up_out = derived_d_ff(cfg) * (2 if cfg.mlp == "swiglu" else 1)
        bias_free -= cfg.n_layers * ((cfg.n_heads + 2 * kv) * D + cfg.d_model)
        bias_free -= cfg.n_layers * (up_out + cfg.d_model)
    elif cfg.qkv_bias:
        D = head_dim(cfg)
        bias_free -= cfg.n_layers * (cfg.n_heads + 2 * (cfg.n_kv_heads or cfg.n_heads)) * D
    bias_free -= cfg.n_layers * qk_norm_params(cfg)
    return bias_free + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> int:
    """Matmul FLOPs per token, attention included (Kaplan et al. 2020; PaLM appendix B).

    Forward: 2·N_matmul for the weights, plus 2·2·L·T·C for QKᵀ and AV over a
    full (unmasked) T×T score matrix — the convention of PaLM and nanoGPT, and
    what `torch.utils.flop_counter` counts for SDPA. Training (forward + backward)
    is 3× forward.
    """
    T = seq_len or cfg.context_length
    forward = 2 * matmul_params(cfg) + 4 * cfg.n_layers * T * cfg.n_heads * head_dim(cfg)
    return 3 * forward if training else forward
