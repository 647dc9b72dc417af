"""`lmforge serve`: human-evaluation arena, chat playground and run dashboard (FastAPI).

`create_app(runs_dir, ...)` builds the app; `lmforge.serve.cli` runs it with uvicorn.
"""

from lmforge.serve.app import create_app

__all__ = ["create_app"]
