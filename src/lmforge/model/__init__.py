"""The transformer model, its presets and generation.

The counting functions come from `lmforge.model.arith` (no torch); `Transformer` and
`KVCache` import torch on first use, so that `lmforge --help` and `lmforge plan` start
without it.
"""

from typing import Any

from lmforge.model.arith import count_params, flops_per_token, matmul_params

__all__ = ["KVCache", "Transformer", "count_params", "flops_per_token", "matmul_params"]


def __getattr__(name: str) -> Any:
    if name in ("KVCache", "Transformer"):
        from lmforge.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'lmforge.model' has no attribute {name!r}")
