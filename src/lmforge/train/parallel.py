"""Apply parallelism and compilation to a model built for one device.

The model code never knows about any of this: `parallelize` wraps it after it is
built (torchtitan's rule). One process: optional `torch.compile`. Several
processes under torchrun: DistributedDataParallel (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import Config
from lmforge.train.dist import DistInfo


def parallelize(model: nn.Module, cfg: Config, device: torch.device, dist: DistInfo) -> nn.Module:
    wrapped: nn.Module = model
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = DDP(wrapped, device_ids=device_ids)
    return wrapped
