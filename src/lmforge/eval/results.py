"""Evaluation results: `eval.json` and a printed table, several checkpoints side by side.

`eval.json` layout::

    {"lmforge_eval": 1,
     "settings": {...},                       # command-wide settings
     "checkpoints": [
        {"checkpoint": "runs/a/checkpoints/step_000100",
         "results": [{"task": "hellaswag", "metric": "acc_norm", "value": 0.27,
                      "stderr": 0.014, "ci_low": null, "ci_high": null,
                      "n": 1000, "settings": {...}}, ...]},
        ...]}

Generation tasks (translation, summarization) also save what the model wrote:
``eval_outputs.jsonl`` beside ``eval.json``, one line per example with
``checkpoint, task, data, index, source, references, hypothesis``; the result's
``settings.outputs`` names the file.

Every figure carries its uncertainty: a standard error (accuracies: sample
standard deviation / √n, as lm-evaluation-harness reports) or a 95% bootstrap
interval (BLEU, chrF, ROUGE), and the number of examples it rests on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.fileio import write_json_atomic, write_text_atomic


@dataclass
class Result:
    task: str
    metric: str
    value: float
    n: int
    stderr: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    # Generation tasks: one record per example (source, references, hypothesis); written by
    # `write_eval_json` to a JSONL file beside eval.json, not into eval.json itself.
    outputs: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("outputs")
        for key in ("value", "stderr", "ci_low", "ci_high"):
            v = d[key]
            if isinstance(v, float) and not math.isfinite(v):
                d[key] = None  # JSON has no NaN
        return d

    def formatted(self) -> str:
        """'value ± stderr' or 'value [lo, hi]'."""
        digits = 4 if abs(self.value) < 10 else 2
        text = f"{self.value:.{digits}f}"
        if self.stderr is not None and math.isfinite(self.stderr):
            text += f" ± {self.stderr:.{digits}f}"
        elif self.ci_low is not None and self.ci_high is not None:
            text += f" [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"
        return text


@dataclass
class CheckpointResults:
    checkpoint: str
    results: list[Result] = field(default_factory=list)


def to_json(runs: list[CheckpointResults], settings: dict[str, Any] | None = None) -> dict:
    return {
        "lmforge_eval": 1,
        "settings": settings or {},
        "checkpoints": [
            {"checkpoint": r.checkpoint, "results": [x.to_dict() for x in r.results]} for r in runs
        ],
    }


def write_eval_json(
    path: str | Path, runs: list[CheckpointResults], settings: dict[str, Any] | None = None
) -> Path:
    """Write atomically (temporary file, then rename) so a reader never sees half a file.

    Outputs of generation tasks go to `outputs_path(path)` (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_outputs(outputs_path(path), runs)
    write_json_atomic(path, to_json(runs, settings))
    return path


def outputs_path(eval_json: str | Path) -> Path:
    """Where the generation outputs of an eval.json go: ``eval_outputs.jsonl`` beside it."""
    eval_json = Path(eval_json)
    return eval_json.with_name(f"{eval_json.stem}_outputs.jsonl")


def _write_outputs(path: Path, runs: list[CheckpointResults]) -> None:
    lines = []
    for run in runs:
        for r in run.results:
            if r.outputs is None:
                continue
            r.settings["outputs"] = path.name
            head = {"checkpoint": run.checkpoint, "task": r.task, "data": r.settings.get("data")}
            lines += [json.dumps({**head, **rec}, ensure_ascii=False) for rec in r.outputs]
    if lines:
        write_text_atomic(path, "\n".join(lines) + "\n")


def mean_and_stderr(values: list[int] | list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation, n - 1, over
    sqrt(n)); NaN where undefined (no values; one value for the error)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def read_eval_json(path: str | Path) -> list[CheckpointResults]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("lmforge_eval") != 1:
        raise ValueError(f"{path}: not an lmforge eval.json")
    return [
        CheckpointResults(c["checkpoint"], [Result(**r) for r in c["results"]])
        for c in data["checkpoints"]
    ]


def format_table(runs: list[CheckpointResults]) -> str:
    """One row per (task, metric), one column per checkpoint."""
    rows: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, int], str] = {}
    ns: dict[tuple[str, str], set[int]] = {}
    for col, run in enumerate(runs):
        for r in run.results:
            key = (r.task, r.metric)
            if key not in ns:
                rows.append(key)
                ns[key] = set()
            ns[key].add(r.n)
            cells[(*key, col)] = r.formatted()
    header = ["task", "metric", "n", *[_short(r.checkpoint) for r in runs]]
    body = [
        [t, m, "/".join(str(n) for n in sorted(ns[(t, m)]))]
        + [cells.get((t, m, c), "-") for c in range(len(runs))]
        for t, m in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def _short(checkpoint: str) -> str:
    """The last two path parts: enough to tell runs and steps apart in a header."""
    parts = Path(checkpoint).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else checkpoint
