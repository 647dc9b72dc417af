"""The web app through FastAPI's TestClient: arena, access control, CSRF, escaping, dashboard, chat."""

import csv
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_helpers import ORGANISER_TOKEN, csrf_of, field, free_port, shared_runs, sign_in

from lmforge.serve import create_app
from lmforge.serve.security import SecuritySettings
from lmforge.serve.store import hash_token

# TestClient sends Host: testserver.
TEST_SECURITY = SecuritySettings(allowed_hosts=["testserver"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture
def app(runs, tmp_path):
    return create_app(
        runs,
        db_path=tmp_path / "serve.sqlite",
        organiser_token=ORGANISER_TOKEN,
        security=TEST_SECURITY,
    )


def create_study(client, csrf, **extra):
    page = client.get("/studies/new").text
    checkpoints = re.findall(r'name="checkpoints" value="([^"]+)"', page)
    assert len(checkpoints) == 2
    data = {
        "csrf": csrf,
        "name": "tiny study",
        "prompts_text": "ROMEO:\nJULIET:",
        "checkpoints": checkpoints,
        "max_tokens": "12",
        "temperature": "0.9",
        "top_p": "0.95",
        "seed": "7",
        **extra,
    }
    files = extra.pop("files", None)
    data.pop("files", None)
    r = client.post("/studies", data=data, files=files, follow_redirects=False)
    assert r.status_code == 303, r.text
    study_id = int(r.headers["location"].rsplit("/", 1)[1])
    deadline = time.monotonic() + 60
    while (p := client.get(f"/api/studies/{study_id}/progress").json())["status"] == "generating":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert p["status"] == "ready", p
    assert p["done"] == p["total"]
    return study_id, checkpoints


def invite(client, csrf, study_id, names):
    r = client.post(f"/studies/{study_id}/annotators", data={"csrf": csrf, "names": names})
    assert r.status_code == 200
    urls = dict(re.findall(r'value="(http://testserver/a/[^"]+)" data-name="([^"]+)"', r.text))
    return {name: url.removeprefix("http://testserver") for url, name in urls.items()}


def annotator_client(app, link) -> TestClient:
    client = TestClient(app)
    r = client.get(link)
    assert r.status_code == 200 and "/arena/" in str(r.url)
    return client


def vote(client, study_id, choice="left", comment="", page=None, **fields):
    page = page or client.get(f"/arena/{study_id}").text
    data = {
        "csrf": csrf_of(page),
        "item_id": field(page, "item_id"),
        "vote_uid": field(page, "vote_uid"),
        "choice": choice,
        "comment": comment,
        **fields,
    }
    return client.post(f"/arena/{study_id}/vote", data=data), data


def test_sign_in_tokens_are_hashed_and_wrong_tokens_refused(app, tmp_path):
    with TestClient(app) as client:
        csrf = csrf_of(client.get("/login").text)
        r = client.post("/login", data={"token": "guess", "csrf": csrf})
        assert r.status_code == 403 and "not valid" in r.text
        sign_in(client)
        study_id, _ = create_study(client, csrf)
        links = invite(client, csrf, study_id, "alice")
    con = sqlite3.connect(tmp_path / "serve.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    dump = "\n".join(con.iterdump())
    annotator_token = links["alice"].rsplit("/", 1)[1]
    for token in (ORGANISER_TOKEN, annotator_token):
        assert token not in dump and hash_token(token) in dump


def test_study_outputs_are_the_models_generations(app, runs):
    from lmforge.model.generate import decode_text, generate
    from lmforge.pretrain import load_model

    with TestClient(app) as client:
        csrf = sign_in(client)
        _, checkpoints = create_study(client, csrf)
        store = app.state.store
        item = store.item(1)
        model, tok, _ = load_model(runs / checkpoints[item.model_a])
        ids = tok.encode("ROMEO:" if item.prompt_idx == 0 else "JULIET:")
        out = generate(
            model, ids, 12, temperature=0.9, top_p=0.95, seed=7 + item.prompt_idx, stop_ids=[0]
        )
        new = [t for t in out[0, len(ids) :].tolist() if t != tok.eot_id]
        assert item.output_a == decode_text(tok, new)  # no special token in the text


def test_two_annotators_vote_once_each_and_results_follow(app):
    with TestClient(app) as org:
        csrf = sign_in(org)
        study_id, _ = create_study(org, csrf, criteria="fluency, relevance")
        links = invite(org, csrf, study_id, "alice, bob")
        store = app.state.store
        alice, bob = (annotator_client(app, links[n]) for n in ("alice", "bob"))
        n_items = 2  # two prompts × one pair of models

        # alice prefers the left response every time and resubmits each form twice
        for _ in range(n_items):
            page = alice.get(f"/arena/{study_id}").text
            shown_left = re.search(r'id="response-a">(.*?)</pre>', page, re.S).group(1)
            r1, data = vote(
                alice, study_id, "left", page=page, rating_left_0="5", rating_right_1="2"
            )
            r2 = alice.post(f"/arena/{study_id}/vote", data=data)
            assert r1.status_code == r2.status_code == 200
            # The stored winner is the model whose output was on the left.
            v = store.votes(study_id)[-1]
            it = store.item(v["item_id"])
            winner_text = it.output_a if v["outcome"] == "a" else it.output_b
            import html

            assert html.escape(winner_text, quote=False) == shown_left.replace(
                "&#34;", '"'
            ).replace("&#39;", "'")
        assert "All done" in alice.get(f"/arena/{study_id}").text
        assert len(store.votes(study_id)) == n_items

        # bob votes tie on everything; an old form resubmitted with a fresh id is still one vote
        first = bob.get(f"/arena/{study_id}").text
        vote(bob, study_id, "tie", page=first)
        stale = dict(
            csrf=csrf_of(first), item_id=field(first, "item_id"), vote_uid="f" * 32, choice="right"
        )
        assert bob.post(f"/arena/{study_id}/vote", data=stale).status_code == 200
        vote(bob, study_id, "tie")
        votes = store.votes(study_id)
        assert len(votes) == 2 * n_items
        assert sorted(v["outcome"] for v in votes if v["annotator"] == "bob") == ["tie", "tie"]

        page = org.get(f"/studies/{study_id}/results").text
        assert re.search(r'id="n-votes">4<', page)
        # alice's picks split by position, bob's are ties: check against the stored outcomes
        a_points = sum({"a": 1, "b": 0}.get(v["outcome"], 0.5) for v in votes)
        assert f"{a_points / 4:.3f}" in page or f"{1 - a_points / 4:.3f}" in page
        assert "Fleiss" in page, page
        assert re.search(r"alice · bob</td><td>2</td>", page), page[page.index("Agreement") :][
            :1500
        ]

        rows = list(csv.DictReader(io.StringIO(org.get(f"/studies/{study_id}/export.csv").text)))
        assert len(rows) == 4 and {r["annotator"] for r in rows} == {"alice", "bob"}
        rated = [json.loads(r["ratings"]) for r in rows if r["ratings"]]
        assert len(rated) == 2 and all(
            sorted(v for crit in r.values() for v in crit.values()) == [2, 5] for r in rated
        )
        for r in rows:
            if r["annotator"] == "alice":
                assert r["winner"] == r["shown_left"]


def test_annotator_cannot_reach_another_study_or_organiser_pages(app):
    with TestClient(app) as org:
        csrf = sign_in(org)
        first, _ = create_study(org, csrf)
        second, _ = create_study(org, csrf)
        links = invite(org, csrf, first, "alice")
        other_item = app.state.store.next_item(
            app.state.store.annotator(invite(org, csrf, second, "carol")["carol"].split("/")[-1]),
            0,
        ).id
    alice = annotator_client(app, links["alice"])
    page = alice.get(f"/arena/{first}").text
    for path in (
        f"/arena/{second}",
        f"/studies/{first}",
        f"/studies/{first}/results",
        f"/studies/{first}/export.csv",
        "/studies",
        "/chat",
        "/runs",
        "/runs/alpha",
        "/files/alpha/config.yaml",
    ):
        r = alice.get(path)
        assert r.status_code == 403, path
        assert "Not allowed" in r.text
    assert alice.get(f"/api/studies/{first}/progress").json()["error"]
    r = alice.post(
        f"/arena/{second}/vote",
        data={"csrf": csrf_of(page), "item_id": "1", "vote_uid": "x" * 32, "choice": "left"},
    )
    assert r.status_code == 403
    own = f'name="item_id" value="{field(page, "item_id")}"'
    r, _ = vote(alice, first, page=page.replace(own, f'name="item_id" value="{other_item}"'))
    assert r.status_code == 404
    r, _ = vote(alice, first, page=page.replace(own, f'name="item_id" value="{2**64}"'))
    assert r.status_code == 404
    assert app.state.store.votes(second) == []
    assert TestClient(app).get(f"/arena/{first}").status_code == 403  # no invitation at all
    assert TestClient(app).get("/a/not-a-token").status_code == 404


def test_csrf_and_cross_origin_posts_are_refused(app):
    with TestClient(app) as org:
        csrf = sign_in(org)
        r = org.post("/studies", data={"name": "x", "prompts_text": "a", "csrf": "wrong"})
        assert r.status_code == 403 and "security token" in r.text
        r = org.post(
            "/studies",
            data={"name": "x", "prompts_text": "a", "csrf": csrf},
            headers={"Origin": "http://evil.example"},
        )
        assert r.status_code == 403 and "Cross-origin" in r.text
        r = org.post("/api/chat/stream", json={"checkpoint": "x", "messages": [{"content": "a"}]})
        assert r.status_code == 403 and "error" in r.json()
        assert app.state.store.studies() == []


def test_user_text_is_escaped_and_scripts_are_blocked_by_csp(app):
    payload = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    with TestClient(app) as org:
        csrf = sign_in(org)
        study_id, _ = create_study(org, csrf, name=payload)
        links = invite(org, csrf, study_id, payload)
        alice = annotator_client(app, links[payload.replace("<", "&lt;").replace(">", "&gt;")])
        page = alice.get(f"/arena/{study_id}").text
        assert payload not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        vote(alice, study_id, comment=payload, page=page)
        r = org.get(f"/studies/{study_id}/results")
        assert payload not in r.text and "&lt;img src=x onerror=alert(2)&gt;" in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
        rows = list(csv.DictReader(io.StringIO(org.get(f"/studies/{study_id}/export.csv").text)))
        assert rows[0]["comment"] == payload


def test_a_failed_generation_is_reported_on_the_study_page(app):
    with TestClient(app) as org:
        csrf = sign_in(org)
        with pytest.raises(AssertionError, match="failed"):
            # the tiny models' character vocabulary has no '<': generation fails cleanly
            create_study(org, csrf, prompts_text="<script>alert(1)</script>")
        page = org.get("/studies/1").text
        assert "character &#39;&lt;&#39; is not in the character vocabulary" in page
        assert 'class="badge failed"' in page


def test_formula_cells_are_defused_in_csv(app):
    with TestClient(app) as org:
        csrf = sign_in(org)
        study_id, _ = create_study(org, csrf)
        name = "=HYPERLINK(1)"
        alice = annotator_client(app, invite(org, csrf, study_id, name)[name])
        vote(alice, study_id, comment="@SUM(A1)")
        row = next(csv.DictReader(io.StringIO(org.get(f"/studies/{study_id}/export.csv").text)))
        assert row["annotator"] == "'=HYPERLINK(1)" and row["comment"] == "'@SUM(A1)"


def test_no_file_outside_the_runs_folder_is_served(app, runs, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    link = runs / "alpha" / "leak.txt"
    if not link.exists():
        link.symlink_to(secret)
    with TestClient(app) as org:
        sign_in(org)
        r = org.get("/files/alpha/report.html")
        assert r.status_code == 200 and "Report card" in r.text
        assert r.headers["content-security-policy"].startswith("sandbox")
        for path in (
            "/files/alpha/leak.txt",
            "/files/%2e%2e/%2e%2e/etc/passwd",
            "/files/..%2f..%2fetc%2fpasswd",
            f"/files/{secret}",
            "/files/alpha/checkpoints/step_00000003/model.safetensors",
            "/runs/..%2f..%2f",
            "/api/metrics/..%2f..",
        ):
            r = org.get(path)
            assert r.status_code == 404, path
            assert "top secret" not in r.text
    link.unlink()


def test_every_error_has_a_clear_page(app):
    with TestClient(app) as org:
        csrf = sign_in(org)
        r = org.get("/studies/999")
        assert r.status_code == 404 and "There is no study 999" in r.text and "<html" in r.text
        huge = 2**64  # past SQLite's 64-bit integers: was a 500
        assert org.get(f"/studies/{huge}").status_code == 404
        assert org.get(f"/api/studies/-{huge}/progress").status_code == 404
        r = org.get("/studies/abc")
        assert r.status_code == 422 and "study_id" in r.text
        r = org.get("/nowhere")
        assert r.status_code == 404 and "There is no page at /nowhere" in r.text
        assert org.get("/api/studies/999/progress").json() == {"error": "There is no study 999."}
        r = org.post("/studies", data={"csrf": csrf, "name": "x", "prompts_text": "p"})
        assert r.status_code == 400 and "at least two checkpoints" in r.text
        bad = b'{"prompt": "ok"}\n{"prompt": \n'
        checkpoints = re.findall(
            r'name="checkpoints" value="([^"]+)"', org.get("/studies/new").text
        )
        r = org.post(
            "/studies",
            data={"csrf": csrf, "name": "x", "checkpoints": checkpoints},
            files={"prompts_file": ("prompts.jsonl", bad, "application/json")},
        )
        assert r.status_code == 400 and "prompts.jsonl line 2: not valid JSON" in r.text
        r = org.post(
            "/studies",
            data={"csrf": csrf, "name": "x", "checkpoints": checkpoints},
            files={"prompts_file": ("p.jsonl", b'{"answer": "no prompt"}\n', "application/json")},
        )
        assert r.status_code == 400 and "p.jsonl line 1: no prompt field" in r.text


def test_uploaded_prompt_file_is_used(app):
    with TestClient(app) as org:
        csrf = sign_in(org)
        study_id, _ = create_study(
            org,
            csrf,
            prompts_text="",
            files={
                "prompts_file": ("p.jsonl", b'{"prompt": "MENENIUS:"}\n\n{"input": "All:"}\n', "x")
            },
        )
        assert app.state.store.prompts(study_id) == ["MENENIUS:", "All:"]


def test_chat_stream_sends_the_tokens_generate_produces(app, runs):
    from lmforge.model.generate import decode_text, generate
    from lmforge.pretrain import load_model

    with TestClient(app) as org:
        csrf = sign_in(org)
        checkpoints = re.findall(r'<option value="([^"]+)"', org.get("/chat").text)
        body = {
            "checkpoint": checkpoints[0],
            "messages": [{"role": "user", "content": "ROMEO:"}],
            "temperature": 1.0,
            "max_tokens": 20,
            "seed": 3,
        }
        with org.stream("POST", "/api/chat/stream", json=body, headers={"X-CSRF-Token": csrf}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = r.read().decode().split("\n\n")
        pieces = [json.loads(e[6:])["text"] for e in events if e.startswith("data: ")]
        assert any(e.startswith("event: done") for e in events)
        model, tok, _ = load_model(runs / checkpoints[0])
        ids = tok.encode("ROMEO:")
        out = generate(model, ids, 20, temperature=1.0, seed=3, stop_ids=[tok.eot_id])
        expected = decode_text(tok, [t for t in out[0, len(ids) :].tolist() if t != tok.eot_id])
        assert len(pieces) > 1 and "".join(pieces) == expected
        r = org.post(
            "/api/chat/stream",
            json={**body, "checkpoint": "../../etc"},
            headers={"X-CSRF-Token": csrf},
        )
        assert r.status_code == 404
        r = org.post("/api/chat/stream", json={**body, "top_p": 2}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 422 and "top_p" in r.json()["error"]


def test_dashboard_lists_runs_and_follows_metrics(app, runs):
    with TestClient(app) as org:
        sign_in(org)
        page = org.get("/runs").text
        assert 'href="/runs/alpha"' in page and 'href="/runs/beta"' in page
        page = org.get("/runs/alpha").text
        assert "context_length: 32" in page  # config.yaml
        assert "val_bpb" in page and "&lt;b&gt;tiny&lt;/b&gt;" in page  # eval.json, escaped
        assert 'href="/files/alpha/report.html"' in page
        lines = (runs / "beta" / "metrics.jsonl").read_text().splitlines()
        data = org.get("/api/metrics/beta").json()
        assert data["records"] == [json.loads(x) for x in lines] and data["next"] == len(lines)
        # training goes on: a new record (and a half-written one) appear
        with (runs / "beta" / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": 99, "loss": 1.5, "lr": 1e-4}) + "\n" + '{"step": 1')
        try:
            data = org.get(f"/api/metrics/beta?since={len(lines)}").json()
            assert data["records"] == [{"step": 99, "loss": 1.5, "lr": 1e-4}]
            assert data["running"] is True and data["next"] == len(lines) + 1
        finally:
            (runs / "beta" / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_acknowledged_votes_survive_a_killed_server(runs, tmp_path):
    """SIGKILL the server after votes were acknowledged: they are all there after a restart,
    and the client's retries (same vote ids) add nothing."""
    db = tmp_path / "serve.sqlite"
    port = free_port()
    code = (
        "import sys, uvicorn; from lmforge.serve import create_app; "
        f"uvicorn.run(create_app({str(runs)!r}, db_path={str(db)!r}, "
        f"organiser_token={ORGANISER_TOKEN!r}), host='127.0.0.1', port={port}, log_level='warning')"
    )
    from lmforge.serve.store import Store, StudySettings

    store = Store(db)
    prompts = [f"prompt {i}" for i in range(10)]
    outputs = {(p, m): f"output {p} {m}" for p in range(10) for m in range(2)}
    sid = store.create_study("s", prompts, [("x", "x"), ("y", "y")], StudySettings(), outputs)
    token = store.add_annotator(sid, "alice")
    store.close()

    def start():
        proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                return proc
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)

    proc = start()
    sent = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", follow_redirects=True) as c:
            c.get(f"/a/{token}")
            for _ in range(6):
                page = c.get(f"/arena/{sid}").text
                r, data = vote(c, sid, page=page)
                assert r.status_code == 200
                sent.append(data)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc = start()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", follow_redirects=True) as c:
            c.get(f"/a/{token}")
            for data in sent:  # a client that never saw the answers retries everything
                page = c.get(f"/arena/{sid}").text
                r = c.post(f"/arena/{sid}/vote", data={**data, "csrf": csrf_of(page)})
                assert r.status_code == 200
    finally:
        proc.kill()
        proc.wait()
    votes = Store(db).votes(sid)
    assert sorted(v["vote_uid"] for v in votes) == sorted(d["vote_uid"] for d in sent)


def test_generation_interrupted_by_a_restart_resumes(runs, tmp_path):
    from lmforge.serve.models import find_checkpoints
    from lmforge.serve.store import Store, StudySettings

    store = Store(tmp_path / "serve.sqlite")
    checkpoints = find_checkpoints(runs)
    # As a crashed server leaves it: still "generating", one of four outputs done.
    sid = store.create_study(
        "s", ["ROMEO:", "JULIET:"], [(c, c) for c in checkpoints], StudySettings(max_tokens=5)
    )
    store.put_output(sid, 0, 0, "kept")
    app = create_app(runs, db_path=tmp_path / "serve.sqlite")
    with TestClient(app):
        app.state.generator.threads[sid].join(timeout=60)
    study = store.study(sid)
    assert study.status == "ready" and study.n_outputs == 4
    assert store.item(1).output_a == "kept"  # finished work is not redone


def test_serve_command_is_registered_and_names_a_missing_folder(tmp_path, capsys):
    from lmforge.cli import main

    assert main(["serve", "--runs", str(tmp_path / "missing")]) == 1
    assert f"runs folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_closing_a_chat_stream_stops_generation(runs):
    from lmforge.serve.models import ModelPool, find_checkpoints, iter_stream

    pool = ModelPool(runs)
    checkpoint = find_checkpoints(runs)[0]
    # No stop token, so only cancellation can end it early: 100,000 tokens would take
    # minutes; closing the stream after three pieces must end it at once.
    pool.get(checkpoint).tokenizer.eot_id = -1
    messages = [{"role": "user", "content": "ROMEO:"}]
    before = set(threading.enumerate())
    stream = iter_stream(pool, checkpoint, messages, max_tokens=100_000, seed=0, temperature=0.5)
    pieces = [next(stream) for _ in range(3)]
    assert all(pieces)
    stream.close()
    (worker,) = [t for t in set(threading.enumerate()) - before if t.name == "lmforge-chat"]
    worker.join(timeout=60)
    assert not worker.is_alive() and not pool.generate_lock.locked()
