"""What the arena's pages compute from a study: prompts from an upload, checkpoint labels,
the results page and the CSV export. Plain functions over the `Store`, no routes."""

from __future__ import annotations

import csv
import io
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from lmforge.serve import stats
from lmforge.serve.store import Store, Study

MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 20_000
MAX_UPLOAD_BYTES = 8_000_000
PROMPT_FIELDS = ("prompt", "instruction", "input", "text", "question")
CSV_COLUMNS = (
    "vote_id",
    "vote_uid",
    "time_utc",
    "annotator",
    "item",
    "prompt_idx",
    "prompt",
    "model_a",
    "model_b",
    "shown_left",
    "outcome",
    "winner",
    "ratings",
    "comment",
)


# ----------------------------------------------------------------------------- prompts


def study_prompts(typed: str, filename: str | None, data: bytes | None) -> list[str]:
    """The prompts of a new study: one per typed line, then those of the uploaded file."""
    prompts = [line.strip() for line in typed.splitlines() if line.strip()]
    if filename and data is not None:
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"{filename} is larger than {MAX_UPLOAD_BYTES:,} bytes.")
        prompts += parse_prompts(filename, data)
    if not prompts:
        raise HTTPException(400, "Give at least one prompt (typed, or in an uploaded file).")
    if len(prompts) > MAX_PROMPTS:
        raise HTTPException(400, f"{len(prompts)} prompts; at most {MAX_PROMPTS} per study.")
    too_long = [i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS]
    if too_long:
        raise HTTPException(
            400, f"prompt {too_long[0] + 1} is longer than {MAX_PROMPT_CHARS} characters."
        )
    return prompts


def parse_prompts(filename: str, data: bytes) -> list[str]:
    """Prompts from an uploaded file: .jsonl (a "prompt", "instruction", "input" or "text"
    field per line), .json (a list of strings or such objects), else one prompt per line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"{filename} is not UTF-8 text ({exc}).") from exc
    lower = filename.lower()
    if lower.endswith(".jsonl"):
        return [
            _prompt_of(_json(line, filename, n), f"{filename} line {n}")
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip()
        ]
    if lower.endswith(".json"):
        records = _json(text, filename)
        if not isinstance(records, list):
            raise HTTPException(400, f"{filename}: expected a JSON list of prompts.")
        return [_prompt_of(r, f"{filename} item {i + 1}") for i, r in enumerate(records)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _json(text: str, filename: str, line: int | None = None) -> Any:
    """`text` parsed, or a 400 naming the file and line (`line` for one line of JSONL)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = line if line is not None else exc.lineno
        raise HTTPException(400, f"{filename} line {where}: not valid JSON ({exc.msg}).") from exc


