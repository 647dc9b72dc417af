"""The web app's routers: who may call each route is declared once per router, and the
sign-in and CSRF checks run before a request's parameters are looked at."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from serve_helpers import ORGANISER_TOKEN, csrf_of, sign_in

from lmforge.serve import create_app
from lmforge.serve.routes import ROUTERS, api, arena, chat, dashboard, files

BASE = "http://localhost"


@pytest.fixture
def app(tmp_path):
    app = create_app(tmp_path, organiser_token=ORGANISER_TOKEN, resume_generation=False)
    yield app
    app.state.store.close()


def sample_path(path: str) -> str:
    """A concrete URL for a route's path: ``/studies/{study_id}`` -> ``/studies/1``."""
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_route_of_the_app_comes_from_a_router(app):
    served = {(r.path, frozenset(r.methods)) for r in app.routes if isinstance(r, APIRoute)}
    declared = {
        (r.path, frozenset(r.methods))
        for router in ROUTERS
        for r in router.routes
        if isinstance(r, APIRoute)
    }
    assert served == declared and len(served) > 20


@pytest.mark.parametrize(
    "router, status",
    [
        (arena.organiser, 403),
        (chat.router, 403),
        (dashboard.router, 403),
        (files.router, 403),
        (api.router, 401),
    ],
)
def test_every_route_of_a_protected_router_refuses_strangers(app, router, status):
    client = TestClient(app, base_url=BASE)
    assert client.get("/login").status_code == 200  # a CSRF cookie, no session
    routes = [r for r in router.routes if isinstance(r, APIRoute)]
    assert routes
    for route in routes:
        for method in route.methods - {"HEAD"}:
            r = client.request(method, sample_path(route.path))
            assert r.status_code == status, (method, route.path, r.status_code, r.text[:200])


def test_sign_in_and_csrf_are_checked_before_the_parameters(app):
    stranger = TestClient(app, base_url=BASE)
    # A stranger learns nothing about what a page's parameters should be.
    r = stranger.get("/studies/abc")
    assert r.status_code == 403 and "organisers" in r.text
    r = stranger.get("/api/metrics/x", params={"since": "soon"})
    assert r.status_code == 403 and "organisers" in r.json()["error"]
    with TestClient(app, base_url=BASE) as org:
        csrf = sign_in(org)
        r = org.get("/studies/abc")
        assert r.status_code == 422 and "study_id" in r.text
        r = org.post("/studies", data={"csrf": "stale"})  # no name either
        assert r.status_code == 403 and "security token" in r.text
        r = org.post("/studies", data={"csrf": csrf})
        assert r.status_code == 422 and "name" in r.text
        r = org.post("/api/chat/stream", json={})
        assert r.status_code == 403 and "security token" in r.json()["error"]
    fresh = TestClient(app, base_url=BASE)
    csrf_of(fresh.get("/login").text)
    r = fresh.post("/login", data={"csrf": "stale"})
    assert r.status_code == 403 and "security token" in r.text
