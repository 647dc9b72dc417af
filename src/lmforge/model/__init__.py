"""The transformer model, its presets and generation."""

from lmforge.model.transformer import (
    KVCache,
    Transformer,
    count_params,
    flops_per_token,
    matmul_params,
)

__all__ = ["KVCache", "Transformer", "count_params", "flops_per_token", "matmul_params"]
