"""Thin distributed layer: who am I, print once, reduce. The loop calls only these.

Under `torchrun` the environment carries RANK/WORLD_SIZE/LOCAL_RANK; without it we
are rank 0 of 1 and never touch `torch.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if tdist.is_available() and tdist.is_initialized():
        return DistInfo(
            tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    return DistInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the process group when launched by torchrun (gloo on CPU, NCCL on GPU).

    `timeout_s` bounds every collective: a rank that dies or hangs makes the others
    fail after at most this long instead of waiting forever (train.dist_timeout_s).
    """
    info = dist_info()
    if info.world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
    return dist_info()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if dist_info().is_main:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        value /= tdist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
