"""The stage contract and the registry of stages.

A stage (prepare, tokenizer, tokenize, pretrain, finetune, eval, bias, export,
report) is one `Stage` object exposed by the module that implements it:

- `name`, and `folder`: the sub-folder of the run folder that holds its output;
- `sections`: the config sections (or ``section.key``) that decide its output,
  which with `deps` (the stages whose outputs it reads) make its content key
  (`lmforge.run.stage_keys`: a changed key reruns the stage and what follows);
- `run(ctx)`: how it runs inside `lmforge run`, returning a JSON-able summary;
- `register(subparsers)`: how it adds its `lmforge` sub-command(s), if any;
- `model`: for a stage that trains a model, where that model loads from inside
  its folder, and `model_label`, the name it has in evaluation tables.

`lmforge.cli` builds its sub-commands and `lmforge.run` runs a recipe by looping
over `stages()`; neither names a stage. The registry names each stage's module,
imported on first use, so this module stays below every stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import RUN_STAGES, Config


class RunError(RuntimeError):
    """A stage of `lmforge run` could not finish (e.g. training was interrupted)."""


def finished(summary: dict[str, Any], what: str) -> dict[str, Any]:
    """A training stage's summary, or RunError when the training was interrupted."""
    if summary.get("interrupted"):
        raise RunError(f"{what} was interrupted; run the same command again to resume")
    return summary


@dataclass(frozen=True)
class StageContext:
    """What a stage gets inside `lmforge run`: the config as the stages see it (every
    path inside the run folder) and the run folder."""

    cfg: Config
    run_dir: Path

    def folder(self, stage: str) -> Path:
        """The output folder of a stage of this run."""
        return self.run_dir / get_stage(stage).folder

    def model_checkpoints(self) -> dict[str, Path]:
        """Label → checkpoint of every model the run trains, in training order
        ("pretrained", then "finetuned")."""
        out = {}
        for stage in stages().values():
            if stage.model is not None and stage.name in self.cfg.run.stages:
                out[stage.model_label] = stage.model(self.run_dir / stage.folder)
        return out

    def final_checkpoint(self) -> Path:
        """The run's final model: the fine-tuned one if the recipe fine-tunes, else the
        pre-trained one."""
        models = self.model_checkpoints()
        if not models:
            raise ValueError(
                f"run.stages = {self.cfg.run.stages} trains no model (add pretrain or finetune)"
            )
        return list(models.values())[-1]


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections (or "section.key") that decide the output
    deps: tuple[str, ...]  # upstream stages whose outputs this one reads
    run: Callable[[StageContext], dict[str, Any]]
    folder: str  # sub-folder of the run holding the stage's output ("" = none)
    register: Callable[[Any], None] | None = None  # adds the stage's `lmforge` commands
    model: Callable[[Path], Path] | None = None  # stage folder → the model it trained
    model_label: str = ""


# Stage name → "module:attribute" of its `Stage`, in pipeline order.
STAGE_MODULES: dict[str, str] = {
    "prepare": "lmforge.data.stage:STAGE",
    "tokenizer": "lmforge.pretrain_cli:TOKENIZER_STAGE",
    "tokenize": "lmforge.pretrain_cli:TOKENIZE_STAGE",
    "pretrain": "lmforge.pretrain_cli:PRETRAIN_STAGE",
    "finetune": "lmforge.finetune.stage:STAGE",
    "eval": "lmforge.eval.stage:STAGE",
    "bias": "lmforge.bias.stage:STAGE",
    "export": "lmforge.export.stage:STAGE",
    "report": "lmforge.report_stage:STAGE",
}
assert tuple(STAGE_MODULES) == RUN_STAGES

# Commands that are not stages of a run: modules with `register(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = (
    "lmforge.serve.cli",
    "lmforge.plan_cli",
    "lmforge.doctor",
    "lmforge.sweep.cli",
    "lmforge.train.checkpoint_cli",
)

_LOADED: dict[str, Stage] = {}


def get_stage(name: str) -> Stage:
    if name not in _LOADED:
        if name not in STAGE_MODULES:
            raise KeyError(f"no stage named {name!r} (stages: {', '.join(STAGE_MODULES)})")
        module, _, attr = STAGE_MODULES[name].partition(":")
        stage = getattr(importlib.import_module(module), attr)
        if stage.name != name:
            raise RuntimeError(f"{STAGE_MODULES[name]} is stage {stage.name!r}, not {name!r}")
        _LOADED[name] = stage
    return _LOADED[name]


def stages() -> dict[str, Stage]:
    """Every stage, in pipeline order."""
    return {name: get_stage(name) for name in STAGE_MODULES}


def register_commands(subparsers: Any) -> None:
    """Add every stage's and every other command's sub-commands."""
    for stage in stages().values():
        if stage.register is not None:
            stage.register(subparsers)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
