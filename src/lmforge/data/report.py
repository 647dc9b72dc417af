"""`data_report.json` and its readable twin `data_report.md`.

The report says, for the whole run: documents, bytes and words in and out of every
step; removals by reason with examples; bad input by file and line; duplicate
clusters; PII counts by type; contamination per benchmark; languages; licences
(sources with an unknown licence are listed); throughput per step and overall.
Words are whitespace-separated tokens: a tokenizer-free measure that is the same
for every tokenizer the corpus may later meet. Step times are CPU seconds of the
worker process (so rates are per core and robust to other load on the machine);
the run's wall time is reported separately.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmforge.config import PrepareConfig
from lmforge.data.readers import Task, source_name
from lmforge.data.registry import load_plugins
from lmforge.data.steps import merge_step_stats
from lmforge.fileio import write_json_atomic, write_text_atomic

MB = 1e6


def _throughput(st: dict[str, Any]) -> dict[str, float | None]:
    s = st["seconds"]
    if s < 1e-3:  # not timed separately (mix, output): no rate rather than a silly one
        return {"docs_per_s": None, "mb_per_s": None}
    return {
        "docs_per_s": round(st["docs_in"] / s, 2),
        "mb_per_s": round(st["bytes_in"] / MB / s, 3),
    }


# Sections that other packages add to the report: name → (build, markdown). `build(cfg,
# steps)` gets the merged step statistics by step name and returns the section (None:
# nothing to say); `markdown(section)` renders it for data_report.md ("" for nothing).
# `lmforge.bias` adds "bias" (term statistics, counterfactual augmentation); `data` does
# not import it: the plug-in modules of `lmforge.data.registry` are imported by name, and register.
SectionBuilder = Callable[[PrepareConfig, dict[str, dict[str, Any]]], "dict[str, Any] | None"]
SectionMarkdown = Callable[[dict[str, Any]], str]
REPORT_SECTIONS: dict[str, tuple[SectionBuilder, SectionMarkdown]] = {}


def register_report_section(
    name: str, markdown: SectionMarkdown
) -> Callable[[SectionBuilder], SectionBuilder]:
    """Decorator: the decorated function builds section `name` of data_report.json,
    `markdown` renders it in data_report.md (see REPORT_SECTIONS)."""

    def add(build: SectionBuilder) -> SectionBuilder:
        REPORT_SECTIONS[name] = (build, markdown)
        return build

    return add


def registered_sections() -> dict[str, tuple[SectionBuilder, SectionMarkdown]]:
    """REPORT_SECTIONS, once the plug-in modules (`lmforge.data.registry`) have added theirs."""
    load_plugins()
    return REPORT_SECTIONS


def report_sections(cfg: PrepareConfig, by_name: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {name: build(cfg, by_name) for name, (build, _) in registered_sections().items()}


def build_report(
    cfg: PrepareConfig,
    tasks: list[Task],
    stage1: list[dict[str, Any]],
    dedup: dict[str, Any],
    stage3: list[dict[str, Any]],
    timing: dict[str, Any],
    retries: dict[str, Any] | None = None,
) -> dict[str, Any]:
    steps = _merged_steps(stage1 + stage3, dedup)
    by_name = {s["name"]: s for s in steps}
    removals: Counter[str] = Counter()
    for st in steps:
        removals.update(st["dropped"])
    output = by_name.get("output", {"counters": {}, "docs_out": 0, "bytes_out": 0, "words_out": 0})
    counters = output["counters"]
    languages = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("language:")}
    licenses = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("license:")}
    read = by_name.get(
        "read", {"dropped": {}, "examples": [], "docs_in": 0, "bytes_out": 0, "words_out": 0}
    )
    wall = max(timing["wall_seconds"], 1e-9)
    return {
        "format": "lmforge-data-report",
        "version": 1,
        "config": asdict(cfg),
        "sources": _sources(cfg, _per_source(stage1, stage3)),
        "unknown_license_sources": [
            source_name(s) for s in cfg.sources if s.license in ("", "unknown")
        ],
        "totals": _totals(len(tasks), read, output),
        "steps": steps,
        "removals": dict(removals.most_common()),
        "bad_input": {
            "counts": {k: v for k, v in read["dropped"].items()},
            "examples": [e for e in read["examples"]],
        },
        "dedup": dedup,
        "pii": dict(by_name["pii"]["counters"]) if "pii" in by_name else {},
        "decontamination": _contamination(cfg, by_name.get("decontaminate")),
        "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])),
        "licenses": licenses,
        "timing": timing,
        # Ray reruns a task whose worker or node died; what it reran, per stage
        "retries": retries or {"attempts": 0, "retried_tasks": 0, "retried": {}},
        **report_sections(cfg, by_name),
        "throughput": {
            "docs_per_s": round(read["docs_in"] / wall, 2),
            "mb_per_s": round(read["bytes_out"] / MB / wall, 3),
            "mb_per_s_per_core": round(read["bytes_out"] / MB / wall / timing["workers"], 3),
        },
    }


def _merged_steps(results: list[dict[str, Any]], dedup: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step's statistics summed over the tasks, with its throughput."""

    steps = [s.to_json() for s in merge_step_stats(results)]
    by_name = {s["name"]: s for s in steps}
    if "dedup" in by_name:
        by_name["dedup"]["seconds"] += dedup.get("seconds", 0.0)
    for st in steps:
        st["throughput"] = _throughput(st)
    return steps


