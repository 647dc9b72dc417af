"""`lmforge run RECIPE`: every stage of a recipe, in order, into one run folder.

The stages come from the registry of `lmforge.stages`: this module only keys,
skips, resumes and records them, calling each stage's `run(ctx)`.

Each stage's output is keyed by a hash of the config sections it reads and of
the keys of the stages it depends on. `stages.json` records, per stage, the key
it was started with and whether it finished:

- finished with the same key → skipped (a rerun with nothing changed takes seconds);
- started with the same key but not finished (killed) → rerun; training stages
  resume from their last checkpoint, the others are idempotent;
- a different key → its folder is removed and the stage runs from scratch, and
  so does every stage downstream (their keys include this one's).

Run folder::

    stages.json          stage keys, completion, timing, summaries
    config.yaml          the resolved config of the last run
    prepared/            prepare: document shards + data_report.json
    tokenizer/           tokenizer.json
    tokens/              train/val token shards
    pretrain/            checkpoints/, metrics.jsonl, summary.json
    finetune/            the same for fine-tuning, plus test outputs
    eval/                eval.json, samples.json
    bias/                bias.json
    export/hf, export/gguf
    report.html, report.md, report/*.png

A stage's folder holds the same files whether the stage runs here or alone:
``lmforge pretrain --output.dir=DIR`` writes ``DIR/checkpoints/``, ``DIR/metrics.jsonl``
and ``DIR/summary.json`` as ``pretrain/`` holds them here (``lmforge finetune`` likewise,
and ``lmforge eval --out`` writes the ``eval.json`` that ``eval/`` holds). Alone, a command makes the inputs its config does not name
(``pretrain`` trains ``DIR/tokenizer.json`` and tokenises into ``DIR/tokens/``); here,
`stage_config` points ``tokenizer.path``, ``data.tokens_dir``, ``data.sources`` and
``output.dir`` at the stage folders above. Every ``--checkpoint`` option accepts
either layout (`lmforge.model_source`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.config import RUN_STAGES, Config, dump_yaml, load_config, to_dict
from lmforge.fileio import write_json_atomic
from lmforge.stages import RunError, Stage, StageContext, stages
from lmforge.train.dist import print0

__all__ = [
    "STAGES",
    "RunError",
    "final_checkpoint",
    "model_checkpoints",
    "run_recipe",
    "stage_keys",
]

# Bump when a stage's outputs change meaning, so old run folders are recomputed.
STAGE_FORMAT = 1


# ----------------------------------------------------------------------------- helpers


def _pick(cfg: Config, section: str) -> Any:
    node: Any = to_dict(cfg)
    for part in section.split("."):
        node = node[part]
    return node


def stage_config(cfg: Config, run_dir: Path) -> Config:
    """The config as the stages see it: every path points inside the run folder."""
    data = replace(cfg.data, tokens_dir=str(run_dir / "tokens"))
    if "prepare" in cfg.run.stages and cfg.prepare.sources:
        data = replace(data, sources=[str(run_dir / "prepared" / "shards")])
    tokenizer = cfg.tokenizer
    if not tokenizer.path:
        tokenizer = replace(tokenizer, path=str(run_dir / "tokenizer" / "tokenizer.json"))
    return replace(
        cfg,
        data=data,
        tokenizer=tokenizer,
        output=replace(cfg.output, dir=str(run_dir / "pretrain")),
    )


def model_checkpoints(run_dir: Path, cfg: Config) -> dict[str, Path]:
    """Label → checkpoint of every model the run produced, in training order."""
    return StageContext(cfg, run_dir).model_checkpoints()


def final_checkpoint(run_dir: Path, cfg: Config) -> Path:
    """The run's final model: the fine-tuned one if the recipe fine-tunes, else the pre-trained one."""
    return StageContext(cfg, run_dir).final_checkpoint()


# Every stage, in pipeline order (the registry of `lmforge.stages`).
STAGES: dict[str, Stage] = stages()
assert tuple(STAGES) == RUN_STAGES


def stage_keys(cfg: Config) -> dict[str, str]:
    """Content key of every stage the recipe runs (report has none: it always reruns)."""
    keys: dict[str, str] = {}
    if "prepare" in cfg.run.stages and cfg.prepare.sources:
        # data.sources is then the run's own prepared shards, a path under output.dir; the
        # prepare key stands for their content, so a moved run keeps its keys.
        cfg = replace(cfg, data=replace(cfg.data, sources=["<prepared shards>"]))
    for name in cfg.run.stages:
        stage = STAGES[name]
        settings = {}
        for section in stage.sections:
            try:
                settings[section] = _pick(cfg, section)
            except KeyError:
                settings[section] = None  # a section this version does not have
        payload = {
            "stage": name,
            "format": STAGE_FORMAT,
            "settings": settings,
            "deps": {d: keys[d] for d in stage.deps if d in keys},
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        keys[name] = hashlib.sha256(blob).hexdigest()[:16]
    return keys


def run_recipe(
    recipe: str | None,
    overrides: list[str] | None = None,
    only: str = "",
    start_from: str = "",
    cfg: Config | None = None,
) -> dict[str, Any]:
    """Run (or resume) a recipe; returns the stage records."""
    cfg = cfg or load_config(recipe, overrides)
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = [s for s in RUN_STAGES if s in cfg.run.stages]
    if "prepare" in stages and not cfg.prepare.sources:
        stages.remove("prepare")
    for flag, name in (("--only", only), ("--from", start_from)):
        if name and name not in stages:
            raise RunError(
                f"{flag} {name}: not a stage of this recipe (stages: {', '.join(stages)})"
            )
    keys = stage_keys(replace(cfg, run=replace(cfg.run, stages=stages)))
    state_path = run_dir / "stages.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    scfg = stage_config(cfg, run_dir)
    forced = set(stages[stages.index(start_from) :]) if start_from else set()
    t_run = time.perf_counter()
    print0(f"lmforge run {cfg.name} → {run_dir}/  (stages: {', '.join(stages)})")
    for name in stages:
        stage = STAGES[name]
        if only and name != only:
            if (
                name in keys
                and state.get(name, {}).get("key") != keys[name]
                and stages.index(name) < stages.index(only)
            ):
                raise RunError(
                    f"--only {only}: stage '{name}' is not up to date; run without --only first"
                )
            continue
        record = state.get(name, {})
        key = keys.get(name, "")
        if (
            name != "report"
            and record.get("done")
            and record.get("key") == key
            and name not in forced
        ):
            print0(f"[{name}] up to date (key {key}), skipped")
            continue
        folder = run_dir / stage.folder if stage.folder else None
        fresh = record.get("key") != key or name in forced or name == "report"
        if folder is not None and fresh and folder.exists():
            shutil.rmtree(folder)  # outputs of another configuration: start over
        print0(f"[{name}] {'running' if fresh else 'resuming'} (key {key})")
        state[name] = {"key": key, "done": False, "started": time.time()}
        write_json_atomic(state_path, state)
        t0 = time.perf_counter()
        summary = stage.run(StageContext(scfg, run_dir))
        state[name] = {
            "key": key,
            "done": True,
            "seconds": round(time.perf_counter() - t0, 2),
            "summary": summary,
            "lmforge_version": __version__,
        }
        write_json_atomic(state_path, state)
        print0(f"[{name}] done in {state[name]['seconds']:.1f}s")
    print0(f"run finished in {time.perf_counter() - t_run:.1f}s")
    return state
