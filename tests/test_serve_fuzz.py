"""A web fuzzer for `lmforge serve`: every route of the app, as anonymous visitor, organiser
and annotator, with random paths (unicode, traversal, huge ids), methods, headers (huge,
repeated, malformed, wrong Content-Type, Content-Encoding claims) and bodies (sizes around
each route's limit, bad UTF-8, deep JSON nesting, broken multipart).

It checks what must hold for any request: no 500, short error answers (JSON under /api/),
the security headers on every answer, a body over its route's limit answered 413 and never read past
the limit. Derandomized, so a failure reproduces; the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from serve_helpers import ORGANISER_TOKEN, BodyMeter, csrf_of, sign_in

from lmforge.serve import create_app
from lmforge.serve.security import (
    BODY_RULES,
    DEFAULT_BODY_LIMIT,
    SAFE_METHODS,
    SecuritySettings,
    body_rule,
)
from lmforge.serve.store import StudySettings

FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The app over a runs folder with one run (no checkpoint: nothing to generate), a ready
    study, and a client per role."""
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "runs" / "alpha"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "eval.json").write_text(json.dumps({"perplexity": {"val_bpb": 5.5}}))
    app = create_app(
        root / "runs",
        db_path=root / "serve.sqlite",
        organiser_token=ORGANISER_TOKEN,
        resume_generation=False,
        security=SecuritySettings(allowed_hosts=["testserver"]),
    )
    store = app.state.store
    outputs = {(p, m): f"out {p} {m}" for p in range(2) for m in range(2)}
    sid = store.create_study("s", ["a", "b"], [("x", "x"), ("y", "y")], StudySettings(), outputs)
    meter = BodyMeter(app)
    organiser = TestClient(meter)
    org_csrf = sign_in(organiser)
    annotator = TestClient(meter)
    annotator.get(f"/a/{store.add_annotator(sid, 'alice')}")
    ann_csrf = csrf_of(annotator.get(f"/arena/{sid}").text)
    anonymous = TestClient(meter)
    anon_csrf = csrf_of(anonymous.get("/login").text)
    clients = {
        "organiser": (organiser, org_csrf),
        "annotator": (annotator, ann_csrf),
        "anonymous": (anonymous, anon_csrf),
    }
    routes = sorted(
        (method, route.path)
        for route in app.routes
        for method in (getattr(route, "methods", None) or {"GET"})
        if method != "HEAD"
    )
    return {"app": app, "meter": meter, "clients": clients, "routes": routes, "study": sid}


def test_every_route_taking_a_body_has_a_limit_and_a_gate(world):
    """A new POST route must be added to security.BODY_RULES (its limit and who may send)."""
    unsafe = [(m, p) for m, p in world["routes"] if m not in SAFE_METHODS]
    assert unsafe, world["routes"]
    for method, path in unsafe:
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        assert body_rule(method, concrete) is not None, f"{method} {path} is not in BODY_RULES"
    for rule in BODY_RULES:
        assert any(
            m == rule.method and rule.path.fullmatch(re.sub(r"\{[^}]+\}", "1", p))
            for m, p in unsafe
        ), f"BODY_RULES names {rule.method} {rule.path.pattern}, which is no route"


path_part = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["1", "0", "alpha", "..", "../..", "%2e%2e", "alpha/../../etc", "", " "]),
    st.text(min_size=1, max_size=40),  # any unicode, including surrogates' neighbours and NUL
)


@st.composite
def header_sets(draw) -> list[tuple[str, str]]:
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "Content-Type",
                        "Content-Encoding",
                        "Origin",
                        "Sec-Fetch-Site",
                        "Accept",
                        "X-CSRF-Token",
                        "X-Forwarded-Host",
                        "X-Forwarded-Proto",
                        "Cookie",
                        "X-Anything",
                    ]
                ),
                st.one_of(
                    st.sampled_from(
                        [
                            "application/json",
                            "application/x-www-form-urlencoded",
                            "multipart/form-data; boundary=xyz",
                            "multipart/form-data",
                            "text/plain; charset=utf-7",
                            "gzip",
                            "identity",
                            "null",
                            "http://testserver",
                            "https://evil.example",
                            "cross-site",
                            "same-origin",
                            "application/json;;;==",
                            "lmforge_org=x; lmforge_org=y",
                            'lmforge_annotator="\\x00',
                        ]
                    ),
                    st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=30),
                    st.integers(1, 20_000).map(lambda n: "v" * n),  # huge values
                ),
            ),
            max_size=4,
        )
    )
    return headers


