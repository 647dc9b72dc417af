"""Apply parallelism, activation checkpointing and compilation to a model built for one device.

The model code never knows about any of this: `parallelize` changes the model in
place after it is built (torchtitan's rule), in torchtitan's order:

0. tensor parallelism (`train.parallel = tp | fsdp+tp`, `lmforge.train.tensor_parallel`)
1. activation checkpointing, per block (`train.activation_checkpointing`)
2. `torch.compile`, per block (`train.compile`)
3. data parallelism (`train.parallel`): DDP when torchrun starts several
   processes, or FSDP2 (`fully_shard` on every block, then on the root) on any
   number of processes, with a bf16 mixed-precision policy when `train.dtype = bf16`.

Steps 1 and 2 wrap each block's forward in place instead of replacing the block
with a wrapper module, so parameter names, and so checkpoints, stay those of the
plain model. With nothing configured the model is returned untouched, and a
single process runs exactly the code it would run without this module.

The rest of the file is what the loop needs to stay the same across settings:
`grad_sync` (skip gradient reduction between micro-batches), `clip_grad_norm`
(works on FSDP's DTensor gradients) and the full-state checkpoint helpers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from lmforge.config import Config
from lmforge.train.dist import DistInfo, dist_info
from lmforge.train.tensor_parallel import optimizer_context, to_standard_layout, to_tp_layout


def parallelize(model: nn.Module, cfg: Config, device: torch.device, dist: DistInfo) -> nn.Module:
    """Return the module to train: `model` itself (changed in place) or a DDP wrapper of it."""
    t = cfg.train
    blocks = list(getattr(model, "blocks", []))
    tp_mesh = None
    if t.parallel in ("tp", "fsdp+tp"):  # TP first, as torchtitan: AC and FSDP wrap its blocks
        from lmforge.train.tensor_parallel import apply_tp, make_mesh

        ensure_process_group(device, t.dist_timeout_s)
        tp_mesh = make_mesh(cfg, device)
        apply_tp(model, tp_mesh["tp"])
    if t.activation_checkpointing != "none":
        for block in blocks:
            checkpoint_block(block, selective=t.activation_checkpointing == "selective")
    if t.compile:
        # Per block: identical blocks share one compiled graph (compiles once), and FSDP's
        # hooks stay between the compiled regions (torchtitan does the same).
        for block in blocks:
            block.compile()
    if t.parallel in ("fsdp", "fsdp+tp"):
        return shard_model(model, cfg, device, tp_mesh["dp"] if tp_mesh is not None else None)
    if tp_mesh is not None:
        return model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [_cuda_index(device)] if device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    return model


def _cuda_index(device: torch.device) -> int:
    # "cuda" without an index means the current device, which init_distributed set to LOCAL_RANK.
    return device.index if device.index is not None else torch.cuda.current_device()


# ----------------------------------------------------------------------------- activation checkpointing


def _save_list() -> list[Any]:
    """Ops whose outputs selective checkpointing keeps: the matmuls and attention.

    Everything else in a block (norms, GELU/SiLU, RoPE, residual adds) is cheap
    to recompute but costs as much memory to keep, which is the trade of
    Korthikanti et al. 2022 ("Reducing activation recomputation in large
    transformer models"). Attention kernels differ by device; list those present.
    """
    aten = torch.ops.aten
    ops = [aten.mm.default, aten.addmm.default, aten.bmm.default]
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        if hasattr(aten, name):
            ops.append(getattr(aten, name).default)
    return ops


def checkpoint_block(block: nn.Module, selective: bool = False) -> None:
    """Recompute `block`'s activations during backward instead of storing them.

    Non-reentrant checkpointing (the recommended kind: works with keyword
    arguments, `torch.compile` and FSDP2). The forward is wrapped on the instance,
    so the block keeps its class, its hooks and its parameter names.
    """
    forward = block.forward
    context_fn = partial(create_selective_checkpoint_contexts, _save_list()) if selective else None

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if context_fn is None:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    block.forward = checkpointed_forward  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- FSDP2


def ensure_process_group(device: torch.device, timeout_s: float) -> None:
    """FSDP needs a process group even for one process (e.g. `torchrun --nproc_per_node 1`)."""
    if tdist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ:  # launched by torchrun with one process
        tdist.init_process_group(backend=backend, timeout=timeout)
    else:  # a plain `python` process: an in-memory store is all a group of one needs
        tdist.init_process_group(
            backend=backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout
        )


def shard_model(model: nn.Module, cfg: Config, device: torch.device, mesh: Any = None) -> nn.Module:
    """FSDP2: shard every block, then the root (embeddings, final norm, head), over all ranks
    (or over `mesh`, the data-parallel dimension of a 2-D mesh with tensor parallelism).

    With `train.dtype = bf16` the gathered weights are cast to bf16 for compute
    while the sharded master weights, gradients reduction and optimizer stay in
    fp32 (the mixed-precision recipe of Micikevicius et al. 2018, as torchtitan
    uses it).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    t = cfg.train
    if t.fsdp_cpu_offload and device.type != "cuda":
        raise ValueError("train.fsdp_cpu_offload = true needs a CUDA device (train.device)")
    ensure_process_group(device, t.dist_timeout_s)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if mesh is None:
        mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if t.dtype == "bf16"
        else MixedPrecisionPolicy()
    )
    offload = CPUOffloadPolicy() if t.fsdp_cpu_offload else OffloadPolicy()
    for block in getattr(model, "blocks", []):
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp,
            offload_policy=offload,
            reshard_after_forward=t.fsdp_reshard_after_forward,
        )
    # The root's weights (head, final norm) are needed again at once by backward:
    # resharding them after forward would only add an all-gather.
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP2 shards (DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


# ----------------------------------------------------------------------------- in the loop


@contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def grad_sync(model: nn.Module, sync: bool) -> AbstractContextManager[Any]:
    """Context for one micro-batch: reduce gradients across ranks only when `sync`.

    Skipping the reduction on all but the last micro-batch of a step saves
    (accum_steps - 1) all-reduces (DDP) or reduce-scatters (FSDP) per step.
    """
    if sync:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()  # type: ignore[operator]
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return nullcontext()


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that also returns a plain tensor for FSDP's DTensor gradients.

    On DTensors torch computes the global norm across shards itself and returns it
    as a replicated DTensor; `full_tensor()` makes it an ordinary tensor for the
    loop's checks and logs. Without DTensors this is exactly `clip_grad_norm_`.
    """
    params = list(params)
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    if len(groups) > 1:  # tensor parallelism: whole and sharded parameters side by side
        return _clip_mixed(list(groups.values()), max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm


@torch.no_grad()
def _clip_mixed(groups: list[list[torch.Tensor]], max_norm: float) -> torch.Tensor:
    """Clipping over gradients on several meshes (or none), which torch's cannot mix.

    Each group's norm is computed as torch does (a DTensor group's across its
    shards); a whole parameter's gradient is the same on every rank of a TP
    group, so it counts once. The scaling is torch's: max_norm / (norm + 1e-6), capped at 1.
    """
    norms = []
    for grads in groups:
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    local = [g.to_local() if isinstance(g, DTensor) else g for grads in groups for g in grads]
    torch._foreach_mul_(local, coef)
    return total


# ----------------------------------------------------------------------------- checkpoints


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[Any, Any]:
    """What `save_checkpoint` should write: the objects themselves, or gathered full states.

    Why gather to rank 0 rather than write a sharded `torch.distributed.checkpoint`:
    lmforge's checkpoint is one `model.safetensors` plus one optimizer state that every
    other stage (generate, fine-tune, export, eval) reads without a process group,
    and that any world size can resume from. The gathered optimizer state is
    re-keyed by parameter index, exactly as `optimizer.state_dict()` of one
    process, so the files do not depend on how the run was parallelised. The cost
    is that rank 0 must hold the full state in CPU memory while writing — fine
    up to a few billion parameters; beyond that a sharded format is the better trade.

    Collective under FSDP: every rank must call it. Non-zero ranks get empty dicts.
    """
    if not is_sharded(model):
        return model, optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = to_standard_layout(model, get_model_state_dict(model, options=options))
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        weights.pop("lm_head.weight", None)  # stored once, under tok_emb.weight
    optim: dict[str, Any] = {}
    if optimizer is not None:
        by_name = get_optimizer_state_dict(model, optimizer, options=options)
        if by_name:
            to_standard_layout(model, by_name["state"])  # type: ignore[arg-type]
            optim = _index_keyed(by_name)
    return weights, optim


def _index_keyed(by_name: dict[str, Any]) -> dict[str, Any]:
    """FQN-keyed optimizer state → the index-keyed layout of `Optimizer.state_dict()`."""
    index: dict[str, int] = {}
    groups = []
    for group in by_name["param_groups"]:
        ids = []
        for fqn in group["params"]:
            index[fqn] = len(index)
            ids.append(index[fqn])
        groups.append({**group, "params": ids})
    return {"state": {index[k]: v for k, v in by_name["state"].items()}, "param_groups": groups}


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, checkpoint_dir: Path
) -> None:
    """Load a checkpoint written by any world size into an FSDP2-sharded model (every rank)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    weights: dict[str, Any] = load_file(str(checkpoint_dir / "model.safetensors"))
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        weights.setdefault("lm_head.weight", weights["tok_emb.weight"])
    set_model_state_dict(model, to_tp_layout(model, weights), options=options)
    if optimizer is None:
        return
    from lmforge.train.checkpoint_read import read_optimizer_state

    by_index = read_optimizer_state(checkpoint_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    n_saved = sum(len(g["params"]) for g in by_index["param_groups"])
    if n_saved != len(fqns):
        raise ValueError(
            f"{checkpoint_dir}: optimizer state for {n_saved} parameters, the model has {len(fqns)}"
        )
    by_name: dict[str, Any] = {
        "state": {fqns[i]: v for i, v in by_index["state"].items()},
        "param_groups": [
            {**g, "params": [fqns[i] for i in g["params"]]} for g in by_index["param_groups"]
        ],
    }
    to_tp_layout(model, by_name["state"])
    with optimizer_context(model):  # the state is created by a step with lr = 0
        set_optimizer_state_dict(model, optimizer, by_name, options=options)


# ----------------------------------------------------------------------------- failures


class RankFailure(RuntimeError):
    """A collective failed: another rank died, hung or lost the network."""

    reported = False  # True once the message is on stderr (the CLI then prints no copy)


def as_rank_failure(exc: BaseException, run_dir: Path) -> RankFailure | None:
    """A clear error for a failed collective, or None when `exc` is something else.

    Gloo reports a dead peer at once ("connection closed/reset by peer"); a hung
    one surfaces after `train.dist_timeout_s`. NCCL raises `DistBackendError`.
    """
    info = dist_info()
    if info.world_size <= 1:
        return None
    text = str(exc).lower()
    signs = ("connection", "peer", "timed out", "timeout", "gloo", "nccl", "broken pipe")
    if not (isinstance(exc, tdist.DistError) or any(s in text for s in signs)):
        return None
    silent = silent_ranks(info.rank, info.world_size)
    who = (
        f" Rank(s) {', '.join(map(str, silent))} did not report the failure within "
        f"{SILENT_WAIT_S:.0f}s: those died or hung."
        if silent
        else ""
    )
    return RankFailure(
        f"rank {info.rank} of {info.world_size}: a collective operation failed "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Another rank "
        f"has probably died or hung, so this job stops.{who} The newest checkpoint in "
        f"{run_dir / 'checkpoints'} is intact: rerun with --resume auto, on any number of processes."
    )


# How long a rank whose collective failed waits for the others to say the same. Short:
# the launcher stops the survivors (SIGTERM, then SIGKILL) soon after one worker ends.
SILENT_WAIT_S = 3.0


def silent_ranks(rank: int, world_size: int, wait_s: float = SILENT_WAIT_S) -> list[int]:
    """After a failed collective: the ranks that do not report a failure of their own.

    Every rank that sees the collective fail writes a key into the process group's
    store (the launcher's, which outlives any one worker). A rank that died, or that
    hangs outside the collective, never writes it, and so is named. Empty when every
    rank reported, or when the store cannot be reached.
    """
    import time

    try:
        store = tdist.distributed_c10d._get_default_store()
        store.set(f"lmforge/collective_failed/{rank}", "1")
        missing = [r for r in range(world_size) if r != rank]
        deadline = time.monotonic() + wait_s
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"lmforge/collective_failed/{r}"])]
            time.sleep(0.1)
        return missing
    except Exception:  # no store, or the store went away with its host: say nothing
        return []
