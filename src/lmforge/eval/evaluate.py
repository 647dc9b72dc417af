"""The one way lmforge evaluates: `lmforge eval`, the eval stage of `lmforge run` and the
in-loop hook all go through `evaluate_model` (one model) or `evaluate` (checkpoints)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.eval.registry import TaskOptions, check_task, run_task
from lmforge.eval.results import CheckpointResults, Result
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from torch import nn

# Options of one task: the same for every task, or chosen per task name.
OptionsFor = TaskOptions | Callable[[str], TaskOptions]


def _options(options: OptionsFor, task: str) -> TaskOptions:
    return options if isinstance(options, TaskOptions) else options(task)


def evaluate_model(
    model: nn.Module,
    tok: Tokenizer,
    tasks: list[str],
    options: OptionsFor,
    log: Callable[[str, float], None] | None = None,
    timings: bool = False,
) -> list[Result]:
    """Every task on one model, in order. `log(task, seconds)` hears of each finished
    task; `timings` also records its seconds in the results' settings."""
    out: list[Result] = []
    for task in tasks:
        t0 = time.perf_counter()
        results = run_task(model, tok, task, _options(options, task))
        seconds = time.perf_counter() - t0
        if timings:
            for r in results:
                r.settings["seconds"] = round(seconds, 2)
        if log:
            log(task, seconds)
        out += results
    return out


def evaluate(
    checkpoints: Mapping[str, str | Path],
    tasks: list[str],
    options: OptionsFor,
    device: str = "cpu",
    timings: bool = False,
    on_model: Callable[[str, str | Path, Any, Tokenizer], None] | None = None,
) -> list[CheckpointResults]:
    """Every task on every checkpoint (name → any form `--checkpoint` takes), one
    `CheckpointResults` per checkpoint; `on_model(name, checkpoint, model, tok)` runs
    after a checkpoint's tasks, while its model is loaded."""
    from lmforge.model_source import load_model

    for task in tasks:
        check_task(task)
    runs = []
    for name, ckpt in checkpoints.items():
        model, tok, _cfg = load_model(ckpt, device=device)

        def log(task: str, seconds: float, ckpt: str | Path = ckpt) -> None:
            print(f"{ckpt}: {task} done in {seconds:.1f}s", flush=True)

        results = evaluate_model(model, tok, tasks, options, log=log, timings=timings)
        runs.append(CheckpointResults(name, results))
        if on_model:
            on_model(name, ckpt, model, tok)
    return runs
