"""The run dashboard: the runs under the runs folder, each run's page and live metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from lmforge.serve.deps import Organiser
from lmforge.serve.models import find_checkpoints, safe_join
from lmforge.serve.pages import render
from lmforge.serve.runs import (
    eval_json_path,
    eval_tables,
    find_runs,
    is_running,
    read_metrics,
    run_summary,
)
from lmforge.serve.state import State

router = APIRouter(dependencies=[Organiser])


def run_folder(runs_root: Path, rel: str) -> Path:
    """The run folder `rel` names inside the runs folder, or 404."""
    try:
        path = safe_join(runs_root, rel)
    except PermissionError as exc:
        raise HTTPException(404, f"There is no run {rel!r}.") from exc
    if not path.is_dir() or path not in set(find_runs(runs_root)):
        raise HTTPException(404, f"There is no run {rel!r}.")
    return path


@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request, state: State) -> Response:
    runs = [run_summary(state.runs_root, r) for r in find_runs(state.runs_root)]
    runs.sort(key=lambda r: r["updated"], reverse=True)
    return render(request, "runs.html", runs=runs, runs_dir=str(state.runs_root))


@router.get("/runs/{rel:path}", response_class=HTMLResponse)
def run_page(request: Request, state: State, rel: str) -> Response:
    from lmforge.sweep.report import sweep_view

    root = state.runs_root
    path = run_folder(root, rel)
    config = path / "config.yaml"
    tables, eval_error = eval_tables(eval_json_path(path))
    checkpoints = sorted(
        c for c in find_checkpoints(root) if safe_join(root, c).parent.parent == path
    )
    return render(
        request,
        "run.html",
        rel=rel,
        name=path.name,
        config=config.read_text(encoding="utf-8", errors="replace") if config.is_file() else "",
        eval_tables=tables,
        eval_error=eval_error,
        has_report=(path / "report.html").is_file(),
        has_metrics=(path / "metrics.jsonl").is_file(),
        running=is_running(path),
        checkpoints=checkpoints,
        sweep=sweep_view(path),  # a sweep folder (lmforge sweep): its trials and plots
    )


@router.get("/api/metrics/{rel:path}")
def metrics_api(state: State, rel: str, since: int = 0) -> dict[str, Any]:
    path = run_folder(state.runs_root, rel)
    records, nxt = read_metrics(path / "metrics.jsonl", max(since, 0))
    return {"records": records, "next": nxt, "running": is_running(path)}
