"""Acceptance: `lmforge prepare` on the data-mix recipe, then tokenize and pre-train on it."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main


@pytest.mark.slow
def test_prepare_tokenize_pretrain_on_the_data_mix(tmp_path):
    prepared = tmp_path / "prepared"
    run = tmp_path / "run"
    common = [
        f"--data.sources=[{prepared}/shards]",
        f"--output.dir={run}",
        f"--prepare.output={prepared}",
        # Keep the slow test to minutes: a small tokenizer trained on 1 MB.
        "--tokenizer.vocab_size=512",
        "--tokenizer.train_bytes=1000000",
    ]
    assert main(["prepare", "data-mix", *common]) == 0
    report = json.loads((prepared / "data_report.json").read_text())
    sources = {s["name"]: s for s in report["sources"]}
    assert set(sources) == {"gutenberg", "web", "warc", "python-stdlib"}
    assert all(s["docs_out"] > 0 for s in sources.values())
    assert (prepared / "data_report.md").exists()
    train = [
        "--train.max_steps=6",
        "--train.eval_every=3",
        "--train.checkpoint_every=3",
        "--train.log_every=1",
    ]
    assert main(["tokenize", "data-mix", *common]) == 0
    header = json.loads((run / "tokens" / "val_00000.json").read_text())
    assert header["n_documents"] > 0
    assert main(["pretrain", "data-mix", *common, *train]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
