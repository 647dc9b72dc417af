"""The export stage: `lmforge export`/`import`, and the run's final model exported inside
`lmforge run` in every `run.export_formats`."""

from __future__ import annotations

from typing import Any

from lmforge.export.cli import register
from lmforge.stages import Stage, StageContext


def run_export(ctx: StageContext) -> dict[str, Any]:
    from lmforge.export.cli import export_checkpoint

    ckpt = ctx.final_checkpoint()
    written = {}
    for fmt in ctx.cfg.run.export_formats:
        written[fmt] = str(export_checkpoint(ckpt, ctx.folder("export") / fmt, fmt))
    return {"checkpoint": str(ckpt), "written": written}


STAGE = Stage(
    "export",
    ("run.export_formats",),
    ("pretrain", "finetune"),
    run_export,
    "export",
    register=register,
)
