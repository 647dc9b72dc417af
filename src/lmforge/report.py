"""The report card of a run: `report.html` (self-contained) and `report.md`.

It reads only what the stages left in the run folder (`stages.json`,
`prepared/data_report.json`, `tokens/*.json`, `pretrain/` and `finetune/`
metrics and summaries, `eval/`, `bias/`, `export/`, `arena/*.csv`: the vote
exports of web-app studies, see `arena_win_rates`, and `report_note.html`: a note
another tool left for the headline), so it can be rebuilt at any
time with `lmforge report RUN`. Plots are matplotlib PNGs, embedded in the HTML
as data URIs and written beside `report.md` in `report/`.

`compare_runs` puts several runs side by side and highlights config differences.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge import __version__
from lmforge.bias.audit import format_report
from lmforge.bias.pairs import wilson_interval
from lmforge.config import config_from_dict
from lmforge.energy import (
    CPU_WATTS_PER_CORE,
    GRID_KG_PER_KWH,
    PUE,
    co2_kg,
    device_power_w,
    energy_kwh,
)
from lmforge.eval.results import Result
from lmforge.fileio import iter_json_lines, write_text_atomic
from lmforge.hardware import cpu_model
from lmforge.model.transformer import count_params, flops_per_token
from lmforge.shards import FORMAT


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file ([] if there is none), up to a malformed line:
    a run that is still going may be writing its last line right now."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError, ValueError):
        for _, record in iter_json_lines(path):
            out.append(record)
    return out


def _read_csv(path: Path) -> list[dict[str, str]] | str:
    """The rows of a CSV file, or why it could not be read."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return f"could not be read as a UTF-8 CSV file ({exc})"


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
            return f"{x:.3g}"
        return f"{x:,.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


# ----------------------------------------------------------------------------- plots


def _plot(fn) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    fn(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _curves(
    ax: Any, groups: dict[str, list[dict[str, Any]]], key: str, style: str = "-", suffix: str = ""
) -> None:
    """One line of `key` against the step per labelled group of records."""
    for label, recs in groups.items():
        if recs:
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], style, label=label + suffix)


def _curve_plot(
    ylabel: str, *curves: tuple[dict[str, list[dict[str, Any]]], str, str, str]
) -> bytes:
    """A plot of (groups, key, style, label suffix) curves against the step."""

    def draw(ax: Any) -> None:
        for groups, key, style, suffix in curves:
            _curves(ax, groups, key, style, suffix)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()

    return _plot(draw)


def training_plots(metrics: dict[str, list[dict[str, Any]]]) -> dict[str, bytes]:
    """Loss, validation bits/byte (or loss), learning rate and throughput curves."""
    plots: dict[str, bytes] = {}
    series = {k: [r for r in v if "loss" in r] for k, v in metrics.items()}
    evals = {k: [r for r in v if "val_loss" in r] for k, v in metrics.items()}
    if any(series.values()):
        plots["loss"] = _curve_plot(
            "loss (nats/token)", (series, "loss", "-", " train"), (evals, "val_loss", "o--", " val")
        )
        plots["learning_rate"] = _curve_plot("learning rate", (series, "lr", "-", ""))
        plots["throughput"] = _curve_plot("tokens / s", (series, "tokens_per_s", "-", ""))
    bpb = {k: [r for r in v if "val_bpb" in r] for k, v in evals.items()}
    if any(bpb.values()):
        plots["val_bits_per_byte"] = _curve_plot(
            "validation bits / byte", (bpb, "val_bpb", "o-", "")
        )
    return plots


def funnel_plot(steps: list[dict[str, Any]]) -> bytes:
    def draw(ax):
        names = [s.get("name", "?") for s in steps]
        docs = [s.get("docs_out", 0) for s in steps]
        ax.barh(names[::-1], docs[::-1], color="#4a7ab5")
        ax.set_xlabel("documents after the step")

    return _plot(draw)


# ----------------------------------------------------------------------------- content


