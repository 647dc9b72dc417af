"""One trial, the same for every engine: params → config → `run_recipe` → objective.

The trial runs the recipe into its own folder under `<sweep>/trials/`, after
linking the stages other trials already finished (cache.py). While it trains,
every validation result is passed to `report(step, value)`; when that returns
True the loop checkpoints and stops, and the trial ends as `TrialPruned`.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import Config, ConfigError, config_from_dict, load_config, to_dict
from lmforge.fileio import write_json_atomic
from lmforge.sweep.cache import executed_stages, link_finished_stages
from lmforge.sweep.space import SweepSpec

# (step, value) → True to stop the trial. Steps of fine-tuning come after pre-training's.
Reporter = Callable[[int, float], bool]


class TrialPruned(Exception):
    """The engine stopped this trial on its validation curve."""


class SweepInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM: the sweep stops too (run it again to resume)."""


@dataclass
class TrialOutcome:
    value: float
    violations: list[float] = field(default_factory=list)  # ≤ 0 = constraint satisfied
    constraint_values: dict[str, float] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)  # stages run here, not linked


def _set_key(data: dict[str, Any], key: str, value: Any) -> None:
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"params.{key}: '{where}' is not an item of the recipe's list")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            if last:
                node[part] = value
            else:
                node = node[part]
        else:
            raise ConfigError(f"params.{key}: '{where}' is not a key of the recipe")


def trial_config(
    recipe: str | None, overrides: list[str], params: dict[str, Any], trial_dir: Path
) -> Config:
    """The recipe with the sweep's fixed overrides, this trial's values and its own folder."""
    data = to_dict(load_config(recipe, overrides))
    for key, value in params.items():
        _set_key(data, key, value)
    data["output"]["dir"] = str(trial_dir)
    return config_from_dict(data, where=f"trial {trial_dir.name}")


def _walk(node: Any, parts: list[str]) -> Any:
    """Follow dotted parts, also through keys that contain dots themselves."""
    if not parts:
        return node
    if isinstance(node, list) and parts[0].isdigit() and int(parts[0]) < len(node):
        return _walk(node[int(parts[0])], parts[1:])
    if isinstance(node, dict):
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in node:
                found = _walk(node[key], parts[n:])
                if found is not None:
                    return found
    return None


def _eval_metric(eval_json: Path, name: str) -> tuple[float | None, list[str]]:
    """`[label.]task.metric` from eval.json; without a label, the run's final model."""
    data = json.loads(eval_json.read_text())
    by_label = {c["checkpoint"].split(":")[0]: c["results"] for c in data["checkpoints"]}
    label, _, rest = name.partition(".")
    results = by_label[label] if label in by_label else list(by_label.values())[-1]
    wanted = rest if label in by_label else name
    known = [f"{r['task']}.{r['metric']}" for r in results]
    for r in results:
        if f"{r['task']}.{r['metric']}" == wanted:
            return float(r["value"]), known
    return None, known


def metric_value(run_dir: Path, metric: str) -> float:
    """A number the run produced: `eval.[label.]task.metric` (eval.json), or
    `STAGE.path.in.its.summary` from stages.json (e.g. `bias.summary...`, `pretrain.val_bpb`)."""
    stage, _, rest = metric.partition(".")
    known: list[str] = []
    value: Any = None
    if stage == "eval" and (run_dir / "eval" / "eval.json").exists():
        value, known = _eval_metric(run_dir / "eval" / "eval.json", rest)
    else:
        state = json.loads((run_dir / "stages.json").read_text())
        value = _walk(state.get(stage, {}).get("summary", {}), rest.split("."))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        hint = f" (eval.json has: {', '.join(known)})" if known else ""
        raise ConfigError(f"objective/constraint metric '{metric}' not found in {run_dir}{hint}")
    return float(value)


@contextmanager
def listening(trial_dir: Path, cfg: Config, report: Reporter | None, sign: float) -> Iterator[dict]:
    """Pass the trial's validation curve to `report`; `state["pruned"]` says if it stopped us."""
    from lmforge.train.loop import VALIDATION_LISTENERS

    state: dict[str, Any] = {"pruned": False}
    offset = cfg.train.max_steps if "pretrain" in cfg.run.stages else 0

    def listener(run_dir: Path, step: int, metrics: dict[str, float]) -> bool:
        if report is None or trial_dir.resolve() not in run_dir.resolve().parents:
            return False
        value = metrics.get("val_bpb", metrics.get("val_loss"))
        if value is None:
            return False
        value = value if math.isfinite(value) else 1e30  # an exploded run is the worst there is
        global_step = step + (offset if run_dir.name == "finetune" else 0)
        # Lower validation is better; engines compare it in the objective's direction.
        state["pruned"] = bool(report(global_step, sign * value))
        return state["pruned"]

    VALIDATION_LISTENERS.append(listener)
    try:
        yield state
    finally:
        VALIDATION_LISTENERS.remove(listener)


def write_trial_note(trial_dir: Path) -> None:
    """Leave the note that the trial's report card puts at the top of its headline."""
    from lmforge.fileio import write_text_atomic
    from lmforge.report import HEADLINE_NOTE

    write_text_atomic(trial_dir / HEADLINE_NOTE, trial_note(trial_dir))


def run_trial(
    spec: SweepSpec,
    recipe: str | None,
    overrides: list[str],
    params: dict[str, Any],
    trial_dir: Path,
    report: Reporter | None = None,
) -> TrialOutcome:
    """Run one trial to its objective; raises TrialPruned if `report` stopped it."""
    from lmforge.run import RunError, run_recipe

    cfg = trial_config(recipe, overrides, params, trial_dir)
    link_finished_stages(trial_dir.parent, trial_dir, cfg)
    write_json_atomic(trial_dir / "params.json", params)
    sign = 1.0 if spec.direction == "minimize" else -1.0
    write_trial_note(trial_dir)  # after params.json, which the note quotes
    with listening(trial_dir, cfg, report, sign) as state:
        try:
            run_recipe(None, cfg=cfg)
        except RunError as exc:
            if state["pruned"]:
                raise TrialPruned(str(trial_dir)) from None
            if "interrupted" in str(exc):
                raise SweepInterrupted(
                    f"sweep interrupted in {trial_dir}; run the same command again to resume"
                ) from None
            raise
    outcome = TrialOutcome(
        metric_value(trial_dir, spec.metric), executed=executed_stages(trial_dir)
    )
    for c in spec.constraints:
        value = metric_value(trial_dir, c.metric)
        outcome.constraint_values[c.metric] = value
        outcome.violations.append(c.violation(value))
    return outcome


def trial_note(run_dir: Path) -> str:
    """For the report card of a sweep's trial: which sweep, which values ("" otherwise)."""
    try:
        params = json.loads((run_dir / "params.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        params = None
    sweep_dir = run_dir.parent.parent
    if run_dir.parent.name != "trials" or not (sweep_dir / "study.db").exists():
        return ""
    values = ", ".join(f"{k} = {v}" for k, v in (params or {}).items())
    return (
        f"<p>Trial {html.escape(run_dir.name)} of the sweep in "
        f"<code>{html.escape(str(sweep_dir))}</code> ({html.escape(values)}); "
        'its report: <a href="../../report.html">report.html</a>.</p>'
    )
