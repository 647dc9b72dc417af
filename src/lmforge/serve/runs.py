"""The run dashboard's view of a runs folder: which runs exist, their config, metrics and evals."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

# A run folder is one holding either of these; checkpoints/ and tokens/ hold no runs.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "sweep.json")
SKIP_DIRS = {"checkpoints", "tokens", "prepared", "__pycache__", "tensorboard"}
# metrics.jsonl written within this many seconds (and no newer summary.json): still training.
RUNNING_WINDOW_S = 120.0


def find_runs(runs_dir: Path, max_depth: int = 3) -> list[Path]:
    """Run folders under `runs_dir` (itself included), at most `max_depth` levels down."""
    root = runs_dir.resolve()
    found: list[Path] = []

    def visit(folder: Path, depth: int) -> None:
        if any((folder / m).is_file() for m in RUN_MARKERS):
            found.append(folder)
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if child.name in SKIP_DIRS or child.name.startswith("."):
                continue
            # Never follow a link out of the runs folder.
            if child.resolve().is_relative_to(root):
                visit(child, depth + 1)

    visit(root, 0)
    return found


def read_metrics(path: Path, since: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Records of `metrics.jsonl` from line `since` on, and the next line number.

    A last line without its newline is still being written and is left for the next poll;
    a malformed complete line is skipped (counted in the line number, so polling moves on).
    """
    if not path.is_file():
        return [], since
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")[:-1]  # everything before the last newline is complete
    records = []
    for line in lines[since:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            # NaN/inf are not JSON; the charts skip None.
            records.append(
                {
                    k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in rec.items()
                }
            )
    return records, len(lines)


def is_running(run: Path, now: float | None = None) -> bool:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return False
    mtime = metrics.stat().st_mtime
    summary = run / "summary.json"
    if summary.is_file() and summary.stat().st_mtime >= mtime:
        return False
    return (now or time.time()) - mtime < RUNNING_WINDOW_S


def run_summary(runs_dir: Path, run: Path) -> dict[str, Any]:
    """One line of the dashboard's run list."""
    records, _ = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    rel = run.relative_to(runs_dir.resolve())
    return {
        "path": "" if str(rel) == "." else str(rel),
        "name": run.name if str(rel) != "." else runs_dir.name,
        "running": is_running(run),
        "step": train[-1]["step"] if train else None,
        "loss": train[-1].get("loss") if train else None,
        "val_loss": evals[-1].get("val_loss") if evals else None,
        "has_eval": eval_json_path(run).is_file(),
        "has_report": (run / "report.html").is_file(),
        "updated": max((p.stat().st_mtime for p in run.iterdir() if p.is_file()), default=0.0),
    }


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """A nested JSON value as (dotted key, leaf) rows, for an evaluation table."""
    if isinstance(value, dict):
        rows = []
        for k, v in value.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rows = []
        for i, v in enumerate(value):
            rows += flatten(v, f"{prefix}[{i}]")
        return rows
    return [(prefix, value)]


def eval_json_path(run: Path) -> Path:
    """A run's eval.json: `lmforge eval` writes it at the top, `lmforge run` under eval/."""
    top = run / "eval.json"
    return (
        top
        if top.is_file() or not (run / "eval" / "eval.json").is_file()
        else run / "eval" / "eval.json"
    )


def eval_tables(path: Path) -> tuple[list[dict[str, Any]], str]:
    """eval.json as tables of ``title``, ``columns`` and ``rows``, and an error if unreadable.

    An lmforge eval.json becomes one table: a row per (task, metric), a column per
    checkpoint, each cell "value ± stderr" (or "value [lo, hi]"). Any other JSON is
    shown as key/value rows, one table per top-level section.
    """
    if not path.is_file():
        return [], ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [], f"{path.name} is not valid JSON: {exc}"
    if isinstance(data, dict) and data.get("lmforge_eval") == 1:
        try:
            return [metric_table(data)], ""
        except (KeyError, TypeError, ValueError) as exc:
            return [], f"{path.name} is not a readable lmforge eval.json: {exc!r}"
    if not isinstance(data, dict):
        return [_key_value("eval", flatten(data, "value"))], ""
    tables, loose = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append(_key_value(key, flatten(value)))
        else:
            loose += flatten(value, key)
    if loose:
        tables.insert(0, _key_value("summary", loose))
    return tables, ""


def _key_value(title: str, rows: list[tuple[str, Any]]) -> dict[str, Any]:
    return {"title": title, "columns": ["key", "value"], "rows": [list(r) for r in rows]}


def metric_table(data: dict[str, Any]) -> dict[str, Any]:
    """One row per (task, metric), one column per checkpoint (see `eval_tables`)."""
    from lmforge.eval.results import Result

    labels: list[str] = []
    cells: dict[tuple[str, str], dict[int, str]] = {}
    ns: dict[tuple[str, str], set[Any]] = {}
    for col, ckpt in enumerate(data["checkpoints"]):
        name = str(ckpt["checkpoint"])
        # `lmforge run` names checkpoints "LABEL: path"; `lmforge eval` by their path
        labels.append(name.split(":")[0] if ": " in name else "/".join(Path(name).parts[-2:]))
        for rec in ckpt["results"]:
            key = (str(rec["task"]), str(rec["metric"]))
            fields = {k: rec.get(k) for k in ("stderr", "ci_low", "ci_high")}
            value = rec.get("value")
            text = (
                "n/a"
                if value is None
                else Result(*key, value, rec.get("n", 0), **fields).formatted()
            )
            cells.setdefault(key, {})[col] = text
            ns.setdefault(key, set()).add(rec.get("n"))
    rows = [
        [task, metric, "/".join(str(n) for n in sorted(ns[(task, metric)], key=str))]
        + [per_col.get(c, "-") for c in range(len(labels))]
        for (task, metric), per_col in cells.items()
    ]
    return {"title": "Results", "columns": ["task", "metric", "n", *labels], "rows": rows}
