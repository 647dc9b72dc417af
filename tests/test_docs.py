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


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs / mkdocs-material not installed (pip install -c constraints.txt -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs")
    cmd = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run(
        [*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = (tmp_path / "site/tour/index.html").read_text(encoding="utf-8")
    assert "loss.png" in html and "lmforge pretrain tour.yaml" in html
    assert "fonts.googleapis.com" not in html  # builds and renders offline
