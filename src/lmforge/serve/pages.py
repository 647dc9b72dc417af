"""Server-rendered pages of `lmforge serve`: the Jinja templates, `render`, and the one
error response every refusal goes through (an HTML page, JSON under /api/, OpenAI's
error shape under /v1/)."""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve import openai_api
from lmforge.serve.deps import CSRF_COOKIE, current_annotator, is_organiser
from lmforge.serve.state import serve_state

log = logging.getLogger("lmforge.serve")
HERE = Path(__file__).parent

TITLES = {
    400: "Bad request",
    401: "Sign-in needed",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Too large",
    422: "Invalid input",
    500: "Something went wrong",
}


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every {{ value }} is HTML-escaped
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = fmt_num
    env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""
    return Jinja2Templates(env=env)


def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    """A page, with the CSRF token its forms carry (set as a cookie on first visit)."""
    csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
    ctx.setdefault("is_organiser", is_organiser(request))
    ctx.setdefault("annotator", current_annotator(request))
    response = serve_state(request).templates.TemplateResponse(
        request, template, {"csrf": csrf, **ctx}, status_code=status
    )
    if request.cookies.get(CSRF_COOKIE) != csrf:
        response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict")
    return response


def error_response(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/v1/"):  # OpenAI's clients expect 400 for bad values
        return openai_api.openai_error(400 if status == 422 else status, message)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    try:
        return render(
            request,
            "error.html",
            status=status,
            title=TITLES.get(status, f"Error {status}"),
            status_code=status,
            message=message,
        )
    except Exception:  # the error page itself must never fail
        return HTMLResponse(f"<h1>Error {status}</h1>", status_code=status)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"There is no page at {request.url.path}."
    return await run_in_threadpool(error_response, request, exc.status_code, message)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return await run_in_threadpool(error_response, request, 422, "; ".join(parts))


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("error serving %s", request.url.path)
    return await run_in_threadpool(
        error_response,
        request,
        500,
        f"The server failed on this request ({type(exc).__name__}). "
        "The details are in the server's log.",
    )


def install_error_pages(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


def fmt_num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"
