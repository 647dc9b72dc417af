"""Builders shared by the web-app tests: a runs folder with tiny real checkpoints, a live server."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

from helpers import shakespeare_snippet, tiny_config

ORGANISER_TOKEN = "organiser-token-for-tests"


def make_runs(root: Path) -> Path:
    """A runs folder with two tiny pre-training runs (different seeds): two real checkpoints,
    metrics.jsonl, config.yaml, and an eval.json and report.html in the first."""
    from lmforge.pretrain import pretrain

    runs = root / "runs"
    corpus = shakespeare_snippet(root, n_chars=20_000)
    for name, seed in (("alpha", 1), ("beta", 2)):
        cfg = tiny_config(
            root / name,
            "train.max_steps=3",
            "data.val_fraction=0.3",
            "train.eval_every=3",
            "train.checkpoint_every=3",
            f"train.seed={seed}",
            f"output.dir={runs / name}",
            corpus=corpus,
        )
        pretrain(cfg)
    (runs / "alpha" / "eval.json").write_text(
        json.dumps({"perplexity": {"val_bpb": 5.5, "tokens": 512}, "note": "<b>tiny</b>"})
    )
    (runs / "alpha" / "report.html").write_text("<html><body><h1>Report card</h1></body></html>")
    return runs


_RUNS: dict[str, Path] = {}


def shared_runs(tmp_path_factory) -> Path:
    """`make_runs` once per test session, shared by the web-app test modules (tests that
    change a run put it back)."""
    if "runs" not in _RUNS:
        _RUNS["runs"] = make_runs(tmp_path_factory.mktemp("serve-runs"))
    return _RUNS["runs"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def field(html: str, name: str) -> str:
    m = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert m, f"no field {name} in the page"
    return m.group(1)


def sign_in(client, token: str = ORGANISER_TOKEN) -> str:
    """Sign `client` in as an organiser; returns the CSRF token of its forms."""
    csrf = csrf_of(client.get("/login").text)
    r = client.post("/login", data={"token": token, "csrf": csrf})
    assert r.status_code == 200 and "Human-evaluation arena" in r.text, r.text[:500]
    return csrf


class BodyMeter:
    """ASGI wrapper counting the request-body bytes the app pulled from the server (reset
    `read` before each request to measure one)."""

    def __init__(self, app):
        self.app, self.read = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)
