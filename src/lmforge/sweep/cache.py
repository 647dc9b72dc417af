"""Trials share finished stages through the keys `lmforge run` already computes.

A stage's key hashes the config sections it reads and the keys of the stages it
needs, never the run folder. So before a trial runs, every stage whose key some
other trial of the sweep has *finished* is linked into the trial's folder (a
symbolic link to the producing trial's stage folder) and recorded as done in its
`stages.json`, with `cached_from` naming the source. `run_recipe` then skips it
as it skips any finished stage. A sweep over fine-tuning keys therefore
pre-trains once; a sweep over a data key re-prepares and re-tokenizes once per
distinct value. The producing trial's folder stays where it is: the linked
outputs may name paths inside it (e.g. the tokenizer a checkpoint was trained
with). Unfinished stages (a killed or pruned trial) are never linked.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmforge.config import RUN_STAGES, Config
from lmforge.fileio import write_json_atomic
from lmforge.run import STAGES, stage_keys


def recipe_keys(cfg: Config) -> dict[str, str]:
    """The stage keys `run_recipe` computes for this config (same stage list)."""
    stages = [s for s in RUN_STAGES if s in cfg.run.stages]
    if "prepare" in stages and not cfg.prepare.sources:
        stages.remove("prepare")
    return stage_keys(replace(cfg, run=replace(cfg.run, stages=stages)))


def finished_stages(trials_dir: Path, exclude: Path) -> dict[tuple[str, str], tuple[Path, dict]]:
    """(stage, key) → (folder holding its outputs, its record), over every trial folder."""
    found: dict[tuple[str, str], tuple[Path, dict]] = {}
    for state_path in sorted(trials_dir.glob("*/stages.json")):
        trial = state_path.parent
        if trial.resolve() == exclude.resolve():
            continue
        try:
            state: dict[str, Any] = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for name, record in state.items():
            stage = STAGES.get(name)
            if stage is None or not stage.folder or not record.get("done"):
                continue
            folder = trial / stage.folder
            if folder.exists() and (name, record.get("key", "")) not in found:
                found[(name, record["key"])] = (Path(os.path.realpath(folder)), record)
    return found


def link_finished_stages(trials_dir: Path, trial_dir: Path, cfg: Config) -> list[str]:
    """Link into `trial_dir` every stage of `cfg` that another trial finished; returns their names."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    state_path = trial_dir / "stages.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    found = finished_stages(trials_dir, trial_dir)
    linked = []
    for name, key in recipe_keys(cfg).items():
        if state.get(name, {}).get("done") and state[name].get("key") == key:
            continue  # this trial's own finished stage (a resumed trial)
        hit = found.get((name, key))
        if hit is None:
            continue
        source, record = hit
        target = trial_dir / STAGES[name].folder
        if target.is_symlink() or target.exists():
            continue  # partial outputs of this trial: let `run_recipe` handle them
        target.symlink_to(source, target_is_directory=True)
        state[name] = {**record, "cached_from": str(source.parent)}
        linked.append(name)
    write_json_atomic(state_path, state)
    return linked


def executed_stages(trial_dir: Path) -> list[str]:
    """Stages this trial ran itself (finished, not linked from another trial)."""
    try:
        state = json.loads((trial_dir / "stages.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [
        name
        for name, record in state.items()
        if record.get("done") and "cached_from" not in record and name != "report"
    ]
