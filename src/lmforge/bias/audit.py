"""The bias audit of one or more checkpoints, side by side: `bias.json`.

`bias.json` layout::

    {"lmforge_bias": 1,
     "settings": {...},
     "summary": {LABEL: {"crows_pairs": {"overall": 55.2, "gender": 57.6, ...}}},
     "checkpoints": [
        {"checkpoint": "runs/a",
         "benchmarks": {"crows_pairs": {"scorer": "causal", "overall": {...},
                                        "by_category": {...}, "by_direction": {...}}},
         "probes": {"gender": {...}, ...},            # lmforge.bias.probes summary
         "results": [...]},                           # the same figures as eval.json Results
        ...],
     "comparisons": [                                 # each later checkpoint against the first
        {"a": "runs/a", "b": "runs/b", "benchmark": "crows_pairs",
         "overall": {"difference": ..., "ci_low": ..., "ci_high": ..., "mcnemar_p": ...},
         "by_category": {...}}]}

Figures are percentages of sets where the stereotypical sentence is preferred
(50 = no preference on pairs) with 95% Wilson intervals; comparisons are B − A
in percentage points with paired bootstrap intervals (`lmforge.bias.pairs`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lmforge.bias.lexicon import Lexicon
from lmforge.bias.pairs import (
    MinimalSet,
    PairScores,
    compare_paired,
    load_crows_pairs,
    load_minimal_pairs,
    score_pairs,
    summary_table,
)
from lmforge.bias.probes import ProbeSpec, run_probes


def load_benchmarks(specs: list[str], limit: int = 0) -> dict[str, list[MinimalSet]]:
    """``crows_pairs`` (the shared copy), ``PATH`` or ``NAME=PATH`` minimal-pairs files."""
    out: dict[str, list[MinimalSet]] = {}
    for spec in specs or ["crows_pairs"]:
        if spec == "crows_pairs":
            out["crows_pairs"] = load_crows_pairs(limit=limit)
            continue
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        out[name] = load_minimal_pairs(path, limit)
    return out


def audit_model(
    model: Any,
    tok: Any,
    benchmarks: dict[str, list[MinimalSet]],
    probes: bool = True,
    lexicon: Lexicon | None = None,
    spec: ProbeSpec | None = None,
    axes: list[str] | None = None,
    samples: int = 3,
    max_new_tokens: int = 24,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, PairScores]]:
    """One checkpoint's entry of bias.json, and its raw pair scores (for comparisons)."""
    entry: dict[str, Any] = {"benchmarks": {}, "results": [], "seconds": {}}
    scores: dict[str, PairScores] = {}
    for name, sets in benchmarks.items():
        t0 = time.perf_counter()
        sc = score_pairs(model, tok, sets)
        scores[name] = sc
        entry["benchmarks"][name] = sc.summary()
        entry["results"] += [r.to_dict() for r in sc.to_results(name)]
        entry["seconds"][name] = round(time.perf_counter() - t0, 2)
    if probes:
        t0 = time.perf_counter()
        pr = run_probes(
            model, tok, lexicon, spec, axes, samples, max_new_tokens=max_new_tokens, seed=seed
        )
        entry["probes"] = pr["summary"]
        entry["probe_details"] = pr.get("details", {})
        entry["seconds"]["probes"] = round(time.perf_counter() - t0, 2)
    return entry, scores


