"""What `--checkpoint PATH` names: one resolver for every command that loads a model.

Accepted, in this order:

==================  ==========================================================================
form                what is loaded
==================  ==========================================================================
checkpoint folder   ``…/checkpoints/step_N`` (holds ``checksums.json``): that checkpoint
checkpoints folder  a folder of ``step_*`` folders: its newest checkpoint that verifies
stage folder        ``runs/x/pretrain``, ``runs/x/finetune``, an `lmforge pretrain` or
                    `lmforge import` output (holds ``checkpoints/``): its newest good
                    checkpoint; after LoRA fine-tuning the merged model (``merged/``)
run folder          an `lmforge run` folder (``pretrain/``, ``finetune/``): the last trained
                    stage (fine-tuning over pre-training), newest good checkpoint; the choice
                    is printed
transformers folder ``config.json`` + ``*.safetensors``: imported through `export.hf`
==================  ==========================================================================

Anything else is refused with one line that lists what the folder holds.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.config import Config
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

# No torch import here: command-line help text comes from this module.
FORMS = (
    "a checkpoint folder (step_N/ with checksums.json), a stage or `lmforge pretrain` folder "
    "(with checkpoints/step_*/), a run folder of `lmforge run` (with pretrain/ or finetune/), "
    "or a transformers folder (config.json + *.safetensors)"
)
# Stages of a run folder that hold models, the one trained last first.
RUN_STAGES_NEWEST_FIRST = ("finetune", "pretrain")


from lmforge.cli_args import CHECKPOINT_HELP as CHECKPOINT_HELP  # noqa: E402


class ModelPathError(ValueError):
    """`--checkpoint` names nothing loadable; the message says what is there and what would work."""


@dataclass(frozen=True)
class ResolvedModel:
    kind: str  # "lmforge" (a checkpoint folder) or "transformers" (a HF model folder)
    path: Path  # the checkpoint folder, or the transformers folder
    description: str  # one line: what was given and what was chosen


def is_transformers_folder(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and not (path / "trainer_state.json").exists()
        and any(path.glob("*.safetensors"))
    )


def _newest_good(steps_dir: Path) -> tuple[Path | None, list[str]]:
    """Newest ``step_*`` folder in `steps_dir` that verifies, and why newer ones were skipped."""
    from lmforge.train.checkpoint import CheckpointError, verify_checkpoint

    steps = sorted(p for p in steps_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    skipped: list[str] = []
    for step in reversed(steps):
        try:
            verify_checkpoint(step)
            return step, skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    return None, skipped


def _stage_checkpoint(folder: Path) -> tuple[Path | None, list[str]]:
    """The model a stage folder (or a folder of step_* folders) holds, if any."""
    if (folder / "merged" / "checkpoints").is_dir():  # LoRA: the adapter folded in
        folder = folder / "merged"
    if (folder / "checkpoints").is_dir():
        return _newest_good(folder / "checkpoints")
    if any(p.name.startswith("step_") for p in folder.iterdir() if p.is_dir()):
        return _newest_good(folder)
    return None, []


def _holds(folder: Path, n: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing (empty folder)"
    more = f", … ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def resolve_model(path: str | Path, announce: bool = True) -> ResolvedModel:
    """What `path` names (see the module docstring); raises ModelPathError with a hint."""
    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"--checkpoint {path}: no such file or folder")
    if path.is_file():
        raise ModelPathError(
            f"--checkpoint {path}: is a file; give its folder ({path.parent}) or {FORMS}"
        )
    if (path / "checksums.json").exists():
        return ResolvedModel("lmforge", path, f"{path}: checkpoint folder")
    if is_transformers_folder(path):
        return ResolvedModel("transformers", path, f"{path}: transformers folder")
    found, skipped = _stage_checkpoint(path)
    if found is not None:
        return ResolvedModel("lmforge", found, f"{path}: newest good checkpoint {found.name}")
    for stage in RUN_STAGES_NEWEST_FIRST:
        if not (path / stage).is_dir():
            continue
        found, more = _stage_checkpoint(path / stage)
        skipped += more
        if found is not None:
            desc = f"{path}: run folder → {found} (last trained stage: {stage})"
            if announce:
                print(
                    f"lmforge: using {found} (newest good checkpoint of {stage})", file=sys.stderr
                )
            return ResolvedModel("lmforge", found, desc)
    if skipped:
        raise ModelPathError(
            f"--checkpoint {path}: no checkpoint verifies ({'; '.join(skipped[:3])})"
        )
    raise ModelPathError(f"--checkpoint {path}: holds {_holds(path)}; expected {FORMS}")


# Model folders of other libraries → "module:function" that converts one into
# (model, tokenizer, config); named here, imported only when such a folder is loaded.
FOREIGN_LOADERS: dict[str, str] = {"transformers": "lmforge.export.hf:load_hf_model"}


def load_model(
    checkpoint: str | Path, device: str = "cpu"
) -> tuple[Transformer, Tokenizer, Config]:
    """A model, its tokenizer and its config from any form `--checkpoint` takes
    (`lmforge.model_source`: checkpoint, stage, run or transformers folder)."""
    from lmforge.config import config_from_dict
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.checkpoint import CheckpointError, load_weights, verify_checkpoint

    resolved = resolve_model(checkpoint)
    if resolved.kind in FOREIGN_LOADERS:
        module, _, attr = FOREIGN_LOADERS[resolved.kind].partition(":")
        foreign_model, foreign_tok, foreign_cfg = getattr(importlib.import_module(module), attr)(
            resolved.path
        )
        return foreign_model.to(device).eval(), foreign_tok, foreign_cfg
    path = resolved.path
    state = verify_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(
            f"{path / 'trainer_state.json'}: key config missing (it holds the model's shape)"
        )
    cfg = config_from_dict(state["config"], where=f"{path}/trainer_state.json")
    model = Transformer(cfg.model)
    load_weights(model, path / "model.safetensors")
    tok_path = path / "tokenizer.json"
    if not tok_path.exists():
        tok_path = path.parent.parent / "tokenizer.json"
    tok = load_tokenizer(tok_path)
    return model.to(device).eval(), tok, cfg
