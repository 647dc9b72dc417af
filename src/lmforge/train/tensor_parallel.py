"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with DTensor, alone or under FSDP2.

Each block's matmuls are split over the `tp` ranks of a mesh dimension:

| module     | style    | each rank holds                         | communication        |
|------------|----------|-----------------------------------------|----------------------|
| attn.qkv   | colwise  | q, k and v rows of its n_heads/tp heads | none in forward      |
| attn.proj  | rowwise  | the matching input columns              | all-reduce of output |
| mlp.up     | colwise  | its hidden/tp rows (of gate and of up)  | none in forward      |
| mlp.down   | rowwise  | the matching input columns              | all-reduce of output |

so each block costs one all-reduce per sub-layer forward and one backward, and
attention runs on whole heads locally. Embeddings, norms and the head stay
whole on every rank (no loss parallelism): their inputs and gradients are the
same on all ranks of a TP group, so they need no communication.

The fused projections are the footgun. `attn.qkv` stores [q; k; v] rows and
SwiGLU's `mlp.up` stores [gate; up]; sharding those rows in contiguous chunks
would give rank 0 the first heads of q only. At `apply_tp` the rows are
reordered so that each rank's contiguous chunk is [its q heads; its k heads;
its v heads] (`fused_row_order`), and the model is told its local head counts.
The reordering lives only in the running model: `to_standard_layout` undoes it
on everything saved (weights and the optimizer's per-parameter state, by
parameter name) and `to_tp_layout` redoes it on load, so checkpoints keep the
single-device layout that every other stage reads.

`train.parallel = tp` puts all processes in one TP group; `fsdp+tp` builds a
2-D mesh (dp × tp) with `train.tp` ranks per TP group (neighbouring ranks, the
fast links of one node) and FSDP2 shards over dp.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lmforge.config import Config
from lmforge.train.dist import DistInfo

# Registered on the model by `apply_tp`: parameter name → row order of the TP layout.
ROW_ORDER_ATTR = "tp_row_order"


def fused_row_order(sizes: list[int], tp: int) -> torch.Tensor:
    """Rows of a fused weight made of segments `sizes` (e.g. [q, k, v]), reordered so that
    chunk r of `tp` equal contiguous chunks holds chunk r of every segment.

    `tp_layout = standard[order]`; `standard = tp_layout[order.argsort()]`.
    """
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    order: list[int] = []
    for r in range(tp):
        for start, size in zip(starts, sizes, strict=True):
            part = size // tp
            order.extend(range(start + r * part, start + (r + 1) * part))
    return torch.tensor(order)


def mesh_shape(cfg: Config, world_size: int) -> tuple[int, int]:
    """(dp, tp) for `train.parallel`: tp alone uses every rank for TP."""
    tp = world_size if cfg.train.parallel == "tp" else cfg.train.tp
    if world_size % tp:
        raise ValueError(
            f"train.tp = {tp} does not divide the number of processes ({world_size}): "
            "start a multiple of train.tp processes"
        )
    return world_size // tp, tp


def data_rank(cfg: Config, dist: DistInfo) -> tuple[int, int]:
    """(rank, world size) of the data-parallel group: the ranks of a TP group read one batch."""
    if cfg.train.parallel not in ("tp", "fsdp+tp"):
        return dist.rank, dist.world_size
    dp, tp = mesh_shape(cfg, dist.world_size)
    return dist.rank // tp, dp


def optimizer_context(model: nn.Module) -> AbstractContextManager[Any]:
    """Where the optimizer steps (or loads state): with TP, whole parameters are plain
    tensors beside DTensor shards, and torch's fused AdamW takes them in one call only
    when plain tensors count as replicated (which they are: the same on every rank of a
    TP group). Without TP, a null context."""
    if not hasattr(model, ROW_ORDER_ATTR):
        return nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def make_mesh(cfg: Config, device: torch.device) -> DeviceMesh:
    """The 2-D mesh ("dp", "tp"); ranks of one TP group are consecutive."""
    dp, tp = mesh_shape(cfg, tdist.get_world_size())
    return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))


