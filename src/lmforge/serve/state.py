"""What every route of `lmforge serve` shares, reached through one dependency.

`create_app` builds one `ServeState` and keeps it on ``app.state.serve``; a route asks
for it with a `State` parameter (``state: State``) instead of closing over globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates

from lmforge.serve.models import ModelPool, StudyGenerator
from lmforge.serve.openai_api import Batcher
from lmforge.serve.security import SecuritySettings
from lmforge.serve.store import Store


@dataclass
class ServeState:
    """The runs folder, the store, the loaded models and the page templates."""

    runs_root: Path
    store: Store
    pool: ModelPool
    generator: StudyGenerator
    batcher: Batcher
    security: SecuritySettings
    templates: Jinja2Templates


def serve_state(request: Request) -> ServeState:
    """The app's `ServeState` (a FastAPI dependency)."""
    state: ServeState = request.app.state.serve
    return state


State = Annotated[ServeState, Depends(serve_state)]