def _prompt_of(rec: Any, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        for f in PROMPT_FIELDS:
            if isinstance(rec.get(f), str) and rec[f].strip():
                return rec[f]
    raise HTTPException(400, f"{where}: no prompt field (one of {', '.join(PROMPT_FIELDS)}).")


def checkpoint_label(checkpoint: str) -> str:
    """A short name for a checkpoint: ``run/checkpoints/step_00000600`` → ``run@600``."""
    path = Path(checkpoint)
    if path.name.startswith("step_") and path.parent.name == "checkpoints":
        run = path.parent.parent
        step = path.name.removeprefix("step_").lstrip("0") or "0"
        return f"{run.as_posix() if str(run) != '.' else 'run'}@{step}"
    return path.as_posix()


# ----------------------------------------------------------------------------- results


def study_results(store: Store, study: Study) -> dict[str, Any]:
    """Everything the results page shows, computed from the stored votes."""
    labels = [m["label"] for m in study.models]
    judgments = store.judgments(study.id)
    votes = store.votes(study.id)
    prompts = store.prompts(study.id)
    wins = stats.head_to_head(judgments, labels)
    n = wins + wins.T
    matrix = [
        [(wins[i, j] / n[i, j]) if n[i, j] else None for j in range(len(labels))]
        for i in range(len(labels))
    ]
    return {
        "n_votes": len(votes),
        "n_items": len(prompts) * len(labels) * (len(labels) - 1) // 2,
        "labels": labels,
        "leaderboard": leaderboard(judgments, labels, wins),
        "matrix": matrix,
        "annotators": annotator_counts(votes),
        "invited": store.annotators(study.id),
        "agreement": stats.agreement(judgments),
        "rating_rows": rating_rows(study, votes),
        "comments": comments(votes, prompts),
    }


def leaderboard(judgments: list[stats.Judgment], labels: list[str], wins: Any) -> list[dict]:
    """A row per model, best Bradley-Terry rating first, with its interval and counts."""
    rates = {r["model"]: r for r in stats.win_rates(judgments, labels)}
    # One virtual tie per pair keeps a model that never won at a finite rating.
    strengths = stats.bradley_terry(wins, prior=1.0)
    rating = stats.to_elo_scale(strengths)
    low, high = stats.bootstrap_bt(judgments, labels, n_boot=200, prior=1.0)
    online = stats.elo(judgments, labels)
    rows = []
    for k, label in enumerate(labels):
        r = rates[label]
        rows.append(
            {
                "model": label,
                "bt": float(rating[k]),
                "low": float(low[k]),
                "high": float(high[k]),
                "strength": float(strengths[k]),
                "elo": online[label],
                **{key: r[key] for key in ("n", "wins", "losses", "ties", "both_bad", "win_rate")},
            }
        )
    rows.sort(key=lambda r: -r["bt"])
    return rows


def annotator_counts(votes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    per_annotator: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for v in votes:
        per_annotator[v["annotator"]][v["outcome"]] += 1
        per_annotator[v["annotator"]]["total"] += 1
    return [
        {"name": name, "total": counts["total"], **{o: counts[o] for o in stats.OUTCOMES}}
        for name, counts in sorted(per_annotator.items())
    ]


def rating_rows(study: Study, votes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The mean 1-5 rating of each (model, criterion)."""
    ratings: dict[tuple[str, str], list[int]] = defaultdict(list)
    label_of = {m["idx"]: m["label"] for m in study.models}
    for v in votes:
        for model_idx, crits in json.loads(v["ratings"]).items():
            for crit, value in crits.items():
                ratings[(label_of[int(model_idx)], crit)].append(int(value))
    return [
        {"model": m, "criterion": c, "mean": sum(vals) / len(vals), "n": len(vals)}
        for (m, c), vals in sorted(ratings.items())
    ]


def comments(votes: list[dict[str, Any]], prompts: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "annotator": v["annotator"],
            "prompt": prompts[v["prompt_idx"]],
            "comment": v["comment"],
            "outcome": {"a": v["label_a"], "b": v["label_b"]}.get(
                v["outcome"], v["outcome"].replace("_", " ")
            ),
            "a": v["label_a"],
            "b": v["label_b"],
        }
        for v in votes
        if v["comment"].strip()
    ]


# ----------------------------------------------------------------------------- export


def votes_csv(store: Store, study: Study) -> str:
    """Every vote of the study as CSV, one row per vote (spreadsheet formulas defused)."""
    prompts = store.prompts(study.id)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    labels = {m["idx"]: m["label"] for m in study.models}
    for v in store.votes(study.id):
        winner = {"a": v["label_a"], "b": v["label_b"]}.get(v["outcome"], "")
        ratings = {labels[int(k)]: r for k, r in json.loads(v["ratings"]).items()}
        row = (
            v["id"],
            v["vote_uid"],
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v["created"])),
            v["annotator"],
            v["item_id"],
            v["prompt_idx"],
            prompts[v["prompt_idx"]],
            v["label_a"],
            v["label_b"],
            labels[v["left_model"]],
            v["outcome"],
            winner,
            json.dumps(ratings) if ratings else "",
            v["comment"],
        )
        writer.writerow([csv_cell(x) for x in row])
    return out.getvalue()


def csv_cell(value: Any) -> Any:
    """Defuse spreadsheet formulas in exported text (a cell starting with = + - @ runs in Excel)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