@st.composite
def bodies(draw, limit: int) -> bytes:
    kind = draw(st.sampled_from(["size", "utf8", "json", "form", "multipart"]))
    if kind == "size":
        n = draw(st.sampled_from([0, 1, limit - 1, limit, limit + 1, 2 * limit]))
        return b"{" * n
    if kind == "utf8":
        return draw(st.binary(max_size=300)) + b"\xff\xfe\xc3\x28"
    if kind == "json":
        depth = draw(st.sampled_from([1, 100, 5_000, 50_000]))
        inner = draw(st.sampled_from(['"x"', "1e999", "null", '{"checkpoint": 1}']))
        return ("[" * depth + inner + "]" * depth).encode()[:limit]
    if kind == "form":
        pairs = draw(st.lists(st.tuples(st.text(max_size=10), st.text(max_size=30)), max_size=5))
        return "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs).encode()
    return (
        b'--xyz\r\nContent-Disposition: form-data; name="prompts_file"; filename="p.jsonl"\r\n\r\n'
        + draw(st.binary(max_size=200))
        + draw(st.sampled_from([b"\r\n--xyz--\r\n", b"", b"\r\n--xy"]))
    )


def check_answer(response) -> None:
    path = response.request.url.path  # as sent: the client resolves "..", as browsers do
    assert response.status_code < 500, (path, response.status_code, response.text[:300])
    assert response.headers.get("x-content-type-options") == "nosniff", path
    assert "content-security-policy" in response.headers, path
    if response.status_code >= 400:
        # an error names what was wrong, it does not echo a huge input back
        assert len(response.content) < 32 * 1024, (path, len(response.content))
        if path.startswith("/api/"):
            assert "error" in response.json(), (path, response.text[:300])


@settings(FUZZ, max_examples=600)
@given(data=st.data())
def test_fuzzed_requests_never_fail_the_server(world, data):
    method, template = data.draw(st.sampled_from(world["routes"]))
    method = data.draw(st.sampled_from([method, method, "POST", "PUT", "DELETE", "PATCH"]))
    path = template
    for name in re.findall(r"\{[^}]+\}", template):
        part = data.draw(path_part)
        # raw unicode too, except what no client may put in a URL (controls, spaces)
        raw = data.draw(st.booleans()) and not re.search(r"[\x00-\x20\x7f-\x9f]", part)
        path = path.replace(name, part if raw else quote(part, safe="/"))
    if data.draw(st.booleans()):  # query parameters: the routes' own and unknown ones
        key = data.draw(st.sampled_from(["since", "saved", "x", "since&since=1"]))
        path += f"?{key}={quote(data.draw(path_part))}"
    role = data.draw(st.sampled_from(sorted(world["clients"])))
    client, csrf = world["clients"][role]
    rule = body_rule(method, path.split("?")[0])
    limit = rule.max_bytes if rule else DEFAULT_BODY_LIMIT
    body = data.draw(bodies(min(limit, DEFAULT_BODY_LIMIT)))
    # bytes: header values may be any latin-1, as on the wire
    headers = [
        (k, v.encode("latin-1")) for k, v in [("X-CSRF-Token", csrf), *data.draw(header_sets())]
    ]
    world["meter"].read = 0
    response = client.request(
        method,
        path,
        content=body if method not in ("GET", "HEAD") else None,
        headers=headers,
        follow_redirects=False,
    )
    event(f"{role} {method} {template} -> {response.status_code}")
    check_answer(response)
    assert world["meter"].read <= limit


@FUZZ
@given(data=st.data())
def test_fuzzed_bodies_are_held_to_their_route_limit(world, data):
    """Signed in as the route's user, with a good Origin: 413 exactly when the body is over
    the limit, and the app never reads more than the limit."""
    rule = data.draw(st.sampled_from(BODY_RULES))
    role = {"organiser": "organiser", "annotator": "annotator"}.get(rule.who, "anonymous")
    client, csrf = world["clients"][role]
    path = rule.path.pattern.replace("[^/]+", str(world["study"]))
    over = data.draw(st.integers(-3, 3))
    if rule.max_bytes > DEFAULT_BODY_LIMIT and over <= 0:
        over = 1  # only the edge of the upload limit: parsing 9 MiB each time is slow
    size = rule.max_bytes + over
    content_type = data.draw(
        st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain"])
    )
    headers = {"X-CSRF-Token": csrf, "Origin": "http://testserver", "Content-Type": content_type}
    if rule.who == "api":  # the OpenAI-compatible API signs in with a bearer organiser token
        headers["Authorization"] = f"Bearer {ORGANISER_TOKEN}"
    world["meter"].read = 0
    response = client.post(path, content=b"0" * size, headers=headers, follow_redirects=False)
    check_answer(response)
    assert (response.status_code == 413) == (size > rule.max_bytes), (
        path,
        size,
        response.status_code,
        response.text[:200],
    )
    assert world["meter"].read <= rule.max_bytes


@FUZZ
@given(
    host=st.one_of(
        st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
        st.sampled_from(["testserver.evil", "evil", "testserver:", "[::1", "testserver:99999"]),
    )
)
def test_fuzzed_host_headers_are_allowed_only_when_listed(world, host):
    client, _ = world["clients"]["organiser"]
    response = client.get("/healthz", headers={"Host": host})
    check_answer(response)
    name = host.lower()
    name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    assert (response.status_code == 200) == (name == "testserver"), (host, response.status_code)
