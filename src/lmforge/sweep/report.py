"""The sweep's report: sweep.json, best.yaml, key importances, plots, report.html/md.

Built from plain trial rows, so the Optuna and the Ray driver write the same report.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from lmforge.config import dump_yaml
from lmforge.fileio import write_json_atomic, write_text_atomic
from lmforge.report import _grid, _html_to_markdown, _plot, _read_jsonl
from lmforge.sweep.space import SweepSpec, distribution
from lmforge.sweep.trial import trial_config


def feasible(row: dict[str, Any]) -> bool:
    return row["state"] == "COMPLETE" and all(v <= 0 for v in row.get("violations") or [])


def best_row(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if feasible(r)]
    if not ok:
        return None
    sign = 1.0 if spec.direction == "minimize" else -1.0
    return min(ok, key=lambda r: (sign * r["value"], r["number"]))


def rows_from_study(study: Any) -> list[dict[str, Any]]:
    """One row per Optuna trial (enqueued, not yet started ones left out)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":
            continue
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "value": t.value,
                "seconds": t.user_attrs.get("seconds"),
                "trial_dir": t.user_attrs.get("trial_dir", ""),
                "executed": t.user_attrs.get("executed", []),
                "violations": t.user_attrs.get("violations", []),
                "constraint_values": t.user_attrs.get("constraint_values", {}),
                "error": t.user_attrs.get("error", ""),
                "retry_of": t.user_attrs.get("retry_of"),
                "pruned_at": t.last_step if t.state.name == "PRUNED" else None,
            }
        )
    return rows


def validation_curve(trial_dir: str | Path, pretrain_steps: int) -> list[tuple[int, float]]:
    """(step, val bits/byte or loss) of pre-training then fine-tuning, as the pruner saw it."""
    points: list[tuple[int, float]] = []
    for stage, offset in (("pretrain", 0), ("finetune", pretrain_steps)):
        for rec in _read_jsonl(Path(trial_dir) / stage / "metrics.jsonl"):
            value = rec.get("val_bpb", rec.get("val_loss"))
            if value is not None and "step" in rec:
                points.append((int(rec["step"]) + offset, float(value)))
    return points


