"""FastAPI dependencies of `lmforge serve`: who is signed in, CSRF tokens, the study a
path names. Routes declare them (``dependencies=[Organiser]``, ``study: StudyOf``)
instead of repeating the checks; each raises an `HTTPException` that the app's error
handlers turn into a page (JSON under /api/ and /v1/).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Form, Header, HTTPException, Request

from lmforge.serve.security import ANN_COOKIE, ORG_COOKIE, bearer_token
from lmforge.serve.state import State, serve_state
from lmforge.serve.store import Annotator, Study

CSRF_COOKIE = "lmforge_csrf"


def is_organiser(request: Request) -> bool:
    """Whether the request carries a live organiser session."""
    return serve_state(request).store.session_valid(request.cookies.get(ORG_COOKIE))


def current_annotator(request: Request) -> Annotator | None:
    """The annotator whose invitation cookie the request carries, if any."""
    return serve_state(request).store.annotator(request.cookies.get(ANN_COOKIE))


def require_organiser(request: Request) -> None:
    if not is_organiser(request):
        who = "an annotator" if current_annotator(request) else "not signed in"
        raise HTTPException(
            403,
            f"This page is for study organisers (you are {who}). "
            "Sign in with an organiser token at /login.",
        )


def require_api_organiser(request: Request, state: State) -> None:
    """The OpenAI-compatible API: ``Authorization: Bearer`` with an organiser token."""
    if not state.store.is_organiser(bearer_token(request.headers.get("authorization", ""))):
        raise HTTPException(401, "Send Authorization: Bearer <organiser token of this server>.")


def check_csrf(request: Request, token: str) -> None:
    """The token sent with a form or header must match the CSRF cookie (double submit).
    The Origin of every POST was checked by `security.RequestGuard` already."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not token or not hmac.compare_digest(cookie, token):
        raise HTTPException(
            403, "The form's security token is missing or stale. Reload the page and try again."
        )


def csrf_form(request: Request, csrf: Annotated[str, Form()] = "") -> None:
    """A form's hidden ``csrf`` field."""
    check_csrf(request, csrf)


def csrf_header(request: Request, x_csrf_token: Annotated[str, Header()] = "") -> None:
    """The ``X-CSRF-Token`` header of a script's request."""
    check_csrf(request, x_csrf_token)


def study_of(study_id: int, state: State) -> Study:
    """The study named in the path, or 404."""
    study = state.store.study(study_id)
    if study is None:
        raise HTTPException(404, f"There is no study {study_id}.")
    return study


def annotator_of_study(request: Request, study_id: int) -> Annotator:
    """The signed-in annotator, who must have been invited to the study in the path."""
    ann = current_annotator(request)
    if ann is None or ann.study_id != study_id:
        raise HTTPException(
            403,
            "You need this study's invitation link to annotate it."
            if ann is None
            else "Your invitation is for a different study.",
        )
    return ann


Organiser = Depends(require_organiser)
ApiOrganiser = Depends(require_api_organiser)
CsrfForm = Depends(csrf_form)
CsrfHeader = Depends(csrf_header)
StudyOf = Annotated[Study, Depends(study_of)]
StudyAnnotator = Annotated[Annotator, Depends(annotator_of_study)]
