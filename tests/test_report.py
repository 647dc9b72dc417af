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


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_report_card_model_card_and_plan_agree_on_energy(tmp_path, device):
    """One energy model: the same device, hours and count give the same kWh and CO2 in the
    report card, the model card and `lmforge plan`, each checked against the formula
    kWh = devices × watts × hours × PUE / 1000 written out here."""
    import os
    import re
    from dataclasses import replace

    from lmforge.config import Config
    from lmforge.export.model_card import model_card
    from lmforge.plan import DEVICES, Hardware, cpu_device, make_plan, model_config
    from lmforge.report import build_sections, collect

    hours = 2.5
    # The stated assumptions: 10 W per CPU core on every core of the machine; a GPU of
    # unrecorded model draws an H100's 700 W board power; PUE 1.2; 0.4 kg CO2e per kWh.
    watts = 10.0 * (os.cpu_count() or 1) if device == "cpu" else 700.0
    kwh = 1 * watts * hours * 1.2 / 1000
    co2 = kwh * 0.4

    run = tmp_path / "run"
    ckpt = run / "pretrain" / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(f"train:\n  device: {device}\n")
    (run / "pretrain" / "summary.json").write_text(
        json.dumps({"step": 1, "elapsed_s": hours * 3600})
    )
    compute = build_sections(collect(run))[0]["Compute"]
    report_kwh = float(re.search(r"energy \(kWh, estimated\)</th><td>([0-9.]+)<", compute)[1])
    report_co2 = float(re.search(r"CO2 \(kg, estimated\)</th><td>([0-9.]+)<", compute)[1])
    # the report card prints four significant digits, the model card three
    assert report_kwh == pytest.approx(kwh, rel=5e-4)
    assert report_co2 == pytest.approx(co2, rel=5e-4)

    cfg = Config()
    cfg = replace(cfg, train=replace(cfg.train, device=device))
    card = model_card(cfg, "llama", ckpt)
    card_kwh = float(re.search(r"\| energy \(estimate\) \| ([0-9.e+-]+) kWh", card)[1])
    card_co2 = float(re.search(r"\| CO2 \(estimate\) \| ([0-9.e+-]+) kg", card)[1])
    assert card_kwh == pytest.approx(kwh, rel=5e-3)
    assert card_co2 == pytest.approx(co2, rel=5e-3)

    if device == "cpu":  # a peak given, so that no matmul is timed: only the hours matter
        dev = replace(cpu_device("fp32", measure=False), peak_flops=1e12, fp32_flops=1e12)
    else:
        dev = DEVICES["H100"]
    plan = make_plan(model_config("cpu-tiny"), Hardware(dev, 1, dtype="fp32"), hours=hours)
    assert plan.hours == pytest.approx(hours, rel=1e-12)
    assert plan.energy_kwh == pytest.approx(kwh, rel=1e-12)
    assert plan.co2_kg == pytest.approx(co2, rel=1e-12)


def test_a_note_left_in_the_run_opens_the_headline(run_folder):
    """A tool (a sweep's trial) leaves `report_note.html`; the card shows it first."""
    from lmforge.report import HEADLINE_NOTE

    (run_folder / HEADLINE_NOTE).write_text("<p>Trial 7 of the sweep in <code>s</code></p>")
    write_report(run_folder)
    md = (run_folder / "report.md").read_text()
    head = md[md.index("## Headline") : md.index("## Evaluation")]
    assert head.index("Trial 7 of the sweep") < head.index("validation bits/byte")


def test_a_package_adds_a_data_report_section_through_the_registry(monkeypatch):
    """A section registered from outside `lmforge.data` (as `lmforge.bias` does) lands in
    data_report.json, built from the merged step statistics, and in data_report.md."""
    from lmforge.config import PrepareConfig
    from lmforge.data import report as data_report

    # The plug-ins register into the real table first (a module registers once, when
    # imported); the test's own section goes into a copy that is dropped afterwards.
    data_report.registered_sections()
    monkeypatch.setattr(data_report, "REPORT_SECTIONS", dict(data_report.REPORT_SECTIONS))

    @data_report.register_report_section(
        "word_census", lambda s: f"## Word census\n\n{s['documents_seen']} documents\n"
    )
    def build(cfg, steps):
        return {"documents_seen": steps["read"]["docs_in"]}

    read = {
        "name": "read", "docs_in": 5, "docs_out": 4, "bytes_in": 50, "bytes_out": 40,
        "words_in": 10, "words_out": 8, "seconds": 0.5, "dropped": {"empty": 1},
        "examples": [], "counters": {},
    }  # fmt: skip
    stage1 = [{"source": "s", "files": 1, "kept": 4, "steps": [read]}]
    timing = {"wall_seconds": 1.0, "workers": 1, "executor": "local"}
    report = data_report.build_report(PrepareConfig(), [], stage1, {}, [], timing)
    assert report["word_census"] == {"documents_seen": 5}
    assert list(report).index("word_census") < list(report).index("throughput")
    md = data_report.render_markdown(report)
    assert "## Word census\n\n5 documents\n\n## Examples of removed documents" in md


def test_report_modules_import_nothing_above_them():
    """The report card does not import the sweep, data's report not bias, hardware not plan
    (function-body imports included): those import them, or register with them."""
    import ast

    import lmforge

    forbidden = {
        "report.py": ("lmforge.sweep",),
        "data/report.py": ("lmforge.bias",),
        "hardware.py": ("lmforge.plan",),
        "energy.py": ("lmforge",),
        "plan_cli.py": ("lmforge.cli",),
    }
    root = Path(lmforge.__file__).parent
    for name, prefixes in forbidden.items():
        tree = ast.parse((root / name).read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        bad = [m for m in imported for p in prefixes if m == p or m.startswith(p + ".")]
        assert not bad, f"{name} imports {bad}"