def bias_audit(
    checkpoints: list[str],
    benchmarks: list[str] | None = None,
    limit: int = 0,
    probes: bool = True,
    lexicon: Lexicon | None = None,
    spec: ProbeSpec | None = None,
    axes: list[str] | None = None,
    samples: int = 3,
    max_new_tokens: int = 24,
    seed: int = 0,
    device: str = "cpu",
    labels: list[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Audit checkpoints (run folders or checkpoint folders) and compare them to the first.

    `labels` name the checkpoints in the ``summary`` (default: their paths).
    """
    from lmforge.pretrain import load_model

    sets = load_benchmarks(benchmarks or [], limit)
    report: dict[str, Any] = {
        "lmforge_bias": 1,
        "settings": {
            "benchmarks": {k: len(v) for k, v in sets.items()},
            "limit": limit,
            "probes": probes,
            "axes": axes,
            "samples": samples,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "lexicon": (lexicon or Lexicon()).source,
        },
        "summary": {},
        "checkpoints": [],
        "comparisons": [],
    }
    labels = labels or [str(c) for c in checkpoints]
    all_scores = []
    for ckpt, label in zip(checkpoints, labels, strict=True):
        model, tok, _ = load_model(ckpt, device=device)
        entry, scores = audit_model(
            model, tok, sets, probes, lexicon, spec, axes, samples, max_new_tokens, seed
        )
        report["checkpoints"].append({"checkpoint": str(ckpt), "label": label, **entry})
        report["summary"][label] = {
            name: {
                "overall": summ["overall"]["pct_stereotype"],
                **{c: f["pct_stereotype"] for c, f in summ["by_category"].items()},
            }
            for name, summ in entry["benchmarks"].items()
        }
        all_scores.append(scores)
        log(f"{ckpt}: bias audit done ({sum(entry['seconds'].values()):.1f}s)")
    for i in range(1, len(checkpoints)):
        for name in sets:
            a, b = all_scores[0][name], all_scores[i][name]
            cats = sorted({s.category for s in a.sets})
            report["comparisons"].append(
                {
                    "a": str(checkpoints[0]),
                    "b": str(checkpoints[i]),
                    "benchmark": name,
                    "overall": compare_paired(a, b),
                    "by_category": {c: compare_paired(a, b, category=c) for c in cats},
                }
            )
    return report


def write_bias_json(path: str | Path, report: dict[str, Any]) -> Path:
    """Atomic write (temporary file, then rename); NaN becomes null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(report), indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def format_report(report: dict[str, Any]) -> str:
    """The tables printed by `lmforge bias`."""
    lines: list[str] = []
    names = [c["checkpoint"] for c in report["checkpoints"]]
    short = [_short(n) for n in names]
    for bench in report["settings"]["benchmarks"]:
        lines.append(f"{bench}: % stereotypical preferred [95% Wilson CI] (50 = unbiased)")
        lines.append(
            summary_table(
                {
                    s: c["benchmarks"][bench]
                    for s, c in zip(short, report["checkpoints"], strict=True)
                }
            )
        )
        for s, c in zip(short, report["checkpoints"], strict=True):
            cut = c["benchmarks"][bench].get("truncated_sets", 0)
            if cut:
                lines.append(f"warning: {s}: {cut} sets had a sentence longer than the context")
        lines.append("")
    for comp in report["comparisons"]:
        o = comp["overall"]
        lines.append(
            f"{comp['benchmark']}: {_short(comp['b'])} − {_short(comp['a'])} = {o['difference']:+.1f} pts "
            f"[{o['ci_low']:+.1f}, {o['ci_high']:+.1f}] (paired bootstrap), McNemar p = {o['mcnemar_p']:.3f}"
        )
    probe_rows = []
    for s, c in zip(short, report["checkpoints"], strict=True):
        for axis, p in (c.get("probes") or {}).items():
            row = (
                f"{s}  {axis}: occupation gap {p['occupation_mean_gap']:.3f} nats, "
                f"trait gap {p['trait_mean_gap']:.3f} nats"
            )
            if "continuation_sentiment_gap" in p:
                row += f", continuation sentiment gap {p['continuation_sentiment_gap']:.3f}"
            probe_rows.append(row)
    if probe_rows:
        lines += ["", "template probes (mean log-prob gap between groups; 0 = none):", *probe_rows]
    return "\n".join(lines).rstrip() + "\n"


def _short(checkpoint: str) -> str:
    parts = Path(checkpoint).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else checkpoint
