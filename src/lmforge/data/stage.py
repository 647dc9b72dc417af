"""The prepare stage: `lmforge prepare`, and the recipe's document shards inside `lmforge run`."""

from __future__ import annotations

from typing import Any

from lmforge.data.cli import register
from lmforge.stages import Stage, StageContext


def run_prepare(ctx: StageContext) -> dict[str, Any]:
    from lmforge.data.pipeline import prepare
    from lmforge.train.dist import print0

    report = prepare(ctx.cfg.prepare, ctx.folder("prepare"), log=print0)
    return {"totals": report.get("totals", {}), "timing": report.get("timing", {})}


STAGE = Stage("prepare", ("prepare",), (), run_prepare, "prepared", register=register)
