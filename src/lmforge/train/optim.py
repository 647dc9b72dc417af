"""Optimisers: AdamW (torch's fused kernel) and Muon for the hidden matrices.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural
networks"; used by the modded-nanogpt speedruns and by Moonlight, Liu et al.
2025) replaces the update of each 2-D weight inside the blocks by the nearest
semi-orthogonal matrix to its Nesterov momentum, computed with a few
Newton-Schulz iterations. Embeddings, the output head, norms and biases keep
AdamW: they are not "hidden" linear maps, and Muon's argument does not apply to
them. In lmforge both live in one `torch.optim.Optimizer`, so checkpoints,
resume and the learning-rate schedule see a single optimiser.

A fused q/k/v (or SwiGLU gate/up) matrix is orthogonalised block by block, as
if the projections were separate matrices: Muon's update is defined per linear
map, and the fused layout is only a speed trick.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmforge.components import MLPS

# Quintic Newton-Schulz coefficients chosen to push all singular values into about
# [0.7, 1.2] in five steps (Jordan et al. 2024): fast rather than exact.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately U·Vᵀ for g = U·S·Vᵀ (a batch of matrices: (..., rows, cols)).

    The iteration runs in bfloat16 by default, as in Jordan et al.: it only has to
    land the singular values near 1, and on CPUs with AMX (and on GPUs) bf16 matmuls
    are several times faster than fp32 ones.
    """
    a, b, c = NS_COEFFS
    shape = g.shape
    x = g.to(dtype).reshape(-1, *shape[-2:])  # (batch, rows, cols)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: the Gram matrix is the small one
        x = x.mT
    # Spectral norm ≤ Frobenius norm: scaling by the latter puts every singular value in [0, 1].
    x = x / (x.float().norm(dim=(-2, -1), keepdim=True) + 1e-7).to(dtype)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        # x ← a·x + (b·G + c·G²)·x, with the scalings folded into the matmuls: on a CPU,
        # separate bf16 elementwise passes cost more than the matmuls themselves.
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return (x.mT if transposed else x).reshape(shape)


def orthogonalize_many(
    mats: list[torch.Tensor], steps: int = 5, dtype: torch.dtype = torch.bfloat16
) -> list[torch.Tensor]:
    """`orthogonalize` for a list of matrices, batching those of equal shape into one call."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    for idx in by_shape.values():
        ortho = orthogonalize(torch.stack([mats[i] for i in idx]), steps, dtype)
        for j, i in enumerate(idx):
            out[i] = ortho[j]
    return out  # type: ignore[return-value]


class Muon(torch.optim.Optimizer):
    """Muon on groups with ``muon=True``; AdamW (decoupled weight decay) on the others.

    Muon group keys: lr, momentum, nesterov, ns_steps, weight_decay, and ``split``:
    row sizes of the blocks a fused matrix is orthogonalised in (None = whole).
    The update is scaled by sqrt(max(1, rows/cols)) so that tall and wide matrices
    move by a similar RMS (Jordan et al. 2024). AdamW group keys: lr, betas, eps,
    weight_decay.
    """

    def __init__(self, groups: list[dict[str, Any]], ns_dtype: torch.dtype = torch.bfloat16):
        self.ns_dtype = ns_dtype
        defaults = dict(
            lr=0.02,
            momentum=0.95,
            nesterov=True,
            ns_steps=5,
            weight_decay=0.0,
            betas=(0.9, 0.95),
            eps=1e-8,
            muon=False,
            split=None,
        )
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(f"Muon needs 2-D weights; got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        muon_groups = [g for g in self.param_groups if g["muon"]]
        if muon_groups:
            self._muon_step(muon_groups)
        for group in self.param_groups:
            if not group["muon"]:
                self._adamw_group(group)

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        # Momentum per parameter, then one batched Newton-Schulz over every block of
        # every matrix (equal shapes stacked), then the updates.
        todo: list[tuple[dict[str, Any], torch.Tensor, int]] = []  # group, param, n blocks
        blocks: list[torch.Tensor] = []
        for group in groups:
            mom = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(p.grad)
                g = p.grad.add(buf, alpha=mom) if group["nesterov"] else buf
                parts = g.split(group["split"], dim=0) if group["split"] else (g,)
                blocks.extend(parts)
                todo.append((group, p, len(parts)))
        if not todo:
            return
        steps = {g["ns_steps"] for g in groups}
        if len(steps) != 1:
            raise ValueError(f"Muon groups disagree on ns_steps: {sorted(steps)}")
        ortho = orthogonalize_many(blocks, steps.pop(), self.ns_dtype)
        i = 0
        for group, p, n in todo:
            parts = ortho[i : i + n]
            i += n
            update = parts[0] if n == 1 else torch.cat(parts)
            rows, cols = parts[0].shape
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    def _adamw_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1.0)
        t = float(steps[0])
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        bias1 = 1 - beta1**t
        bias2 = 1 - beta2**t
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, value=-lr / bias1)


def _block_matrices(model: nn.Module) -> dict[str, list[int] | None]:
    """Hidden 2-D weights inside the blocks, with the row split of fused ones."""
    cfg = getattr(model, "cfg", None)
    out: dict[str, list[int] | None] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or p.dim() != 2 or not name.startswith("blocks."):
            continue
        split: list[int] | None = None
        if name.endswith("attn.qkv.weight") and cfg is not None:
            d = cfg.head_dim or cfg.d_model // cfg.n_heads
            kv = cfg.n_kv_heads or cfg.n_heads
            split = [cfg.n_heads * d, kv * d, kv * d]
        elif name.endswith("mlp.up.weight") and cfg is not None and MLPS[cfg.mlp].gates == 2:
            split = [p.shape[0] // 2, p.shape[0] // 2]
        out[name] = split
    return out


def muon_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    muon_lr: float,
    muon_momentum: float,
    muon_weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> list[dict[str, Any]]:
    """Muon groups (one per row split) for block matrices; AdamW groups for the rest.

    Every group carries ``lr_scale`` (its learning rate over ``lr``), so one schedule
    multiplier drives them all.
    """
    hidden = _block_matrices(model)
    by_split: dict[tuple[int, ...] | None, list[nn.Parameter]] = {}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in hidden:
            split = hidden[name]
            by_split.setdefault(tuple(split) if split else None, []).append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = [
        dict(
            params=ps,
            muon=True,
            split=list(split) if split else None,
            lr=muon_lr,
            lr_scale=muon_lr / lr,
            momentum=muon_momentum,
            weight_decay=muon_weight_decay,
        )
        for split, ps in by_split.items()
    ]
    adam = dict(muon=False, lr=lr, lr_scale=1.0, betas=betas, eps=eps)
    groups.append(dict(adam, params=decay, weight_decay=weight_decay))
    groups.append(dict(adam, params=no_decay, weight_decay=0.0))
    return [g for g in groups if g["params"]]
