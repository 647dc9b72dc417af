"""The report card: headline first, token shards only (no marker files), figures with errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.eval.results import CheckpointResults, Result, write_eval_json
from lmforge.report import SECTIONS, write_report
from lmforge.shards import COMPLETE, FORMAT


def _header(n_tokens: int) -> dict:
    return {"format": FORMAT, "n_tokens": n_tokens, "n_documents": 3, "n_bytes": 4 * n_tokens}


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    tokens = run / "tokens"
    tokens.mkdir(parents=True)
    for name, n in (("train_00000", 1000), ("val_00000", 100)):
        (tokens / f"{name}.json").write_text(json.dumps(_header(n)))
        np.zeros(n, dtype=np.uint16).tofile(tokens / f"{name}.bin")
    (tokens / COMPLETE).write_text(json.dumps({"tokenizer_hash": "abc"}))
    (run / "stages.json").write_text(
        json.dumps({"tokenize": {"key": "0123456789abcdef", "done": True, "seconds": 1.0}})
    )
    (run / "pretrain").mkdir()
    (run / "pretrain" / "summary.json").write_text(
        json.dumps({"val_bpb": 1.504, "unigram_bpb": 2.449, "elapsed_s": 10.0})
    )
    results = [
        Result("ppl", "loss", 1.1, 40, stderr=0.02),
        Result("ppl", "bits_per_byte", 1.5123, 40, stderr=0.0311),
    ]
    write_eval_json(run / "eval" / "eval.json", [CheckpointResults("pretrained: x", results)])
    (run / "eval" / "samples.json").write_text(json.dumps({"pretrained": ["def sample_text()"]}))
    return run


def test_marker_files_are_not_listed_as_shards(run_folder):
    write_report(run_folder)
    md = (run_folder / "report.md").read_text()
    assert "| train_00000 |" in md and "| val_00000 |" in md
    assert "tokens_complete" not in md
    assert "tokens_complete" not in (run_folder / "report.html").read_text()


def test_headline_comes_first_and_stage_keys_last(run_folder):
    write_report(run_folder)
    md = (run_folder / "report.md").read_text()
    headings = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS and headings[0] == "Headline"
    head = md[md.index("## Headline") : md.index("## Evaluation")]
    assert "1.504" in head and "61% of it" in head  # validation bits/byte vs unigram
    assert "1.5123 ± 0.0311" in head  # the eval figure with its standard error
    assert "def sample_text()" in head
    # stage keys, shard tables and hashes come after every number
    assert md.index("0123456789abcdef") > md.index("## Samples")
    assert md.index("## Stages") > md.index("## Data") > md.index("## Training curves")
    html = (run_folder / "report.html").read_text()
    assert html.index('id="headline"') < html.index('id="data"') < html.index('id="stages"')
