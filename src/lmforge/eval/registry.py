"""The registry of evaluation tasks: `EvalTask`, `TaskOptions`, `register_task`, and
`run_task`, which every caller (`lmforge.eval.evaluate`) reaches a task through.

The built-in tasks live in `lmforge.eval.tasks` (and every `lmforge/eval/task_*.py`);
the registry imports that module by name on first use, so the modules the built-ins
are made of (generation, creative writing) can use the registry without a cycle.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.eval.results import Result
from lmforge.paths import shared_data
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is imported by the tasks that run, not by `lmforge --help`
    from torch import nn

    from lmforge.config import Config

BUILTINS = "lmforge.eval.tasks"


def known_tasks() -> dict[str, EvalTask]:
    """TASKS, once the built-in tasks and the `task_*.py` files have registered."""
    importlib.import_module(BUILTINS)
    return TASKS


# Any task of lm-evaluation-harness, run through `lmforge.eval.lm_eval_bridge`.
LM_EVAL_PREFIX = "lm-eval:"


@dataclass(frozen=True)
class EvalTask:
    """One named evaluation task: how it scores a model, and how a recipe feeds it.

    `run(model, tok, opts)` returns `Result`s (`opts.data` is already resolved:
    the user's sources, else `default_data` under the shared data folder).
    `recipe_options(cfg, run_dir, opts)`, if given, adapts the options inside
    `lmforge run` (e.g. ppl scores the run's held-out documents).
    """

    name: str
    run: Callable[[nn.Module, Tokenizer, TaskOptions], list[Result]]
    default_data: tuple[str, ...] = ()  # paths under $LMFORGE_SHARED_DATA
    needs_data: bool = True  # False: the task finds its own data when none is given
    recipe_options: Callable[[Config, Path, TaskOptions], TaskOptions] | None = None


# Every task `lmforge eval`, `lmforge run` and the in-loop hook know, by name.
TASKS: dict[str, EvalTask] = {}


def register_task(task: EvalTask) -> EvalTask:
    """Add (or replace) a task of the registry; returns it."""
    TASKS[task.name] = task
    return task


def check_task(name: str) -> None:
    if name not in known_tasks() and not (
        name.startswith(LM_EVAL_PREFIX) and name[len(LM_EVAL_PREFIX) :]
    ):
        raise ValueError(
            f"unknown task {name!r} (known: {', '.join(TASKS)}, or {LM_EVAL_PREFIX}NAME for a "
            "task of lm-evaluation-harness)"
        )


def fewshot_indices(n_items: int, item: int, k: int, seed: int) -> list[int]:
    """k other items as the few-shot examples of `item`: the same for the same seed and
    item whatever the order of evaluation, never the item itself."""
    if k <= 0:
        return []
    if k >= n_items:
        raise ValueError(f"--num-fewshot {k} needs more than {k} items (the set has {n_items})")
    others = [j for j in range(n_items) if j != item]
    return random.Random(f"{seed}:{item}").sample(others, k)


@dataclass
class TaskOptions:
    data: list[str] | None = None
    limit: int = 0
    stride: int = 0  # ppl: 0 = half the context
    batch_tokens: int = 16384
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_fewshot: int = 0  # solved examples before each item (multiple choice, generation)
    lm_eval_include: str = ""  # a folder of lm-eval task YAML for lm-eval:NAME tasks
    texts: list[str] | None = None  # ppl: these texts instead of reading `data`


def default_data(task: str) -> list[str]:
    defaults = known_tasks()[task].default_data if task in known_tasks() else ()
    if not defaults:
        raise ValueError(f"task {task!r} needs --data (no default data set)")
    root = shared_data()
    return [str(root / rel) for rel in defaults]


def run_task(model: nn.Module, tok: Tokenizer, task: str, opts: TaskOptions) -> list[Result]:
    """Evaluate `model` on one named task of the registry (or lm-eval:NAME)."""
    check_task(task)
    if task.startswith(LM_EVAL_PREFIX):
        builtins = importlib.import_module(BUILTINS)
        return builtins.run_lm_eval(model, tok, task[len(LM_EVAL_PREFIX) :], opts)
    spec = TASKS[task]
    if spec.needs_data and not opts.data and opts.texts is None:
        opts = replace(opts, data=default_data(task))
    return spec.run(model, tok, opts)
