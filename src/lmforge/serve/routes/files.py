"""The files of runs (reports, plots, configs, metrics) for organisers, from inside the runs
folder only; `security.SecurityHeaders` serves them under a sandboxing CSP."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

from lmforge.serve.deps import Organiser
from lmforge.serve.models import safe_join
from lmforge.serve.state import State

router = APIRouter(dependencies=[Organiser])

# Files of a run the dashboard may serve (never the store itself, never weights).
SERVABLE_SUFFIXES = {".html", ".png", ".svg", ".jpg", ".json", ".jsonl", ".yaml", ".md", ".txt"}


@router.get("/files/{rel:path}")
def run_file(state: State, rel: str) -> Response:
    try:
        path = safe_join(state.runs_root, rel)
    except PermissionError:
        path = None
    if path is None or not path.is_file() or path.suffix.lower() not in SERVABLE_SUFFIXES:
        raise HTTPException(404, f"There is no file {rel!r} in the runs folder.")
    return FileResponse(path)
