"""`lmforge run`: stage keys, skipping, partial reruns, resume after SIGKILL, the report card."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import shakespeare_snippet, tiny_run_overrides
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.run import run_recipe, stage_keys


def state_of(run: Path) -> dict:
    return json.loads((run / "stages.json").read_text())


def newest_weights(folder: Path) -> dict:
    ckpt = sorted((folder / "checkpoints").glob("step_*"))[-1]
    return load_file(str(ckpt / "model.safetensors"))


def test_keys_follow_dependencies(tmp_path):
    base = tiny_run_overrides(tmp_path, tmp_path, tmp_path / "run")
    a = stage_keys(load_config("quickstart", base))
    b = stage_keys(load_config("quickstart", [*base, "finetune.lr=1e-4"]))
    assert [s for s in a if a[s] != b[s]] == ["finetune", "eval", "export"]
    c = stage_keys(load_config("quickstart", [*base, "model.n_layers=2"]))
    assert [s for s in a if a[s] != c[s]] == ["pretrain", "finetune", "eval", "export"]
    d = stage_keys(load_config("quickstart", [*base, "output.dir=elsewhere"]))
    assert a == d


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    corpus = shakespeare_snippet(tmp, 60_000)
    run = tmp / "run"
    overrides = tiny_run_overrides(tmp, corpus, run)
    run_recipe("quickstart", overrides)
    return run, overrides


def test_report_card_in_chromium(finished_run, tmp_path):
    """Every section present and every image loaded in a real browser; a screenshot is kept."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("/usr/bin/chromium is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from lmforge.report import SECTIONS, _anchor

    run, _ = finished_run
    out = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--disable-quic",
    ]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=args, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((run / "report.html").as_uri())
        ids = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
        assert ids == [_anchor(s) for s in SECTIONS]
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.alt, e.complete && e.naturalWidth > 0])"
        )
        assert len(images) >= 4 and all(ok for _, ok in images), images
        assert "pretrained" in page.inner_text("#evaluation")
        assert "bits_per_byte" in page.inner_text("#evaluation")
        page.screenshot(path=str(out / "report.png"), full_page=True)
        browser.close()
    assert not errors
    assert (out / "report.png").stat().st_size > 10_000


def test_rerun_skips_and_a_finetune_change_reruns_only_downstream(finished_run):
    run, overrides = finished_run
    first = state_of(run)
    assert all(first[s]["done"] for s in first)
    assert (run / "report.html").exists() and (run / "export" / "hf" / "config.json").exists()

    t0 = time.perf_counter()
    run_recipe("quickstart", overrides)
    assert time.perf_counter() - t0 < 30
    second = state_of(run)
    for stage in ("tokenizer", "tokenize", "pretrain", "finetune", "eval", "export"):
        assert second[stage] == first[stage], stage  # not rerun

    pre_weights = newest_weights(run / "pretrain")
    run_recipe("quickstart", [*overrides, "finetune.lr=1e-4"])
    third = state_of(run)
    for stage in ("tokenizer", "tokenize", "pretrain"):
        assert third[stage] == first[stage], stage
    for stage in ("finetune", "eval", "export"):
        assert third[stage]["key"] != first[stage]["key"], stage
    again = newest_weights(run / "pretrain")
    assert all((pre_weights[k] == again[k]).all() for k in pre_weights)


def test_report_samples_show_no_special_token(finished_run):
    """The fine-tuned model is sampled through its chat template and stops at the end of its
    turn; no sample in samples.json or the report card shows a special token."""
    from lmforge.tokenizer import SPECIAL_TOKENS

    run, _ = finished_run
    samples = json.loads((run / "eval" / "samples.json").read_text())
    assert set(samples) == {"pretrained", "finetuned"}
    texts = [t for ts in samples.values() for t in ts]
    texts += [(run / "report.md").read_text(), (run / "report.html").read_text()]
    for text in texts:
        for special in SPECIAL_TOKENS:
            assert special not in text and special.replace("<", "&lt;") not in text, text
    assert all(t.startswith("user: ") and "\nassistant: " in t for t in samples["finetuned"])


def _cli(overrides, env):
    return [sys.executable, "-m", "lmforge", "run", "quickstart", *(f"--{o}" for o in overrides)]


@pytest.mark.parametrize("kill_in", ["pretrain", "finetune"])
def test_sigkill_during_a_stage_then_rerun_matches_uninterrupted(tmp_path, kill_in):
    corpus = shakespeare_snippet(tmp_path, 60_000)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    extra = ["train.max_steps=30", "finetune.max_steps=16"]
    ref = tmp_path / "ref"
    done = subprocess.run(
        _cli(tiny_run_overrides(tmp_path, corpus, ref, *extra), env),
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "killed"
    cmd = _cli(tiny_run_overrides(tmp_path, corpus, run, *extra), env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpts = list((run / kill_in / "checkpoints").glob("step_*"))
        if len(ckpts) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not state_of(run).get(kill_in, {}).get("done"), "the stage finished before the kill"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for stage in ("pretrain", "finetune"):
        wa, wb = newest_weights(ref / stage), newest_weights(run / stage)
        assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa), stage
    ea = json.loads((ref / "eval" / "eval.json").read_text())["checkpoints"]
    eb = json.loads((run / "eval" / "eval.json").read_text())["checkpoints"]
    assert [r["results"] for r in ea] == [r["results"] for r in eb]
    assert json.loads((ref / "eval" / "samples.json").read_text()) == json.loads(
        (run / "eval" / "samples.json").read_text()
    )
