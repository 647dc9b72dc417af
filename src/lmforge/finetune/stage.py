"""The finetune stage: `lmforge finetune`/`chat`, and fine-tuning inside `lmforge run`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from lmforge.finetune.cli import register
from lmforge.stages import Stage, StageContext, finished


def run_finetune(ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the run's pre-trained model, or (without a pretrain stage) `finetune.init`:
    an lmforge checkpoint, a HF folder, or "" for a new model trained on the task alone."""
    from lmforge.finetune.finetune import finetune, finetune_stage

    cfg, folder = ctx.cfg, ctx.folder("finetune")
    ft_cfg = replace(cfg, output=replace(cfg.output, dir=str(folder)))
    pretrained = ctx.model_checkpoints().get("pretrained")
    if pretrained is not None:
        summary = finetune_stage(ft_cfg, pretrained, folder)
    else:
        tokenizer = (
            replace(cfg.tokenizer, path="")
            if not Path(cfg.tokenizer.path).exists()
            else cfg.tokenizer
        )
        summary = finetune(replace(ft_cfg, tokenizer=tokenizer), folder, resume="auto")
    return finished(summary, "fine-tuning")


def finetuned_model(folder: Path) -> Path:
    from lmforge.finetune.start import finetuned_checkpoint

    return finetuned_checkpoint(folder)


STAGE = Stage(
    "finetune",
    ("finetune", "train"),
    ("pretrain",),
    run_finetune,
    "finetune",
    register=register,
    model=finetuned_model,
    model_label="finetuned",
)
