"""End to end in a real headless Chromium (Debian's package, driven by Playwright).

An organiser signs in, creates a study, invites two annotators; both vote in their own
browser; the results page follows. Also checks that an annotator cannot reach another
study or the organiser pages, that a comment holding a <script> is shown as text, and
takes screenshots of the arena, the chat playground and the run dashboard.
"""

import json
import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright
from serve_helpers import ORGANISER_TOKEN, LiveServer, shared_runs

from lmforge.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
SCRIPT_COMMENT = "<script>window.__pwned = 1</script> looks <b>fine</b>"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    app = create_app(
        shared_runs(tmp_path_factory),
        db_path=root / "serve.sqlite",
        organiser_token=ORGANISER_TOKEN,
    )
    with LiveServer(app) as live:
        live.runs = app.state.runs_dir
        yield live


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    out = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def new_page(browser, errors: list[str]):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(30_000)
    # Any console error (a CSP violation, a JS exception) fails the test at the end.
    # (The 403 pages the test opens on purpose log "Failed to load resource ... 403".)
    page.on(
        "console",
        lambda m: (
            errors.append(f"{page.url}: {m.text}")
            if m.type == "error" and "status of 403" not in m.text
            else None
        ),
    )
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


def test_arena_chat_and_dashboard_in_chromium(server, browser, artifacts):
    errors: list[str] = []
    base = server.url

    # --- organiser: sign in with the #token link, create a study, wait for generation
    org = new_page(browser, errors)
    org.goto(f"{base}/login#token={ORGANISER_TOKEN}")
    assert org.input_value("#token") == ORGANISER_TOKEN  # filled from the fragment by app.js
    org.click("button[type=submit]")
    org.wait_for_url(f"{base}/")
    org.goto(f"{base}/studies/new")
    org.fill("#name", "Which tiny model writes better Shakespeare?")
    org.fill("#prompts_text", "ROMEO:\nJULIET:")
    for box in org.locator("input[name=checkpoints]").all():
        box.check()
    org.fill("#criteria", "fluency")
    org.click("#create")
    org.wait_for_url(re.compile(r"/studies/\d+$"))
    study_id = int(org.url.rsplit("/", 1)[1])
    org.wait_for_selector("#status.ready")  # the page polls progress and reloads when done
    org.fill("#names", "alice, bob")
    org.click("#invite")
    links = {
        el.get_attribute("data-name"): el.input_value() for el in org.locator(".invite-url").all()
    }
    assert set(links) == {"alice", "bob"}

    org.goto(f"{base}/studies/{study_id}/results")
    assert org.inner_text("#n-votes") == "0"

    # --- two annotators, each in their own browser context
    alice = new_page(browser, errors)
    alice.goto(links["alice"])
    alice.wait_for_url(f"{base}/arena/{study_id}")
    alice.check("input[name=rating_left_0][value='4']")
    alice.screenshot(path=str(artifacts / "arena_vote.png"), full_page=True)
    alice.fill("#comment", SCRIPT_COMMENT)
    alice.click("#choose-a")
    alice.wait_for_selector("#saved")
    alice.click("#choose-b")
    alice.wait_for_selector("#finished")

    bob = new_page(browser, errors)
    bob.goto(links["bob"])
    for _ in range(2):
        bob.wait_for_selector("#vote-form")
        with bob.expect_navigation():
            bob.keyboard.press("2")  # keyboard shortcut: tie
    bob.wait_for_selector("#finished")

    # --- the results page follows the votes; the comment is text, not markup
    org.reload()
    assert org.inner_text("#n-votes") == "4"
    assert SCRIPT_COMMENT in org.inner_text("#comments")
    assert org.locator("#comments b").count() == 0
    assert org.evaluate("window.__pwned") is None
    board = org.inner_text("#leaderboard")
    assert "alpha@3" in board and "beta@3" in board
    org.screenshot(path=str(artifacts / "arena_results.png"), full_page=True)

    # --- an annotator cannot reach another study or the organiser pages
    for path in (
        f"/arena/{study_id + 1}",
        f"/studies/{study_id}",
        f"/studies/{study_id}/results",
        "/chat",
        "/runs",
    ):
        response = alice.goto(f"{base}{path}")
        assert response.status == 403, path
        assert "Not allowed" in alice.inner_text("h1")

    # --- chat playground: two conversations side by side, streamed
    org.goto(f"{base}/chat")
    assert org.locator(".panel").count() == 2
    for seed in org.locator(".panel .seed").all():  # the same replies on every run
        seed.fill("7")
    org.fill("#send-all-text", "ROMEO:")
    org.press("#send-all-text", "Enter")
    # (wait_for_function would need 'unsafe-eval', which the app's CSP rightly refuses)
    expect(org.locator(".panel .stats", has_text="pieces")).to_have_count(2, timeout=60_000)
    replies = org.locator(".msg.assistant").all_inner_texts()
    assert len(replies) == 2 and all(replies)
    org.screenshot(path=str(artifacts / "chat_playground.png"), full_page=True)

    # --- run dashboard: curves drawn from metrics.jsonl, eval table, report link
    org.goto(f"{base}/runs/alpha")
    org.wait_for_selector("#metrics-status:has-text('records')")
    assert "val_bpb" in " ".join(org.locator(".eval").all_inner_texts())
    assert org.get_attribute("#report-link", "href") == "/files/alpha/report.html"
    org.screenshot(path=str(artifacts / "run_dashboard.png"), full_page=True)

    # --- a run that is still training: the curves follow metrics.jsonl as it grows
    metrics = server.runs / "beta" / "metrics.jsonl"
    original = metrics.read_text()
    try:
        metrics.write_text(original + json.dumps({"step": 4, "loss": 4.0, "lr": 1e-3}) + "\n")
        org.goto(f"{base}/runs/beta")
        n = len(original.splitlines()) + 1
        org.wait_for_selector(f"#metrics-status:has-text('{n} records')")
        assert "training is running" in org.inner_text("#metrics-status")
        with metrics.open("a") as fh:
            fh.write(json.dumps({"step": 5, "loss": 3.9, "lr": 1e-3}) + "\n")
        org.wait_for_selector(f"#metrics-status:has-text('{n + 1} records')")  # next poll
    finally:
        metrics.write_text(original)

    assert errors == []
    for name in ("arena_vote", "chat_playground", "run_dashboard"):
        assert (artifacts / f"{name}.png").stat().st_size > 10_000
