"""Security: no dangerous calls in the source tree; untrusted folders cannot reach outside.

The scan walks the syntax tree of every module under ``src/`` (not a regex over the
text, so ``model.eval()`` is not mistaken for the builtin) and names file:line of
each finding. See SECURITY.md for the threat model these tests defend.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from lmforge.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

SRC = Path(__file__).resolve().parents[1] / "src"


UNPICKLERS = {
    f"{module}.{fn}"
    for module in ("pickle", "marshal", "dill", "cloudpickle")
    for fn in ("load", "loads")
}


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def dangerous_calls(source: str, filename: str) -> list[str]:
    """Each dangerous call in `source` as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        why = ""
        if name in ("eval", "exec", "compile"):
            why = f"builtin {name}() runs arbitrary code"
        elif name == "__import__" and not (node.args and isinstance(node.args[0], ast.Constant)):
            why = f"{name}() of a computed name imports arbitrary modules"
        elif name in UNPICKLERS:
            why = f"{name}() runs code from the file"
        elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            why = "torch.load() without weights_only=True unpickles code"
        elif name == "yaml.load":
            loader = _dotted(_kw(node, "Loader") or ast.Constant(None))
            if loader.split(".")[-1] not in ("SafeLoader", "CSafeLoader"):
                why = "yaml.load() without SafeLoader builds arbitrary objects"
        elif name in ("yaml.unsafe_load", "yaml.full_load", "os.system", "os.popen"):
            why = f"{name}() is unsafe"
        elif _is_true(_kw(node, "shell")):
            why = f"{name}(shell=True) hands a string to the shell"
        elif name.endswith("extractall") and _kw(node, "filter") is None:
            why = "archive extractall() without a filter can write outside the folder"
        if why:
            found.append(f"{filename}:{node.lineno}: {why}")
    return found


def test_scanner_finds_each_dangerous_call():
    """The scanner itself must be able to fail: every pattern is caught, safe forms are not."""
    bad = "\n".join(
        [
            "eval('1')",
            "exec('x=1')",
            "pickle.loads(b'')",
            "torch.load(p)",
            "torch.load(p, weights_only=False)",
            "yaml.load(s)",
            "yaml.load(s, Loader=yaml.Loader)",
            "subprocess.run('ls', shell=True)",
            "os.system('ls')",
            "tar.extractall(d)",
        ]
    )
    assert len(dangerous_calls(bad, "bad.py")) == 10
    safe = "\n".join(
        [
            "model.eval()",
            "torch.load(p, weights_only=True)",
            "yaml.safe_load(s)",
            "yaml.load(s, Loader=yaml.SafeLoader)",
            "subprocess.run(['ls'])",
            "re.compile('x')",
        ]
    )
    assert dangerous_calls(safe, "safe.py") == []


def test_source_tree_has_no_dangerous_calls():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50  # the tree was really found
    found = [f for path in files for f in dangerous_calls(path.read_text(), str(path))]
    assert not found, "dangerous calls:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- checkpoints


def _tiny_checkpoint(run_dir: Path) -> Path:
    model = torch.nn.Linear(4, 4)
    return save_checkpoint(run_dir, 1, model, None, {"config": {}})


def test_checksum_list_cannot_name_files_outside_the_checkpoint(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "run")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    for name in ("../../secret.txt", str(secret), "sub/../../secret.txt"):
        sums = json.loads((ckpt / "checksums.json").read_text())
        sums[name] = "0" * 64
        (ckpt / "checksums.json").write_text(json.dumps(sums))
        with pytest.raises(CheckpointError, match="not a plain file name"):
            verify_checkpoint(ckpt)
        del sums[name]
        (ckpt / "checksums.json").write_text(json.dumps(sums))
    verify_checkpoint(ckpt)  # the untouched list still verifies


def test_symlinked_checkpoint_file_is_refused_and_resume_falls_back(tmp_path):
    run = tmp_path / "run"
    model = torch.nn.Linear(4, 4)
    good = save_checkpoint(run, 1, model, None, {})
    bad = save_checkpoint(run, 2, model, None, {})
    # The link points outside at a file with the very same bytes, so only the link is wrong.
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((bad / "model.safetensors").read_bytes())
    (bad / "model.safetensors").unlink()
    os.symlink(outside, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="symbolic link"):
        verify_checkpoint(bad)
    messages: list[str] = []
    assert latest_checkpoint(run, log=messages.append) == good
    assert "model.safetensors" in messages[0]


