"""The documentation stays true: marked commands run, generated reference pages are
current, and the mkdocs site builds offline with --strict."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# A fenced block preceded by the line `<!-- test -->` is run, one command per line.
MARKED = re.compile(
    r"^[ \t]*<!-- test -->[ \t]*\n[ \t]*```(?:bash|sh|console)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S
)
# Only cheap commands may be marked: they must not train or write outside a temp folder.
CHEAP = {"config", "plan", "recipes", "--help", "doctor"}


def marked_commands() -> list[tuple[str, str]]:
    out = []
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for block in MARKED.findall(path.read_text(encoding="utf-8")):
            for line in block.splitlines():
                line = line.split(" #", 1)[0].strip()
                if line:
                    out.append((str(path.relative_to(ROOT)), line))
    return out


COMMANDS = marked_commands()


def test_docs_mark_commands():
    pages = {page for page, _ in COMMANDS}
    assert {"docs/index.md", "docs/tour.md", "docs/howto/doctor.md"} <= pages, pages
    assert len(COMMANDS) >= 8


def test_extractor_reads_only_marked_blocks():
    text = "<!-- test -->\n```bash\nlmforge recipes\n```\n\n```bash\nlmforge pretrain x\n```\n"
    assert [b.strip() for b in MARKED.findall(text)] == ["lmforge recipes"]


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_marked_command_runs(page, command, tmp_path):
    argv = shlex.split(command)
    assert argv[0] == "lmforge", f"{page}: marked command must start with lmforge: {command}"
    assert argv[1] in CHEAP, f"{page}: only cheap commands may be marked for testing: {command}"
    # Paths in the docs are relative to the repository root.
    argv = [str(ROOT / a) if (ROOT / a).is_file() else a for a in argv]
    env = dict(os.environ, COLUMNS="100")
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", *argv[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{page}: `{command}` exited {proc.returncode}:\n{proc.stderr}"
    assert proc.stdout.strip(), f"{page}: `{command}` printed nothing"


def test_generated_reference_is_current():
    sys.path.insert(0, str(DOCS))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(DOCS))
    for path, text in gen_reference.pages().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path} is out of date: run python docs/gen_reference.py"
        )


def test_reference_lists_every_command_and_key():
    from lmforge.cli import build_parser
    from lmforge.config import Config, to_dict

    cli = (DOCS / "reference/cli.md").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        assert f"## lmforge {name}\n" in cli, name
    config = (DOCS / "reference/config.md").read_text(encoding="utf-8")
    for section, values in to_dict(Config()).items():
        if isinstance(values, dict):
            for key in values:
                assert f"| `{section}.{key}` |" in config, f"{section}.{key}"
    # a comment written above a field in config.py reaches the page
    assert "Global tokens per optimizer step; gradient accumulation is derived from it." in config


def test_tour_outputs_are_committed():
    tour = (DOCS / "tour.md").read_text(encoding="utf-8")
    for name in re.findall(r'--8<-- "(generated/[^"]+)"', tour):
        assert (DOCS / name).is_file(), f"{name} missing: run python docs/gen_tour.py"
    assert (DOCS / "generated/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs / mkdocs-material not installed (pip install -c constraints.txt -e '.[docs]')",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    mkdocs = shutil.which("mkdocs")
    cmd = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run(
        [*cmd, "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@needs_mkdocs
def test_mkdocs_build_strict(site):
    html = (site / "tour/index.html").read_text(encoding="utf-8")
    assert "loss.png" in html and "lmforge pretrain tour.yaml" in html
    assert "fonts.googleapis.com" not in html  # builds and renders offline
    assert (site / "reference/config/index.html").is_file()


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


@needs_mkdocs
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing")
def test_tour_page_renders_plots_in_chromium(site, tmp_path):
    """Serve the built site locally, open the tour in headless Chromium, check that the
    loss plot is decoded and that no request leaves the machine; keep a screenshot."""
    import functools
    import http.server
    import threading

    playwright = pytest.importorskip("playwright.sync_api")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    outside: list[str] = []
    out = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def route(r):
                if r.request.url.startswith(base):
                    r.continue_()
                else:
                    outside.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.goto(f"{base}/tour/", wait_until="load")
            img = page.locator("img[src*='loss.png']")
            img.scroll_into_view_if_needed()
            width = img.evaluate("i => i.complete ? i.naturalWidth : 0")
            assert width > 100, "the loss plot did not render"
            assert "3. Pre-training" in page.inner_text("article")
            img.screenshot(path=str(out / "tour_loss_plot.png"))
            page.screenshot(path=str(out / "tour_page.png"), full_page=True)
            browser.close()
    finally:
        server.shutdown()
    assert not outside, f"the docs tried to load from outside: {outside}"
    assert (out / "tour_page.png").stat().st_size > 10_000
