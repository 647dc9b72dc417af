"""Signing in: the home page, organiser sign-in and sign-out, annotator invitation links."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from lmforge.serve.deps import CsrfForm, current_annotator, is_organiser
from lmforge.serve.models import find_checkpoints
from lmforge.serve.pages import render
from lmforge.serve.runs import find_runs, run_summary
from lmforge.serve.security import ANN_COOKIE, ORG_COOKIE
from lmforge.serve.state import State

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse)
def home(request: Request, state: State) -> Response:
    if is_organiser(request):
        root = state.runs_root
        return render(
            request,
            "home.html",
            studies=state.store.studies()[:5],
            runs=[run_summary(root, r) for r in find_runs(root)][:5],
            n_checkpoints=len(find_checkpoints(root)),
        )
    ann = current_annotator(request)
    if ann is not None:
        return RedirectResponse(f"/arena/{ann.study_id}", status_code=303)
    return RedirectResponse("/login", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    return render(request, "login.html")


@router.post("/login", dependencies=[CsrfForm])
def login(request: Request, state: State, token: Annotated[str, Form()]) -> Response:
    ttl_s = state.security.session_hours * 3600
    # Never two live sessions per cookie.
    state.store.end_session(request.cookies.get(ORG_COOKIE))
    session = state.store.start_session(token.strip(), ttl_s)
    if session is None:
        raise HTTPException(403, "That organiser token is not valid.")
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        ORG_COOKIE,
        session,
        max_age=int(ttl_s),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", dependencies=[CsrfForm])
def logout(request: Request, state: State) -> Response:
    state.store.end_session(request.cookies.get(ORG_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(ORG_COOKIE)
    response.delete_cookie(ANN_COOKIE)
    return response


@router.get("/a/{token}")
def invitation(request: Request, state: State, token: str) -> Response:
    ann = state.store.annotator(token)
    if ann is None:
        raise HTTPException(404, "This invitation link is not valid (or was revoked).")
    response = RedirectResponse(f"/arena/{ann.study_id}", status_code=303)
    response.set_cookie(
        ANN_COOKIE, token, httponly=True, samesite="lax", secure=request.url.scheme == "https"
    )
    return response