def test_non_mapping_checksums_is_a_clear_error(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "run")
    (ckpt / "checksums.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"checksums\.json: corrupt"):
        verify_checkpoint(ckpt)


# ----------------------------------------------------------------------------- HF folders


def test_hf_shard_index_cannot_reach_outside_the_folder(tmp_path):
    from lmforge.export.hf import ExportError, _read_hf_weights

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        index = {"weight_map": {"w": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ExportError, match="outside"):
            _read_hf_weights(folder)
    # a shard inside the folder (also through a symlink, as in an HF cache snapshot) loads
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"w": torch.ones(2)}, str(blobs / "abc"))
    os.symlink(blobs / "abc", folder / "model-00001.safetensors")
    index = {"weight_map": {"w": "model-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(_read_hf_weights(folder)["w"], torch.ones(2))


def test_pickled_pytorch_bin_in_hf_folder_is_refused(tmp_path):
    from lmforge.export.hf import _read_hf_weights

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "hf"
    folder.mkdir()
    with (folder / "pytorch_model.bin").open("wb") as fh:
        pickle.dump({"w": Payload()}, fh)
    from lmforge.export.hf import ExportError

    with pytest.raises(ExportError, match="pickled weights are not loaded"):
        _read_hf_weights(folder)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- recipes


def test_recipe_yaml_cannot_build_python_objects(tmp_path):
    from lmforge.config import ConfigError, load_config

    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"train: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    with pytest.raises(ConfigError):
        load_config(str(recipe), [])
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- the web app
# Each test below goes through HTTP; SECURITY.md names them next to the defence they check.

from fastapi.testclient import TestClient  # noqa: E402
from serve_helpers import ORGANISER_TOKEN, BodyMeter, LiveServer, csrf_of, sign_in  # noqa: E402

from lmforge.serve import create_app  # noqa: E402
from lmforge.serve.security import SecuritySettings  # noqa: E402
from lmforge.serve.store import StudySettings  # noqa: E402

BIG = 20 * 2**20  # far over every route's limit, small enough to send in a second


def web_app(tmp_path, **security):
    """The app over an empty runs folder (no checkpoints needed to test the gates)."""
    runs = tmp_path / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    settings = SecuritySettings(**{"allowed_hosts": ["testserver"], **security})
    return create_app(
        runs,
        db_path=tmp_path / "serve.sqlite",
        organiser_token=ORGANISER_TOKEN,
        resume_generation=False,
        security=settings,
    )


def chunks(total: int, size: int = 64 * 1024):
    for _ in range(total // size):
        yield b"x" * size


def test_unauthenticated_bodies_are_refused_before_they_are_read(tmp_path):
    meter = BodyMeter(web_app(tmp_path))
    client = TestClient(meter)
    csrf = csrf_of(client.get("/login").text)
    for path in ("/api/chat/stream", "/studies", "/studies/1/annotators", "/arena/1/vote"):
        for content in (b"{" * BIG, chunks(BIG)):  # with a Content-Length, then chunked
            meter.read = 0
            t0 = time.perf_counter()
            r = client.post(path, content=content, headers={"X-CSRF-Token": csrf})
            assert r.status_code == 403, (path, r.status_code)
            assert meter.read == 0, f"{path}: read {meter.read:,} bytes of a refused body"
            assert time.perf_counter() - t0 < 10


def test_oversized_bodies_get_413_without_being_read(tmp_path):
    meter = BodyMeter(web_app(tmp_path))
    client = TestClient(meter)
    csrf = sign_in(client)
    for path in ("/api/chat/stream", "/studies", "/login"):
        meter.read = 0
        r = client.post(path, content=b"{" * BIG, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 413 and "limit" in r.text, (path, r.text[:300])
        assert meter.read == 0, f"{path}: read {meter.read:,} bytes past Content-Length"
    # Chunked (no Content-Length): TestClient hands the whole body over in one message,
    # which the guard refuses as soon as it sees it. The live test below streams it.
    r = client.post("/api/chat/stream", content=chunks(BIG), headers={"X-CSRF-Token": csrf})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert client.get("/studies").status_code == 200  # the session still works


def test_streamed_bodies_stop_at_the_limit_on_a_real_server(tmp_path):
    meter = BodyMeter(web_app(tmp_path, allowed_hosts=["127.0.0.1"]))
    with LiveServer(meter) as live, httpx.Client(base_url=live.url, follow_redirects=True) as c:
        csrf = sign_in(c)
        t0 = time.perf_counter()
        try:
            r = c.post("/api/chat/stream", content=chunks(BIG), headers={"X-CSRF-Token": csrf})
            # closed, not drained: the server reads no more of the body after its answer
            assert r.status_code == 413 and r.headers["connection"] == "close", r.text[:300]
        except httpx.TransportError:
            pass  # the server may close the socket while the client is still sending
        assert time.perf_counter() - t0 < 20
        # Reading stops at the first message past the 256 KiB limit; one message is what uvicorn
        # had buffered: up to its 64 KiB high-water mark plus one socket read (asyncio: 256 KiB).
        assert meter.read <= 256 * 1024 + 64 * 1024 + 256 * 1024, f"read {meter.read:,} bytes"
        with httpx.Client(base_url=live.url) as anonymous:
            meter.read = 0
            try:
                r = anonymous.post("/studies", content=chunks(BIG))
                assert r.status_code == 403 and r.headers["connection"] == "close"
            except httpx.TransportError:
                pass
            assert meter.read == 0


def test_votes_per_item_is_enforced_where_the_vote_is_stored(tmp_path):
    app = web_app(tmp_path)
    store = app.state.store
    outputs = {(p, m): f"output {p} {m}" for p in range(2) for m in range(2)}
    sid = store.create_study(
        "s", ["p0", "p1"], [("x", "x"), ("y", "y")], StudySettings(votes_per_item=1), outputs
    )
    names = ["alice", "bob"] + [f"ann{i}" for i in range(8)]
    clients = {}
    for name in names:
        clients[name] = c = TestClient(app)
        c.get(f"/a/{store.add_annotator(sid, name)}")

    def post_vote(name: str, item_id: int, uid: str):
        c = clients[name]
        c.get(f"/arena/{sid}")  # sets the CSRF cookie (an "all done" page has no form)
        data = {"csrf": c.cookies["lmforge_csrf"], "item_id": str(item_id), "vote_uid": uid}
        data["choice"] = "tie"
        return c.post(f"/arena/{sid}/vote", data=data, follow_redirects=False)

    assert post_vote("alice", 1, "a" * 16).status_code == 303
    assert post_vote("alice", 2, "b" * 16).status_code == 303
    assert "All done" in clients["bob"].get(f"/arena/{sid}").text
    r = post_vote("bob", 1, "c" * 16)  # told "all done", bob votes by the item's id
    assert r.status_code == 409 and "judgments this study asks for" in r.text
    assert post_vote("alice", 1, "a" * 16).status_code == 303  # a retry is still idempotent
    assert len(store.votes(sid)) == 2
    store.set_status(sid, "failed", "stopped by the organiser")  # a closed study takes none
    r = post_vote("bob", 2, "d" * 16)
    assert r.status_code == 409 and "not open for votes" in r.text
    assert len(store.votes(sid)) == 2

    # Eight annotators vote on one item at once: exactly votes_per_item are stored.
    one_prompt = {(0, m): f"output {m}" for m in range(2)}
    sid2 = store.create_study(
        "t", ["p0"], [("x", "x"), ("y", "y")], StudySettings(votes_per_item=3), one_prompt
    )
    item = store.query("SELECT id FROM items WHERE study_id = ?", (sid2,))[0]["id"]
    forms = {}
    for name in names[2:]:
        c = clients[name]
        c.get(f"/a/{store.add_annotator(sid2, name)}")
        page = c.get(f"/arena/{sid2}").text
        forms[name] = {"csrf": csrf_of(page), "item_id": str(item), "vote_uid": f"{name}-race"}
    statuses: list[int] = []
    start = threading.Barrier(len(forms))

    def race(name: str):
        start.wait()
        r = clients[name].post(f"/arena/{sid2}/vote", data={**forms[name], "choice": "tie"})
        statuses.append(r.status_code)

    threads = [threading.Thread(target=race, args=(n,)) for n in names[2:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(statuses) == [200] * 3 + [409] * 5, statuses
    assert len(store.votes(sid2)) == 3


def org_cookie(client) -> str:
    return client.cookies.get("lmforge_org")


def test_logout_revocation_and_expiry_end_organiser_sessions(tmp_path, capsys):
    from lmforge.cli import main

    app = web_app(tmp_path, session_hours=12)
    store = app.state.store
    client = TestClient(app)
    csrf = csrf_of(client.get("/login").text)
    r = client.post("/login", data={"token": ORGANISER_TOKEN, "csrf": csrf}, follow_redirects=False)
    session = org_cookie(client)
    assert session and session != ORGANISER_TOKEN  # the cookie is not the token
    header = r.headers["set-cookie"].lower()
    assert "httponly" in header and "samesite=strict" in header and "max-age=43200" in header

    def copied(cookie: str) -> TestClient:
        thief = TestClient(app)
        thief.cookies.set("lmforge_org", cookie)
        return thief

    assert copied(session).get("/studies").status_code == 200
    first = session
    sign_in(client)  # signing in again replaces the session in the cookie
    session = org_cookie(client)
    assert session != first and copied(first).get("/studies").status_code == 403
    client.post("/logout", data={"csrf": csrf})
    assert copied(session).get("/studies").status_code == 403  # logout ended it server-side

    # A revoked token: its sessions end and it no longer signs in.
    csrf = sign_in(client)
    live = org_cookie(client)
    (listed,) = store.organiser_tokens()
    argv = ["serve", "--runs", str(tmp_path / "runs"), "--db", str(tmp_path / "serve.sqlite")]
    assert main([*argv, "--list-tokens"]) == 0
    out = capsys.readouterr().out
    assert ORGANISER_TOKEN not in out and f"   {listed['id']}  organiser" in out
    assert main([*argv, "--revoke-token", str(listed["id"])]) == 0
    assert copied(live).get("/studies").status_code == 403
    r = client.post("/login", data={"token": ORGANISER_TOKEN, "csrf": csrf})
    assert r.status_code == 403 and "not valid" in r.text
    assert main([*argv, "--revoke-token", "999"]) == 1
    assert "there is no organiser token 999" in capsys.readouterr().err

    # An expired session: 12 hours and a second later.
    token = store.add_organiser(name="second")
    sign_in(client, token)
    assert client.get("/studies").status_code == 200
    now = time.time()
    store.clock = lambda: now + 12 * 3600 + 1
    assert client.get("/studies").status_code == 403
    r = client.post("/api/chat/stream", json={"checkpoint": "x", "messages": [{}]})
    assert r.status_code == 403


def test_foreign_host_headers_are_refused(tmp_path):
    client = TestClient(web_app(tmp_path, allowed_hosts=["localhost", "127.0.0.1", "::1"]))
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/login", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
        r = client.get("/login", headers={"Host": host})
        assert r.status_code == 400 and "is not served here" in r.text, host
        r = client.post("/login", headers={"Host": host}, data={"token": ORGANISER_TOKEN})
        assert r.status_code == 400, host


def test_behind_a_tls_proxy_origin_and_forwarded_headers(tmp_path):
    """nginx in front: the browser talks to https://public.example, the app sees
    Host: 127.0.0.1:8000 from the proxy (TestClient's peer is called 'testclient')."""
    proxied = {"Host": "127.0.0.1:8000", "Origin": "https://public.example"}
    # Without settings, the public origin is foreign: refused (and the old check's only mode).
    plain = TestClient(web_app(tmp_path / "a", allowed_hosts=["127.0.0.1"]))
    csrf = csrf_of(plain.get("/login", headers=proxied).text)
    r = plain.post("/login", headers=proxied, data={"token": ORGANISER_TOKEN, "csrf": csrf})
    assert r.status_code == 403 and "Cross-origin" in r.text

    # --allowed-origins https://public.example: accepted.
    app = web_app(
        tmp_path / "b", allowed_hosts=["127.0.0.1"], allowed_origins=["https://public.example"]
    )
    client = TestClient(app)
    csrf = csrf_of(client.get("/login", headers=proxied).text)
    r = client.post("/login", headers=proxied, data={"token": ORGANISER_TOKEN, "csrf": csrf})
    assert r.status_code == 200 and "Human-evaluation arena" in r.text
    r = client.post(
        "/login",
        headers={**proxied, "Origin": "https://evil.example"},
        data={"token": ORGANISER_TOKEN, "csrf": csrf},
    )
    assert r.status_code == 403
    r = client.post(
        "/login",
        headers={**proxied, "Sec-Fetch-Site": "cross-site"},
        data={"token": ORGANISER_TOKEN, "csrf": csrf},
    )
    assert r.status_code == 403

    # A trusted proxy's X-Forwarded-*: public host and scheme, secure cookie, https links.
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "public.example"}
    app = web_app(
        tmp_path / "c", allowed_hosts=["public.example"], forwarded_allow_ips=["testclient"]
    )
    client = TestClient(app)
    headers = {**forwarded, "Origin": "https://public.example"}
    csrf = csrf_of(client.get("/login", headers=headers).text)
    r = client.post(
        "/login",
        headers=headers,
        data={"token": ORGANISER_TOKEN, "csrf": csrf},
        follow_redirects=False,
    )
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
    session = r.cookies["lmforge_org"]
    client.cookies.clear()  # the client speaks http to "the proxy": send the cookie by hand
    client.cookies.set("lmforge_org", session)
    client.cookies.set("lmforge_csrf", csrf)
    outputs = {(0, m): "x" for m in range(2)}
    sid = app.state.store.create_study(
        "s", ["p"], [("x", "x"), ("y", "y")], StudySettings(), outputs
    )
    r = client.post(
        f"/studies/{sid}/annotators", headers=headers, data={"csrf": csrf, "names": "alice"}
    )
    assert r.status_code == 200 and 'value="https://public.example/a/' in r.text
    # The same headers from an untrusted peer are ignored: its Host is checked as sent.
    untrusted = TestClient(web_app(tmp_path / "d", allowed_hosts=["public.example"]))
    assert untrusted.get("/login", headers=forwarded).status_code == 400


def test_vote_database_is_private_to_its_owner(tmp_path):
    old = os.umask(0o022)  # the usual umask, which made the file world-readable
    try:
        app = web_app(tmp_path)
        TestClient(app).get("/login")
    finally:
        os.umask(old)
    db = tmp_path / "serve.sqlite"
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert path.exists() and (path.stat().st_mode & 0o777) == 0o600, oct(path.stat().st_mode)
    app.state.store.close()
    os.chmod(db, 0o644)  # a store made by an older version is tightened when opened
    TestClient(web_app(tmp_path)).get("/login")
    assert (db.stat().st_mode & 0o777) == 0o600


def test_serve_command_network_settings_reach_the_app(tmp_path):
    from lmforge.cli import build_parser
    from lmforge.serve.cli import security_settings

    argv = "serve --host 10.1.2.3 --allowed-hosts eval.example.org,other.example --trust-proxy"
    args = build_parser().parse_args(
        [*argv.split(), "--allowed-origins", "https://eval.example.org"]
    )
    settings = security_settings(args)
    assert settings.forwarded_allow_ips == ["127.0.0.1", "::1"]
    app = web_app(
        tmp_path, **{k: getattr(settings, k) for k in ("allowed_hosts", "allowed_origins")}
    )
    client = TestClient(app)
    for host, status in (
        ("10.1.2.3:8000", 200),  # the bind address
        ("eval.example.org", 200),
        ("other.example", 200),
        ("localhost", 200),
        ("evil.example", 400),
    ):
        assert client.get("/login", headers={"Host": host}).status_code == status, host
    csrf = csrf_of(client.get("/login", headers={"Host": "10.1.2.3:8000"}).text)
    r = client.post(
        "/login",
        headers={"Host": "10.1.2.3:8000", "Origin": "https://eval.example.org"},
        data={"token": ORGANISER_TOKEN, "csrf": csrf},
    )
    assert r.status_code == 200
