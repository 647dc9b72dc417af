"""The bias stage: `lmforge bias`, and the audit of every model inside `lmforge run`."""

from __future__ import annotations

from typing import Any

from lmforge.bias.cli import register
from lmforge.stages import Stage, StageContext


def run_bias(ctx: StageContext) -> dict[str, Any]:
    from lmforge.bias.run import bias_stage

    return bias_stage(ctx.cfg, ctx.model_checkpoints(), ctx.folder("bias"))


STAGE = Stage("bias", ("bias",), ("pretrain", "finetune"), run_bias, "bias", register=register)
