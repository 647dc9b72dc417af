"""The routes of `lmforge serve`, one `APIRouter` per area; `create_app` includes `ROUTERS`."""

from __future__ import annotations

from lmforge.serve.routes import api, arena, chat, dashboard, files, signin

ROUTERS = (
    signin.router,
    arena.organiser,
    arena.voting,
    chat.router,
    dashboard.router,
    files.router,
    api.router,
)
