"""Extending `lmforge prepare`: a data filter defined in this file, registered by name and
run from a recipe; bias steps that reach the pipeline through the registry only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.data.document import Document
from lmforge.data.filters import Filter
from lmforge.data.registry import STEPS, register_step
from lmforge.data.steps import Step
from lmforge.fileio import read_json_lines

SRC = Path(__file__).resolve().parents[1] / "src"


@register_step("mentions")
@dataclass
class MentionsFilter(Filter):
    """Drop prose that mentions `word` (a whole word, any case)."""

    name = "mentions"
    applies_to = "text"
    word: str = "banana"

    def check(self, doc: Document) -> str | None:
        words = {w.strip(".,;:!?").lower() for w in doc.text.split()}
        return "mentions:word" if self.word in words else None


@register_step("drop_marked")
class DropMarked(Step):
    """Drop every document that contains `marker`."""

    name = "drop_marked"

    def __init__(self, marker: str = "XYZZY", on_drop=None):
        super().__init__(on_drop)
        self.marker = marker

    def process(self, doc: Document) -> Document | str:
        return "drop_marked:has_marker" if self.marker in doc.text else doc


# Every built-in filter off, so that what goes missing is the registered filter's doing.
QUIET: dict[str, Any] = {
    "workers": 1,
    "min_chars": 0,
    "quality": False,
    "repetition": False,
    "languages": [],
    "max_flagged_word_ratio": 0.0,
    "code_filters": False,
    "pii": False,
    "dedup_exact": False,
    "dedup_minhash": False,
    "bias_statistics": False,
}


def _corpus(tmp_path: Path, n: int = 12) -> tuple[Path, set[str]]:
    """A JSONL source; every third document carries the marker 'plugh'."""
    lines, marked = [], set()
    for i in range(n):
        text = f"Document number {i} tells of the river and the mill by the old bridge."
        if i % 3 == 0:
            text += " plugh"
            marked.add(f"d{i}")
        lines.append(json.dumps({"id": f"d{i}", "text": text}))
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, marked


def _recipe(tmp_path: Path, prepare: dict) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"prepare": prepare}), encoding="utf-8")
    return recipe


def _kept_ids(out: Path) -> set[str]:
    return {
        r["id"].split("/", 1)[1] for s in out.glob("shards/*.jsonl.zst") for r in read_json_lines(s)
    }


def test_a_filter_defined_in_a_test_file_runs_through_lmforge_prepare(tmp_path, capsys):
    from lmforge.cli import main

    corpus, marked = _corpus(tmp_path)
    prepare = {
        **QUIET,
        "sources": [{"path": str(corpus), "id_field": "id"}],
        "steps": [{"name": "mentions", "word": "plugh"}],
    }
    out = tmp_path / "out"
    assert main(["prepare", str(_recipe(tmp_path, prepare)), "--out", str(out)]) == 0
    kept = _kept_ids(out)
    assert kept == {f"d{i}" for i in range(12)} - marked and len(marked) == 4
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    step = next(s for s in report["steps"] if s["name"] == "mentions")
    assert step["dropped"] == {"mentions:word": 4} and step["docs_in"] == 12
    excluded = [r for p in out.glob("exclusions/*.jsonl.zst") for r in read_json_lines(p)]
    assert sorted(r["id"].split("/", 1)[1] for r in excluded) == sorted(marked)
    assert {r["reason"] for r in excluded} == {"mentions:word"}


def test_registered_steps_reach_spawned_workers(tmp_path):
    """Two workers (spawned processes that never imported this file) run the filter too."""
    from lmforge.config import PrepareConfig, PrepareSource
    from lmforge.data.pipeline import prepare

    corpus, marked = _corpus(tmp_path, 6)
    other = tmp_path / "more.jsonl"
    other.write_text(json.dumps({"id": "e1", "text": "plugh and more"}) + "\n", encoding="utf-8")
    cfg = PrepareConfig(
        sources=[PrepareSource(path=str(p), id_field="id") for p in (corpus, other)],
        steps=[{"name": "drop_marked", "marker": "plugh"}],
        **{**QUIET, "workers": 2},
    )
    prepare(cfg, tmp_path / "out", log=lambda _s: None)
    assert _kept_ids(tmp_path / "out") == {f"d{i}" for i in range(6)} - marked


def test_unknown_step_or_option_is_one_line(tmp_path, capsys):
    from lmforge.cli import main

    corpus, _ = _corpus(tmp_path)
    for step, expected in [
        ({"name": "drop_marke"}, "prepare.steps[0]: unknown step 'drop_marke' (registered:"),
        ({"name": "drop_marked", "mark": "x"}, "unknown option 'mark' (options: marker)"),
        ({"name": "mentions", "words": "x"}, "unknown option 'words' (options: word)"),
    ]:
        prepare = {**QUIET, "sources": [{"path": str(corpus)}], "steps": [step]}
        rc = main(["prepare", str(_recipe(tmp_path, prepare)), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc != 0 and expected in err and "Traceback" not in err
    assert "drop_marked" in STEPS


def test_data_imports_no_bias_and_bias_steps_run_in_a_fresh_lmforge_prepare(tmp_path, shared):
    """`data` never imports `bias`; `lmforge prepare` still runs the bias steps (CDA)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    probe = (
        "import sys, lmforge.data.pipeline, lmforge.data.decontam, lmforge.data.sources; "
        "print(sorted(m for m in sys.modules if m.startswith('lmforge.bias')))"
    )
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert got.returncode == 0 and got.stdout.strip() == "[]", got.stderr
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        text = f"He said that his brother met the king on day {i}, and he was glad of it."
        (folder / f"p{i}.txt").write_text(text, encoding="utf-8")
    prepare = {**QUIET, "sources": [{"path": str(folder)}], "cda_ratio": 1.0, "seed": 1}
    recipe = _recipe(tmp_path, prepare)
    cmd = [sys.executable, "-m", "lmforge", "prepare", str(recipe), "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "o" / "data_report.json").read_text(encoding="utf-8"))
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["cda"]["counters"]["documents_added"] == 4
    texts = [r["text"] for s in (tmp_path / "o").glob("shards/*") for r in read_json_lines(s)]
    assert sum("She said that her sister met the queen" in t for t in texts) == 4


def test_no_module_of_data_imports_bias():
    """Imports inside functions count too: bias plugs into data, never the other way."""
    import ast

    offenders = set()
    for path in sorted((SRC / "lmforge" / "data").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "lmforge.bias" or n.startswith("lmforge.bias.") for n in names):
                offenders.add(path.name)
    assert offenders == set(), offenders


@pytest.mark.parametrize("name", ["crows_pairs", "crows-pairs"])
def test_crows_pairs_decontamination_set_comes_from_the_bias_registration(name):
    from lmforge.bias.pairs import load_crows_pairs
    from lmforge.data.decontam import iter_eval_texts

    texts = list(iter_eval_texts(name))
    pairs = load_crows_pairs()
    assert texts == [s for p in pairs for s in p.sentences] and len(texts) > 1000
