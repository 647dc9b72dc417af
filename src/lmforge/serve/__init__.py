"""`lmforge serve`: human-evaluation arena, chat playground and run dashboard (FastAPI).

`create_app(runs_dir, ...)` builds the app; `lmforge.serve.cli` runs it with uvicorn.
FastAPI is imported on first use only: every `lmforge` command builds the parser,
which imports `lmforge.serve.cli`, and should not pay for the web stack (≈ 1 s).
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from lmforge.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")