def _per_source(
    stage1: list[dict[str, Any]], stage3: list[dict[str, Any]]
) -> dict[str, dict[str, int]]:
    """Files, inputs and documents read and written, per source."""
    per_source: dict[str, dict[str, int]] = {}
    for res in stage1:
        read = res["steps"][0]
        src = per_source.setdefault(res["source"], Counter())
        src.update(
            {
                "tasks": 1,
                "files": res["files"],
                "inputs_read": read["docs_in"],
                "bytes_read": read["bytes_out"],
                "after_filters": res["kept"],
            }
        )
    for res in stage3:
        out = res["steps"][-1]
        src = per_source.setdefault(res["source"], Counter())
        src.update(
            {
                "docs_out": out["docs_out"],
                "bytes_out": out["bytes_out"],
                "words_out": out["words_out"],
            }
        )
    return per_source


def _sources(cfg: PrepareConfig, per_source: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    return [
        {
            "name": source_name(s),
            "path": s.path,
            "kind": s.kind,
            "license": s.license,
            "weight": s.weight,
            **per_source.get(source_name(s), {}),
        }
        for s in cfg.sources
    ]


def _totals(tasks: int, read: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
    return {
        "tasks": tasks,
        "inputs_read": read["docs_in"],
        "docs_read": read.get("docs_out", 0),
        "bytes_read": read["bytes_out"],
        "words_read": read["words_out"],
        "docs_out": output["docs_out"],
        "bytes_out": output["bytes_out"],
        "words_out": output["words_out"],
    }


def _contamination(cfg: PrepareConfig, decontam: dict[str, Any] | None) -> dict[str, Any]:
    """Documents and n-gram hits per benchmark of `prepare.decontaminate`."""
    contamination: dict[str, Any] = {}
    for spec in cfg.decontaminate:
        c = decontam["counters"] if decontam else {}
        contamination[spec] = {
            "documents": c.get(f"documents:{spec}", 0),
            "ngram_hits": c.get(f"ngrams:{spec}", 0),
            "action": cfg.decontam_action,
        }
    return contamination


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt_mb(n: float) -> str:
    return f"{n / MB:,.2f}"


def render_markdown(r: dict[str, Any]) -> str:
    lines = _md_summary(r)
    lines += _md_sources(r)
    lines += _md_steps(r["steps"])
    lines += _md_dedup(r["dedup"])
    lines += ["", "## PII redacted", ""]
    lines += [f"- {k}: {v:,}" for k, v in r["pii"].items()] or ["- none"]
    lines += _md_decontamination(r["decontamination"])
    lines += ["", "## Languages (output)", ""]
    lines += [f"- {k}: {v:,}" for k, v in list(r["languages"].items())[:15]]
    lines += ["", "## Licences (output)", ""]
    lines += [f"- {k}: {v:,}" for k, v in r["licenses"].items()]
    lines += ["", "## Bad input", ""]
    lines += [f"- {k}: {v:,}" for k, v in r["bad_input"]["counts"].items()] or ["- none"]
    for e in r["bad_input"]["examples"][:10]:
        lines.append(f"  - {e['reason']}: {e['file']}:{e['line']} {e.get('detail', '')}")
    for name, (_, markdown) in registered_sections().items():
        text = markdown(r[name]) if r.get(name) else ""
        if text:
            lines += ["", text.rstrip("\n")]
    lines += ["", "## Examples of removed documents", ""]
    for st in r["steps"]:
        for e in st["examples"]:
            if st["name"] == "read":
                continue
            snippet = " ".join(str(e.get("snippet", "")).split())[:160]
            lines.append(f"- **{e['reason']}** `{e.get('id', '')}`: {snippet}")
    return "\n".join(lines) + "\n"


def _md_summary(r: dict[str, Any]) -> list[str]:
    """The opening paragraph (in → out, time, throughput) and the tasks rerun."""
    t = r["totals"]
    lines = [
        "# Data preparation report",
        "",
        f"{t['inputs_read']:,} inputs read ({_fmt_mb(t['bytes_read'])} MB, {t['words_read']:,} words) → "
        f"**{t['docs_out']:,} documents, {_fmt_mb(t['bytes_out'])} MB, {t['words_out']:,} words** "
        f"in {r['timing']['wall_seconds']:.1f} s with {r['timing']['workers']} {r['timing']['executor']} workers "
        f"({r['throughput']['mb_per_s']:.2f} MB/s, {r['throughput']['mb_per_s_per_core']:.2f} MB/s per core).",
    ]
    retried = r.get("retries", {}).get("retried", {})
    if retried:
        names = "; ".join(f"{stage}: {', '.join(tasks)}" for stage, tasks in retried.items())
        lines += ["", f"**Tasks rerun after a worker or node failure:** {names}."]
    return lines


def _md_table_head(title: str, columns: str, align: str) -> list[str]:
    """A section's heading and the first two lines of its Markdown table."""
    return ["", f"## {title}", "", columns, align]


def _md_sources(r: dict[str, Any]) -> list[str]:
    lines = _md_table_head(
        "Sources",
        "| source | kind | licence | weight | files | inputs | docs out | MB out |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    )
    for s in r["sources"]:
        lines.append(
            f"| {s['name']} | {s['kind']} | {s['license']} | {s['weight']:g} | {s.get('files', 0):,} | "
            f"{s.get('inputs_read', 0):,} | {s.get('docs_out', 0):,} | {_fmt_mb(s.get('bytes_out', 0))} |"
        )
    if r["unknown_license_sources"]:
        lines += ["", f"**Unknown licence:** {', '.join(r['unknown_license_sources'])}"]
    return lines


def _md_steps(steps: list[dict[str, Any]]) -> list[str]:
    lines = _md_table_head(
        "Steps",
        "| step | docs in | docs out | MB in | MB out | words in | words out | CPU s | MB/s per core | removed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    )
    for st in steps:
        dropped = ", ".join(
            f"{k} {v:,}" for k, v in sorted(st["dropped"].items(), key=lambda kv: -kv[1])
        )
        lines.append(
            f"| {st['name']} | {st['docs_in']:,} | {st['docs_out']:,} | {_fmt_mb(st['bytes_in'])} | "
            f"{_fmt_mb(st['bytes_out'])} | {st['words_in']:,} | {st['words_out']:,} | {st['seconds']:.2f} | "
            f"{_rate(st['throughput']['mb_per_s'])} | {dropped} |"
        )
    return lines


def _md_dedup(d: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Deduplication",
        "",
        f"{d.get('documents', 0):,} documents compared; exact: {d.get('exact_clusters', 0):,} clusters, "
        f"{d.get('exact_removed', 0):,} removed; near (MinHash, {d.get('bands', '-')} bands × {d.get('rows', '-')} rows): "
        f"{d.get('near_clusters', 0):,} clusters, {d.get('near_removed', 0):,} removed.",
    ]
    for c in d.get("exact_examples", [])[:5]:
        lines.append(f"- exact, {c['size']} copies: {', '.join(c['members'][:5])}")
    for c in d.get("largest_clusters", [])[:5]:
        lines.append(f"- near, cluster of {c['size']}: {', '.join(c['members'][:5])}")
    return lines


def _md_decontamination(contamination: dict[str, Any]) -> list[str]:
    if not contamination:
        return []
    lines = _md_table_head(
        "Decontamination", "| benchmark | documents | n-gram hits | action |", "|---|---:|---:|---|"
    )
    for name, c in contamination.items():
        lines.append(f"| {name} | {c['documents']:,} | {c['ngram_hits']:,} | {c['action']} |")
    return lines


def write_report(report: dict[str, Any], out: Path) -> None:
    write_json_atomic(out / "data_report.json", report)
    write_text_atomic(out / "data_report.md", render_markdown(report))


def load_report(out: Path) -> dict[str, Any]:
    return json.loads((out / "data_report.json").read_text(encoding="utf-8"))