def environment() -> dict[str, Any]:
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    cpu = cpu_model()
    return {
        "lmforge": __version__ + (f" ({commit})" if commit else ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def compute_summary(summary: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Time, throughput, MFU, and estimated energy/CO2 (`lmforge.energy`) of a training
    stage on `device` ("cpu": this machine's cores, or "cuda")."""
    seconds = float(summary.get("elapsed_s", 0.0))
    kwh = energy_kwh(seconds / 3600, device_power_w(device))
    return {
        "wall time (s)": seconds,
        "steps": summary.get("step"),
        "tokens": summary.get("tokens"),
        "tokens/s (last interval)": summary.get("tokens_per_s"),
        "MFU": summary.get("mfu"),
        "peak FLOP/s used for MFU": summary.get("peak_flops"),
        "energy (kWh, estimated)": kwh,
        "CO2 (kg, estimated)": co2_kg(kwh),
        "non-finite steps skipped": summary.get("bad_steps"),
    }


# A note another tool leaves in a run for the top of its headline (an HTML fragment): a
# trial of `lmforge sweep` names its sweep and its values there. The report card shows it
# and knows nothing of the tool that wrote it.
HEADLINE_NOTE = "report_note.html"


def collect(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, as plain data."""
    run_dir = Path(run_dir)
    stages = _read_json(run_dir / "stages.json") or {}
    data: dict[str, Any] = {"run_dir": str(run_dir), "stages": stages, "environment": environment()}
    data["config"] = (
        (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    )
    data["data_report"] = _read_json(run_dir / "prepared" / "data_report.json")
    data["tokens"] = token_shard_headers(run_dir / "tokens")
    data["tokenizer"] = (stages.get("tokenizer") or {}).get("summary")
    for stage in ("pretrain", "finetune"):
        folder = run_dir / stage
        data[stage] = {
            "summary": _read_json(folder / "summary.json"),
            "metrics": _read_jsonl(folder / "metrics.jsonl"),
        }
    data["eval"] = _read_json(run_dir / "eval" / "eval.json")
    data["samples"] = _read_json(run_dir / "eval" / "samples.json")
    data["eval_outputs"] = _read_jsonl(run_dir / "eval" / "eval_outputs.jsonl")
    data["bias"] = _read_json(run_dir / "bias" / "bias.json")
    data["arena"] = {p.stem: _read_csv(p) for p in sorted((run_dir / "arena").glob("*.csv"))}
    data["export"] = (stages.get("export") or {}).get("summary")
    note = run_dir / HEADLINE_NOTE
    data["note"] = note.read_text(encoding="utf-8") if note.is_file() else ""
    return data


def token_shard_headers(tokens_dir: Path) -> dict[str, Any]:
    """Headers of the token shards: a `.json` beside its `.bin` in the shard format.

    The folder also holds files that are not shards (the completion marker
    `tokens_complete.json`, temporary files), which must not appear as shards.
    """
    headers = {}
    for path in sorted(tokens_dir.glob("*.json")):
        header = _read_json(path)
        if (
            isinstance(header, dict)
            and header.get("format") == FORMAT
            and path.with_suffix(".bin").exists()
        ):
            headers[path.stem] = header
    return headers


def _table(rows: list[tuple[str, Any]] | dict[str, Any], head: tuple[str, str] = ("", "")) -> str:
    items = rows.items() if isinstance(rows, dict) else rows
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in items
    )
    thead = (
        f"<tr><th>{html.escape(head[0])}</th><th>{html.escape(head[1])}</th></tr>"
        if any(head)
        else ""
    )
    return f"<table>{thead}{body}</table>"


def _grid(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{th}</tr>{trs}</table>"


def _flatten(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    if isinstance(obj, dict) and depth < 4:
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
        return out
    if isinstance(obj, list):
        if all(isinstance(x, (int, float, str)) for x in obj) and len(obj) <= 8:
            return [(prefix, ", ".join(_fmt(x) for x in obj))]
        return [(prefix, f"[{len(obj)} items]")]
    return [(prefix, obj)]


# The card opens with what the run was for (its numbers and samples); how it was
# made (data, model, compute, stage keys, environment, config) follows.
SECTIONS = [
    "Headline",
    "Evaluation",
    "Human evaluation",
    "Bias audit",
    "Samples",
    "Training curves",
    "Data",
    "Tokenizer",
    "Model",
    "Compute",
    "Export",
    "Stages",
    "Environment",
    "Config",
]

# The one metric per task that the headline quotes (the first present, in this order).
HEADLINE_METRICS = ("bits_per_byte", "acc_norm", "bleu", "chrf", "rougeL", "pct_stereotype")


def _result_text(record: dict[str, Any]) -> str:
    """'value ± stderr' or 'value [lo, hi]' of an eval.json result."""
    if record.get("value") is None:
        return "n/a"
    return Result(**record).formatted()


def headline(data: dict[str, Any]) -> str:
    """The numbers the run was made for: validation bits/byte, task scores, bias, a sample."""
    rows: list[tuple[str, Any]] = []
    pre = data["pretrain"].get("summary") or {}
    if pre.get("val_bpb") is not None:
        text = _fmt(pre["val_bpb"])
        if pre.get("unigram_bpb"):
            ratio = 100 * pre["val_bpb"] / pre["unigram_bpb"]
            text += f" (unigram baseline {_fmt(pre['unigram_bpb'])}: {ratio:.0f}% of it)"
        rows.append(("validation bits/byte (pre-training)", text))
    ft = data["finetune"].get("summary") or {}
    test = ft.get("test") or {}
    n = f", n={test['n']}" if "n" in test else ""
    for key, value in test.items():
        if key not in ("seconds", "n"):
            rows.append((f"fine-tuning test ({ft.get('task')}{n}): {key}", value))
    for c in (data.get("eval") or {}).get("checkpoints", []):
        label = c["checkpoint"].split(":")[0]
        by_task: dict[str, list[dict[str, Any]]] = {}
        for r in c["results"]:
            by_task.setdefault(r["task"], []).append(r)
        for task, results in by_task.items():
            pick = next(
                (r for m in HEADLINE_METRICS for r in results if r["metric"] == m), results[0]
            )
            rows.append((f"{label}: {task} {pick['metric']}", _result_text(pick)))
    bias = data.get("bias") or {}
    for c in bias.get("checkpoints", []):
        label = c.get("label") or c["checkpoint"]
        for bench, summ in (c.get("benchmarks") or {}).items():
            o = summ["overall"]
            text = f"{o['pct_stereotype']:.1f}% stereotype preferred [{o['ci_low']:.1f}, {o['ci_high']:.1f}]"
            for flag in summ.get("flags", []):
                text += f"; warning: {flag}"
            rows.append((f"{label}: {bench}", text))
    parts = [_table(rows, ("figure", "value"))] if rows else ["<p>No figures in this run.</p>"]
    parts.append(creative_block(data))
    for label, texts in (data.get("samples") or {}).items():
        if texts:
            parts.append(
                f"<h3>A sample ({html.escape(label)})</h3><pre>{html.escape(texts[0])}</pre>"
            )
    return "".join(parts)


CREATIVE_ROWS = {
    "perplexity": "held-out perplexity of the continuations",
    "bits_per_byte": "bits/byte of the continuations",
    "distinct_1": "distinct-1 (samples)",
    "distinct_2": "distinct-2",
    "distinct_3": "distinct-3",
    "self_bleu": "self-BLEU (lower = more diverse)",
    "repetition_4": "4-gram repetition within a sample",
    "length_words": "sample length (words)",
}


def creative_block(data: dict[str, Any]) -> str:
    """Creative-writing figures, one column per model, and the first prompts' samples."""
    cols: dict[str, dict[str, str]] = {}
    for c in (data.get("eval") or {}).get("checkpoints", []):
        got = {r["metric"]: _result_text(r) for r in c["results"] if r["task"] == "creative"}
        if got:
            cols[c["checkpoint"].split(":")[0]] = got
    if not cols:
        return ""
    rows = [[label] + [cols[m].get(key, "") for m in cols] for key, label in CREATIVE_ROWS.items()]
    parts = ["<h3>Creative writing</h3>", _grid(["figure", *cols], rows)]
    outs = [o for o in data.get("eval_outputs") or [] if o.get("task") == "creative"]
    for index in sorted({o["index"] for o in outs})[:2]:
        same = [o for o in outs if o["index"] == index]
        text = f"{same[0]['source']}\n\n--- held-out continuation:\n{same[0]['references'][0]}"
        for o in same:
            text += f"\n\n--- {o['checkpoint'].split(':')[0]}:\n{o['hypothesis']}"
        parts.append(f"<h3>Creative sample {index}</h3><pre>{html.escape(text)}</pre>")
    return "".join(parts)


def build_sections(data: dict[str, Any]) -> tuple[dict[str, str], dict[str, bytes]]:
    """HTML body per section, and the PNG plots."""
    plots: dict[str, bytes] = {}
    s = {
        "Headline": data.get("note", "") + headline(data),
        "Stages": stages_section(data["stages"]),
    }
    s["Data"] = data_section(data, plots)
    tok = data.get("tokenizer") or {}
    s["Tokenizer"] = _table(tok) if tok else "<p>The recipe used an existing tokenizer.</p>"
    s["Model"] = model_section(Path(data["run_dir"]))
    s["Compute"] = compute_section(data)
    metrics = {k: data[k]["metrics"] for k in ("pretrain", "finetune") if data[k]["metrics"]}
    plots.update(training_plots(metrics))
    s["Training curves"] = "" if metrics else "<p>No training metrics.</p>"
    s["Evaluation"] = evaluation_section(data)
    s["Human evaluation"] = arena_section(data.get("arena") or {})
    bias = data.get("bias")
    s["Bias audit"] = (
        f"<pre>{html.escape(_bias_text(bias))}</pre>"
        if bias
        else "<p>No bias stage in this run.</p>"
    )
    samples = data.get("samples") or {}
    s["Samples"] = (
        "".join(
            f"<h3>{html.escape(label)}</h3>"
            + "".join(f"<pre>{html.escape(t)}</pre>" for t in texts)
            for label, texts in samples.items()
        )
        or "<p>No samples.</p>"
    )
    s["Export"] = (
        _table(_flatten(data.get("export") or {}))
        if data.get("export")
        else "<p>No export stage in this run.</p>"
    )
    s["Environment"] = _table(data["environment"])
    s["Config"] = f"<pre>{html.escape(data.get('config', ''))}</pre>"
    return s, plots


def stages_section(stages: dict[str, Any]) -> str:
    return _grid(
        ["stage", "status", "seconds", "key"],
        [
            [k, "done" if v.get("done") else "incomplete", v.get("seconds", ""), v.get("key", "")]
            for k, v in stages.items()
            if k != "report"  # being written right now
        ],
    )


def data_section(data: dict[str, Any], plots: dict[str, bytes]) -> str:
    """The prepare stage's funnel and tables, then the token shards (adds the funnel plot)."""
    parts = []
    dr = data.get("data_report")
    if dr:
        steps = dr.get("steps", [])
        parts.append(
            _grid(
                ["step", "docs in", "docs out", "MB in", "MB out"],
                [
                    [
                        st.get("name"),
                        st.get("docs_in"),
                        st.get("docs_out"),
                        st.get("bytes_in", 0) / 1e6,
                        st.get("bytes_out", 0) / 1e6,
                    ]
                    for st in steps
                ],
            )
        )
        if steps:
            plots["data_funnel"] = funnel_plot(steps)
        parts.append("<h3>Removals by reason</h3>" + _table(dr.get("removals", {})))
        parts.append("<h3>Duplicates</h3>" + _table(_flatten(dr.get("dedup", {}))))
        parts.append("<h3>PII redacted</h3>" + _table(dr.get("pii", {})))
        parts.append("<h3>Licences</h3>" + _table(_flatten(dr.get("licenses", {}))))
        parts.append("<h3>Languages</h3>" + _table(dr.get("languages", {})))
    rows = [
        [
            name,
            h.get("n_documents"),
            h.get("n_tokens"),
            h.get("n_bytes"),
            h.get("n_bytes", 0) / max(h.get("n_tokens", 1), 1),
        ]
        for name, h in (data.get("tokens") or {}).items()
        if h
    ]
    if rows:
        parts.append(
            "<h3>Token shards</h3>"
            + _grid(["shard", "documents", "tokens", "bytes", "bytes/token"], rows)
        )
    return "".join(parts) or "<p>No data stage in this run.</p>"


def model_section(run_dir: Path) -> str:
    """Shape and parameter groups of the pre-trained model, from a checkpoint's config."""
    cfg_dict = None
    for p in (run_dir / "pretrain").glob("checkpoints/step_*/trainer_state.json"):
        cfg_dict = (_read_json(p) or {}).get("config")
    if not cfg_dict:
        return "<p>No pre-trained model.</p>"
    m = config_from_dict(cfg_dict).model
    arch = {
        "layers": m.n_layers,
        "width": m.d_model,
        "heads": m.n_heads,
        "kv heads": m.n_kv_heads or m.n_heads,
        "context": m.context_length,
        "vocabulary": m.vocab_size,
        "norm": m.norm,
        "positions": m.position,
        "MLP": m.mlp,
        "QK-norm": m.qk_norm,
        "tied embeddings": m.tie_embeddings,
        "objective": m.objective,
        "FLOPs per training token": flops_per_token(m),
    }
    return _table(arch) + "<h3>Parameters</h3>" + _table(count_params(m))


def compute_section(data: dict[str, Any]) -> str:
    device = run_device(data.get("config", ""))
    compute = []
    for stage in ("pretrain", "finetune"):
        summ = data[stage].get("summary")
        if summ:
            compute.append(f"<h3>{stage}</h3>" + _table(compute_summary(summ, device)))
    if not compute:
        return "<p>No training.</p>"
    power = (
        f"{CPU_WATTS_PER_CORE:.0f} W per CPU core"
        if device == "cpu"
        else f"{device_power_w(device):.0f} W per GPU (an H100's board power)"
    )
    return "".join(compute) + (
        f"<p class=note>Energy assumes {power}, PUE {PUE}; "
        f"CO2 at {GRID_KG_PER_KWH} kg/kWh. Estimates, not measurements.</p>"
    )


def run_device(config_text: str) -> str:
    """ "cuda" when the run's config.yaml sets `train.device: cuda`, else "cpu" (the rule
    of the model card, so that both cards estimate the same energy)."""
    try:
        cfg = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        return "cpu"
    train = cfg.get("train") if isinstance(cfg, dict) else None
    return "cuda" if isinstance(train, dict) and train.get("device") == "cuda" else "cpu"


def evaluation_section(data: dict[str, Any]) -> str:
    """Every task and metric per checkpoint, the fine-tuning test split, the unigram baseline."""
    ev = data.get("eval")
    parts = []
    if ev:
        by_metric: dict[tuple[str, str], list[Any]] = {}
        names = [c["checkpoint"].split(":")[0] for c in ev["checkpoints"]]
        for i, c in enumerate(ev["checkpoints"]):
            for r in c["results"]:
                cells = by_metric.setdefault((r["task"], r["metric"]), ["-"] * len(names))
                cells[i] = _result_text(r)
        parts.append(
            _grid(["task", "metric", *names], [[t, m, *v] for (t, m), v in by_metric.items()])
        )
    ft = data["finetune"].get("summary") or {}
    if ft.get("test"):
        parts.append(
            f"<h3>Fine-tuning task ({html.escape(str(ft.get('task')))}), test split</h3>"
            + _table(ft["test"])
        )
    pre = data["pretrain"].get("summary") or {}
    if pre.get("unigram_bpb"):
        parts.append(
            _table(
                {
                    "validation bits/byte (pre-training)": pre.get("val_bpb"),
                    "unigram baseline bits/byte": pre["unigram_bpb"],
                }
            )
        )
    return "".join(parts) or "<p>No evaluation stage in this run.</p>"


def _bias_text(bias: dict[str, Any]) -> str:
    """bias.json as `lmforge bias` prints it (the splits and warnings included)."""
    try:
        return format_report(bias)
    except (KeyError, TypeError, ValueError):  # a bias.json of another shape: show it as is
        return json.dumps(bias, indent=1)


PLOT_SECTION = {
    "data_funnel": "Data",
    "loss": "Training curves",
    "val_bits_per_byte": "Training curves",
    "learning_rate": "Training curves",
    "throughput": "Training curves",
}

CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0} h2{border-bottom:2px solid #4a7ab5;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f5fa} pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em;white-space:pre-wrap}
nav a{margin-right:.8em} img{max-width:100%;display:block;margin:.5em 0} .note{color:#666;font-size:.85em}
"""


# ----------------------------------------------------------------------------- arena studies


def arena_win_rates(votes: list[tuple[Any, str, str, str]]) -> list[dict[str, Any]]:
    """Per pair of models, the first model's win rate against the second, from votes
    (item, model_a, model_b, outcome) with outcome "a", "b", "tie" or "both_bad".

    The item, not the vote, is the unit: the annotators of one item judged the same two
    texts, so their votes are not independent. Each item goes to its majority of A and B
    votes; an item without one (ties, "both bad", an even split) counts half to each side.
    The 95% interval is Wilson's over the items.
    """
    margin: dict[tuple[str, str], dict[Any, int]] = {}
    n_votes: dict[tuple[str, str], int] = {}
    for item, model_a, model_b, outcome in votes:
        pair = (min(model_a, model_b), max(model_a, model_b))
        sign = {"a": 1, "b": -1}.get(outcome, 0) * (1 if model_a == pair[0] else -1)
        items = margin.setdefault(pair, {})
        items[item] = items.get(item, 0) + sign
        n_votes[pair] = n_votes.get(pair, 0) + 1
    rows = []
    for (first, second), items in sorted(margin.items()):
        n = len(items)
        wins = sum(m > 0 for m in items.values())
        losses = sum(m < 0 for m in items.values())
        points = wins + 0.5 * (n - wins - losses)
        low, high = wilson_interval(points, n)
        # Quote the pair from the side of the model that won more (the tuned one, one hopes).
        if points < n / 2:
            first, second, wins, losses = second, first, losses, wins
            points, low, high = n - points, 1.0 - high, 1.0 - low
        rows.append(
            {
                "model": first,
                "against": second,
                "items": n,
                "votes": n_votes[(min(first, second), max(first, second))],
                "wins": wins,
                "losses": losses,
                "undecided": n - wins - losses,
                "win_rate": points / n,
                "low": low,
                "high": high,
            }
        )
    return rows


def arena_section(studies: dict[str, list[dict[str, str]] | str]) -> str:
    """The "Human evaluation" section: win rates of each study exported into `arena/`."""
    if not studies:
        return (
            "<p>No study results. Put a study's vote export (the web app's results page, "
            "Export CSV) into the run's <code>arena/</code> folder and run "
            "<code>lmforge report RUN</code>: the study the preference file came from "
            "(before) beside the one that compares the tuned model with the base (after).</p>"
        )
    rows = []
    for name, votes in studies.items():
        if isinstance(votes, str):
            rows.append([name, votes, *[""] * 5])
            continue
        try:
            keyed = [(v["item"], v["model_a"], v["model_b"], v["outcome"]) for v in votes]
        except KeyError as exc:
            rows.append([name, f"not a vote export (no column {exc})", *[""] * 5])
            continue
        for r in arena_win_rates(keyed):
            interval = f"[{r['low']:.3f}, {r['high']:.3f}]"
            rows.append(
                [name, r["model"], r["against"], r["items"], r["votes"], r["win_rate"], interval]
            )
    return _grid(["study", "model", "against", "items", "votes", "win rate", "95% CI"], rows) + (
        "<p class=note>Each item counts once, won by its majority of votes (half to each "
        "side without one); 95% Wilson interval over the items.</p>"
    )


def _anchor(name: str) -> str:
    return name.lower().replace(" ", "-")


def render_html(title: str, sections: dict[str, str], plots: dict[str, bytes]) -> str:
    body = []
    for name in SECTIONS:
        imgs = "".join(
            f'<img alt="{key}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            for key, png in plots.items()
            if PLOT_SECTION.get(key) == name
        )
        body.append(
            f'<section id="{_anchor(name)}"><h2>{name}</h2>{imgs}{sections.get(name, "")}</section>'
        )
    nav = "".join(f'<a href="#{_anchor(n)}">{n}</a>' for n in SECTIONS)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class=note>lmforge report card, {stamp}</p><nav>{nav}</nav>{''.join(body)}</body></html>"
    )


def _html_to_markdown(fragment: str) -> str:
    """A plain-text rendering of a section for report.md (tables as pipes)."""
    text = fragment
    text = re.sub(r"<h3>(.*?)</h3>", r"\n### \1\n", text)
    text = re.sub(
        r"<pre>(.*?)</pre>", lambda m: "\n```\n" + m.group(1) + "\n```\n", text, flags=re.S
    )

    def table(m):
        rows = re.findall(r"<tr>(.*?)</tr>", m.group(0), flags=re.S)
        lines = []
        for i, row in enumerate(rows):
            cells = re.findall(r"<t[hd]>(.*?)</t[hd]>", row, flags=re.S)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            if i == 0:
                lines.append("|" + "---|" * len(cells))
        return "\n" + "\n".join(lines) + "\n"

    text = re.sub(r"<table>.*?</table>", table, text, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    return html.unescape(text).strip()


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.html, report.md and report/*.png into the run folder."""
    run_dir = Path(run_dir)
    data = collect(run_dir)
    sections, plots = build_sections(data)
    title = f"lmforge run: {run_dir.name}"
    out_html = run_dir / "report.html"
    write_text_atomic(out_html, render_html(title, sections, plots))
    img_dir = run_dir / "report"
    img_dir.mkdir(exist_ok=True)
    md = [f"# {title}", ""]
    for name in SECTIONS:
        md += [f"## {name}", ""]
        for key, png in plots.items():
            if PLOT_SECTION.get(key) == name:
                (img_dir / f"{key}.png").write_bytes(png)
                md += [f"![{key}](report/{key}.png)", ""]
        md += [_html_to_markdown(sections.get(name, "")), ""]
    write_text_atomic(run_dir / "report.md", "\n".join(md))
    return {"html": out_html, "markdown": run_dir / "report.md"}


# ----------------------------------------------------------------------------- compare


def _flat_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    return dict(_flatten(yaml.safe_load(path.read_text()) or {}, depth=-10))


def key_metrics(run_dir: Path) -> dict[str, Any]:
    data = collect(run_dir)
    out: dict[str, Any] = {}
    for stage in ("pretrain", "finetune"):
        summ = data[stage].get("summary") or {}
        for key in (
            "val_loss",
            "val_bpb",
            "unigram_bpb",
            "tokens_per_s",
            "mfu",
            "elapsed_s",
            "step",
        ):
            if key in summ:
                out[f"{stage}.{key}"] = summ[key]
        for key, value in (summ.get("test") or {}).items():
            out[f"{stage}.test.{key}"] = value
    ev = data.get("eval")
    if ev:
        for c in ev["checkpoints"]:
            label = c["checkpoint"].split(":")[0]
            for r in c["results"]:
                out[f"eval.{label}.{r['task']}.{r['metric']}"] = r["value"]
    return out


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """An HTML page with key metrics side by side and the config keys that differ highlighted."""
    runs = [Path(r) for r in run_dirs]
    names = [r.name for r in runs]
    metrics = [key_metrics(r) for r in runs]
    configs = [_flat_config(r) for r in runs]
    keys = sorted(set().union(*metrics))
    metric_rows = [[k, *[m.get(k) for m in metrics]] for k in keys]
    ckeys = sorted(set().union(*configs))
    crow = []
    for k in ckeys:
        vals = [c.get(k) for c in configs]
        differs = any(v != vals[0] for v in vals)
        cells = "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in vals)
        style = ' class="diff"' if differs else ""
        crow.append(f"<tr{style}><th>{html.escape(k)}</th>{cells}</tr>")
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>lmforge compare</title>"
        f"<style>{CSS} tr.diff td,tr.diff th{{background:#fff3c4;font-weight:bold}}</style></head><body>"
        f"<h1>Compare: {html.escape(' vs '.join(names))}</h1><h2>Key metrics</h2>"
        + _grid(["metric", *names], metric_rows)
        + f"<h2>Config (differences highlighted)</h2><table><tr><th>key</th>{head}</tr>{''.join(crow)}</table>"
        + "</body></html>"
    )
    out = Path(out)
    write_text_atomic(out, page)
    return out