def importances(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Optuna's default evaluator (PED-ANOVA) over the finished trials; {} if too few."""
    import optuna

    done = [r for r in rows if r["state"] == "COMPLETE" and set(r["params"]) == set(spec.params)]
    if len(done) < 3:
        return {}
    study = optuna.create_study(direction=spec.direction)
    dists = {k: distribution(p) for k, p in spec.params.items()}
    for r in done:
        study.add_trial(
            optuna.trial.create_trial(params=r["params"], distributions=dists, value=r["value"])
        )
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. every trial gave the same value
        return {}


def write_best_recipe(
    spec: SweepSpec,
    recipe: str | None,
    overrides: list[str],
    best: dict[str, Any],
    sweep_dir: Path,
) -> Path:
    """The best trial's fully resolved config, runnable as `lmforge run best.yaml`."""
    cfg = trial_config(recipe, overrides, best["params"], sweep_dir / "best-run")
    path = sweep_dir / "best.yaml"
    head = (
        f"# Best trial ({best['number']}) of the sweep in {sweep_dir}:\n"
        f"# {spec.metric} = {best['value']:.6g} ({spec.direction})\n"
        f"# values: {best['params']}\n"
        f"# Reproduce: lmforge run {path}\n"
    )
    write_text_atomic(path, head + dump_yaml(cfg))
    return path


def write_sweep_json(
    spec: SweepSpec, rows: list[dict[str, Any]], sweep_dir: Path, extra: dict | None = None
) -> dict[str, Any]:
    best = best_row(spec, rows)
    data = {
        "lmforge_sweep": 1,
        "spec": spec.to_dict(),
        "trials": rows,
        "best": best,
        **(extra or {}),
    }
    write_json_atomic(sweep_dir / "sweep.json", data)
    return data


# ----------------------------------------------------------------------------- plots


def _objective_plot(spec: SweepSpec, rows: list[dict[str, Any]]) -> bytes:
    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["number"])
    pick = min if spec.direction == "minimize" else max

    def draw(ax: Any) -> None:
        xs = [r["number"] for r in done]
        ys = [r["value"] for r in done]
        ax.scatter(xs, ys, s=18, label="trial")
        best = [pick(ys[: i + 1]) for i in range(len(ys))]
        ax.step(xs, best, where="post", color="C1", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(spec.metric)
        ax.legend(fontsize=8)

    return _plot(draw)


def _axis_values(spec: SweepSpec, key: str, values: list[Any]) -> list[float]:
    """Parameter values on a 0–1 axis (log scale where the space is; categories by index)."""
    p = spec.params[key]
    if p.type == "categorical":
        idx = [p.choices.index(v) if v in p.choices else 0 for v in values]
        return [i / max(len(p.choices) - 1, 1) for i in idx]
    lo, hi = (math.log(p.low), math.log(p.high)) if p.log else (p.low, p.high)
    f = (lambda v: math.log(v)) if p.log else float
    return [(f(v) - lo) / (hi - lo) for v in values]


def _parallel_plot(spec: SweepSpec, rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    done = [r for r in rows if r["state"] == "COMPLETE" and set(r["params"]) == set(spec.params)]
    keys = list(spec.params)
    values = [r["value"] for r in done]
    lo, hi = min(values), max(values)

    def draw(ax: Any) -> None:
        cmap = matplotlib.colormaps["viridis_r" if spec.direction == "minimize" else "viridis"]
        cols = [_axis_values(spec, k, [r["params"][k] for r in done]) for k in keys]
        for i, r in enumerate(done):
            y = [c[i] for c in cols] + [(r["value"] - lo) / ((hi - lo) or 1.0)]
            ax.plot(range(len(y)), y, color=cmap((r["value"] - lo) / ((hi - lo) or 1.0)), lw=1.2)
        ax.set_xticks(range(len(keys) + 1), [*keys, spec.metric], fontsize=7, rotation=15)
        ax.set_yticks([0, 1], ["low", "high"])

    return _plot(draw)


def _curves_plot(rows: list[dict[str, Any]], curves: dict[int, list]) -> bytes:
    def draw(ax: Any) -> None:
        for r in rows:
            pts = curves.get(r["number"]) or []
            if pts:
                style = ":" if r["state"] == "PRUNED" else "-"
                # markers: a trial pruned at its first validation is a single point
                ax.plot(
                    *zip(*pts, strict=True), style, lw=1, marker="o", ms=3, label=f"#{r['number']}"
                )
        ax.set_xlabel("step (fine-tuning after pre-training)")
        ax.set_ylabel("validation (bits/byte or loss)")
        if len(rows) <= 12:
            ax.legend(fontsize=6, ncol=2)

    return _plot(draw)


def plots(spec: SweepSpec, rows: list[dict[str, Any]], pretrain_steps: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if any(r["state"] == "COMPLETE" for r in rows):
        out["objective"] = _objective_plot(spec, rows)
        out["parallel_coordinates"] = _parallel_plot(spec, rows)
    curves = {r["number"]: validation_curve(r["trial_dir"], pretrain_steps) for r in rows}
    if any(curves.values()):
        out["validation_curves"] = _curves_plot(rows, curves)
    return out


# ----------------------------------------------------------------------------- report


def _sections(data: dict[str, Any], best_path: Path | None, command: str) -> dict[str, str]:
    spec, rows, best = data["spec"], data["trials"], data["best"]
    keys = list(spec["params"])
    s: dict[str, str] = {}
    if best:
        s["Best trial"] = _grid(
            ["trial", spec["metric"], *keys],
            [[best["number"], best["value"], *(best["params"].get(k) for k in keys)]],
        ) + (f"<p>Reproduce: <code>lmforge run {html.escape(str(best_path))}</code></p>")
    else:
        s["Best trial"] = "<p>No trial has finished (within the constraints) yet.</p>"
    s["Trials"] = _grid(
        ["#", "state", spec["metric"], *keys, "seconds", "ran"],
        [
            [
                r["number"],
                r["state"],
                r["value"] if r["value"] is not None else "",
                *(r["params"].get(k) for k in keys),
                r.get("seconds") or "",
                ", ".join(r.get("executed") or []),
            ]
            for r in rows
        ],
    )
    imp = data.get("importances") or {}
    s["Importance of each key"] = (
        _grid(["key", "importance"], [[k, v] for k, v in imp.items()])
        if imp
        else "<p>Needs at least three finished trials whose values differ.</p>"
    )
    s["Command"] = f"<pre>{html.escape(command)}</pre>"
    return s


PLOT_TITLES = {
    "objective": "Objective over trials",
    "parallel_coordinates": "Parallel coordinates",
    "validation_curves": "Validation curves",
}


def write_report(
    spec: SweepSpec,
    rows: list[dict[str, Any]],
    sweep_dir: Path,
    recipe: str | None,
    overrides: list[str],
    command: str,
) -> dict[str, Any]:
    """Everything the sweep leaves: sweep.json, best.yaml, report/*.png, report.html/md."""
    best = best_row(spec, rows)
    best_path = write_best_recipe(spec, recipe, overrides, best, sweep_dir) if best else None
    pre_steps = trial_config(recipe, overrides, {}, sweep_dir).train.max_steps
    for r in rows:
        r["curve"] = validation_curve(r["trial_dir"], pre_steps) if r["trial_dir"] else []
    extra = {
        "importances": importances(spec, rows),
        "best_recipe": str(best_path) if best_path else None,
        "command": command,
    }
    data = write_sweep_json(spec, rows, sweep_dir, extra)
    pngs = plots(spec, rows, pre_steps)
    img_dir = sweep_dir / "report"
    img_dir.mkdir(exist_ok=True)
    sections = _sections(data, best_path, command)
    title = f"lmforge sweep: {sweep_dir.name}"
    body, md = [], [f"# {title}", ""]
    for name, png in pngs.items():
        (img_dir / f"{name}.png").write_bytes(png)
    for name, fragment in sections.items():
        body.append(f"<h2>{html.escape(name)}</h2>{fragment}")
        md += [f"## {name}", "", _html_to_markdown(fragment), ""]
    body.append("<h2>Plots</h2>")
    md += ["## Plots", ""]
    for name, png in pngs.items():
        uri = base64.b64encode(png).decode()
        body.append(
            f'<h3>{PLOT_TITLES[name]}</h3><img alt="{name}" src="data:image/png;base64,{uri}">'
        )
        md += [f"![{PLOT_TITLES[name]}](report/{name}.png)", ""]
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
        "</title><style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;"
        "padding:.2em .5em}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{''.join(body)}</body></html>"
    )
    (sweep_dir / "report.html").write_text(page, encoding="utf-8")
    (sweep_dir / "report.md").write_text("\n".join(md), encoding="utf-8")
    return data


# ----------------------------------------------------------------------------- web app


def sweep_view(folder: Path) -> dict[str, Any] | None:
    """What the web app's run page shows of a sweep folder (None if it is not one)."""
    from lmforge.report import _read_json

    data = _read_json(folder / "sweep.json")
    if not isinstance(data, dict) or data.get("lmforge_sweep") != 1:
        return None
    keys = list(data["spec"]["params"])
    return {
        "metric": data["spec"]["metric"],
        "keys": keys,
        "best": data.get("best"),
        "best_recipe": "best.yaml" if (folder / "best.yaml").is_file() else "",
        "rows": [
            [t["number"], t["state"], t["value"], *(t["params"].get(k) for k in keys)]
            for t in data["trials"]
        ],
        "importances": list((data.get("importances") or {}).items()),
        "plots": [
            (PLOT_TITLES[name], f"report/{name}.png")
            for name in PLOT_TITLES
            if (folder / "report" / f"{name}.png").is_file()
        ],
    }