def _fused_sizes(block: Any) -> dict[str, list[int]]:
    attn, mlp = block.attn, block.mlp
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    sizes = {"attn.qkv": [H * D, K * D, K * D]}
    if mlp.swiglu:
        hidden = mlp.down.in_features
        sizes["mlp.up"] = [hidden, hidden]
    return sizes


def check_divisible(model: Any, tp: int) -> None:
    """Each rank must hold whole heads and an equal share of the MLP's hidden width."""
    cfg = model.cfg
    kv = cfg.n_kv_heads or cfg.n_heads
    hidden = model.blocks[0].mlp.down.in_features
    for key, value in (("n_heads", cfg.n_heads), ("n_kv_heads", kv), ("d_ff", hidden)):
        if value % tp:
            raise ValueError(
                f"model.{key} = {value} is not divisible by the tensor-parallel size {tp} "
                "(train.tp, or the number of processes with train.parallel=tp)"
            )


@torch.no_grad()
def apply_tp(model: Any, mesh: DeviceMesh) -> nn.Module:
    """Shard every block's matmuls over the 1-D `mesh` (in place) and return `model`."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = mesh.size()
    check_divisible(model, tp)
    row_order: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        for name, sizes in _fused_sizes(block).items():
            order = fused_row_order(sizes, tp)
            linear = block.get_submodule(name)
            for pname, p in linear.named_parameters():
                p.copy_(p[order.to(p.device)])
                row_order[f"blocks.{i}.{name}.{pname}"] = order
        plan: dict[str, Any] = {
            "attn.qkv": ColwiseParallel(),
            "attn.proj": RowwiseParallel(),
            "mlp.up": ColwiseParallel(),
            "mlp.down": RowwiseParallel(),
        }
        if block.attn.q_norm is not None:
            # One norm weight for all heads: each rank normalises its own heads (dim 1 of
            # (B, H, T, D)), and the weight's gradient is summed over the TP group.
            plan["attn.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan["attn.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        parallelize_module(block, mesh, plan)
        block.attn.n_heads //= tp
        block.attn.n_kv_heads //= tp
    setattr(model, ROW_ORDER_ATTR, row_order)
    model.register_forward_pre_hook(_refuse_cache, with_kwargs=True)
    return model


def _refuse_cache(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """The KV cache is sized for all heads; a TP rank holds n_heads / tp of them (and with
    one kv head per rank a wrong write would broadcast silently), so refuse it."""
    if (len(args) > 2 and args[2] is not None) or kwargs.get("cache") is not None:
        raise NotImplementedError(
            "generation with a KV cache is not supported on a tensor-parallel model: "
            "generate from its checkpoint in one process"
        )


def _reorder(model: nn.Module, tensors: dict[str, Any], inverse: bool) -> dict[str, Any]:
    orders: dict[str, torch.Tensor] = getattr(model, ROW_ORDER_ATTR, {})
    for name, order in orders.items():
        if inverse:
            order = order.argsort()
        value = tensors.get(name)
        if isinstance(value, torch.Tensor):
            tensors[name] = value[order.to(value.device)]
        elif isinstance(value, dict):  # an optimizer's per-parameter state
            tensors[name] = {
                k: v[order.to(v.device)] if _rows_like(v, order) else v for k, v in value.items()
            }
    return tensors


def _rows_like(value: Any, order: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and len(value) == len(order)


def to_standard_layout(model: nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """Full (gathered) tensors keyed by parameter name → the single-device row layout.

    Values are tensors (weights) or dicts of tensors (optimizer state per parameter).
    Changes `tensors` in place and returns it; a model without TP returns it unchanged.
    """
    return _reorder(model, tensors, inverse=True)


def to_tp_layout(model: nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `to_standard_layout`: full tensors to load into a TP model."""
    return _reorder(model, tensors, inverse=False)
