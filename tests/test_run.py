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


def test_rerun_skips_and_a_finetune_change_reruns_only_downstream(tmp_path):
    corpus = shakespeare_snippet(tmp_path, 60_000)
    run = tmp_path / "run"
    overrides = tiny_run_overrides(tmp_path, corpus, run)
    run_recipe("quickstart", overrides)
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
