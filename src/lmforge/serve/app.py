"""The `lmforge serve` web app: human-evaluation arena, chat playground, run dashboard.

Server-rendered HTML (Jinja, autoescaped) with a little vanilla JavaScript in
`static/app.js`; no build step. Who may see what:

- organisers (a token, checked against its SHA-256 in the store, exchanged at /login
  for an expiring server-side session kept in an http-only cookie) see everything;
- annotators open an invitation link ``/a/<token>``, which puts their token in a
  cookie and sends them to their one study; they can reach only that study's
  voting page;
- everything else gets a clear error page (JSON under /api/).

The routes live in `lmforge.serve.routes`, one router per area (sign-in, arena, chat,
dashboard, files, the OpenAI-compatible API); they reach the shared `state.ServeState`
through a dependency and declare who may call them with the dependencies of
`lmforge.serve.deps` (organiser session, annotator invitation, CSRF token).

Every form carries a CSRF token that must match a same-site cookie (double
submit); `security.RequestGuard` checks Host, Origin, body sizes and sign-in before
any route runs. A Content-Security-Policy allows scripts only from /static, so even
text that slipped past the escaping could not run. Files are served only from inside
the runs folder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from lmforge.serve import security as web_security
from lmforge.serve.models import ModelPool, StudyGenerator
from lmforge.serve.openai_api import Batcher
from lmforge.serve.pages import HERE, error_response, install_error_pages, make_templates
from lmforge.serve.routes import ROUTERS
from lmforge.serve.security import SecurityHeaders, SecuritySettings
from lmforge.serve.state import ServeState
from lmforge.serve.store import Store


def create_app(
    runs_dir: str | Path,
    db_path: str | Path | None = None,
    organiser_token: str | None = None,
    device: str = "cpu",
    resume_generation: bool = True,
    security: SecuritySettings | None = None,
) -> FastAPI:
    """The web app over `runs_dir`; the store defaults to `<runs_dir>/serve.sqlite`.

    `organiser_token`, if given, is registered (hashed) as an organiser. `security` sets
    the allowed hosts and origins, the trusted proxies and the session lifetime.
    """
    security = security or SecuritySettings()
    runs_root = Path(runs_dir).resolve()
    if not runs_root.is_dir():
        raise FileNotFoundError(f"runs folder {runs_root} does not exist")
    store = Store(Path(db_path) if db_path else runs_root / "serve.sqlite")
    if organiser_token:
        store.add_organiser(token=organiser_token)
    pool = ModelPool(runs_root, device=device)
    generator = StudyGenerator(store, pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if resume_generation:
            generator.resume_all()
        yield

    app = FastAPI(
        title="lmforge",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
        # The routers' routes, in one flat table (each already carries its router's
        # dependencies); `app.routes` lists every route with its path.
        routes=[route for router in ROUTERS for route in router.routes],
    )
    state = ServeState(runs_root, store, pool, generator, Batcher(pool), security, make_templates())
    app.state.serve = state
    # The parts tests and tools reach for by name.
    app.state.store, app.state.pool, app.state.generator = store, pool, generator
    app.state.runs_dir, app.state.openai_batcher = runs_root, state.batcher
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    web_security.install(app, store, security, refuse=error_response)
    install_error_pages(app)
    return app
