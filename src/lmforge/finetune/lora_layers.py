"""The LoRA layers (Hu et al. 2021, arXiv:2106.09685) on chosen linears, and layer freezing.

``y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ`` with A (r, in) initialised like
a linear layer (Kaiming-uniform, a = √5) and B (out, r) zero, so an adapted model
starts exactly equal to its base. Only A and B train.

Why our own module and not `peft`: peft wraps each layer and renames its weight
(``qkv.base_layer.weight``), so checkpoints of an adapted model no longer load
into a plain `Transformer`; `LoRALinear` keeps the layer's own ``weight``/``bias``
names and adds ``lora_A``/``lora_B`` beside them. The forward pass is tested
against peft's (`tests/test_finetune_lora.py`).

A tied head (``lm_head.weight is tok_emb.weight``) is untied before it gets an
adapter, since merging into a shared weight would also change the embeddings.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

# Linears of `lmforge.model.transformer.Transformer`, as named under each block.
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down", "lm_head")


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a low-rank update; shares (not copies) the base weight and bias."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return base + self.scale * update

    def delta(self) -> torch.Tensor:
        """The weight update (out, in) that merging adds."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged(self) -> nn.Linear:
        """A plain linear with the update folded into its weight."""
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.weight + self.delta().to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(
    model: nn.Module,
    targets: list[str],
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Replace every linear whose name ends with a target by a `LoRALinear`; freeze the rest.

    Returns the names of the adapted layers. Raises if a target matches nothing.
    """
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(
            f"finetune.lora_targets: {unknown} are not linears of the model "
            f"(choose from {', '.join(LORA_TARGETS)})"
        )
    if rank <= 0:
        raise ValueError(f"finetune.lora_rank = {rank} must be positive")
    if "lm_head" in targets:
        untie_head(model)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        is_plain_linear = isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
        if is_plain_linear and any(_matches(name, t) for t in targets):
            _set_module(model, name, LoRALinear(module, rank, alpha, dropout))
            adapted.append(name)
    missing = [t for t in targets if not any(_matches(a, t) for a in adapted)]
    if missing:
        raise ValueError(f"finetune.lora_targets: no layer named {missing} in the model")
    return adapted


def untie_head(model: nn.Module) -> nn.Linear:
    """Give a head tied to the embeddings its own copy, so merging an adapter into the
    head leaves the embeddings alone; returns the head."""
    head = model.get_submodule("lm_head")
    assert isinstance(head, nn.Linear)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.tie_embeddings:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.cfg = replace(cfg, tie_embeddings=False)  # type: ignore[assignment]
    return head


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (in place); the model becomes a plain `Transformer`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_module(model, name, module.merged())
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if ".lora_" in n}


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze parameters whose name starts with, or matches (fnmatch), any pattern.

    E.g. ``tok_emb``, ``blocks.0``, ``blocks.*.attn.*``. Returns the frozen names.
    """
    frozen = []
    for name, p in model.named_parameters():
        for pat in patterns:
            if name == pat or name.startswith(pat + ".") or fnmatch.fnmatchcase(name, pat):
                p.requires_grad_(False)
                frozen.append(name)
                break
    unused = [p for p in patterns if not any(_hit(n, p) for n in frozen)]
    if unused:
        raise ValueError(f"finetune.freeze: {unused} match no parameter of the model")
    return frozen


def _hit(name: str, pat: str) -> bool:
    return name == pat or name.startswith(pat + ".") or fnmatch.fnmatchcase(name, pat)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
