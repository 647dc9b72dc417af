"""`train.cpu_processes`: `lmforge pretrain` re-run as several single-threaded CPU processes."""

import json
import subprocess
import sys

import pytest
from helpers import shakespeare_snippet, tiny_overrides

from lmforge.config import load_config
from lmforge.train import launch


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_cpu_processes_train_like_one(tmp_path):
    corpus = shakespeare_snippet(tmp_path)
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        cmd = [sys.executable, "-m", "lmforge", "pretrain"]
        cmd += [f"--{o}" for o in tiny_overrides(out, corpus)]
        # 8 rows of 32 per step: one micro-batch, split 4 + 4 between two processes
        cmd += ["--train.micro_batch_size=8", "--train.max_steps=6", "--train.eval_every=6"]
        cmd += ["--train.checkpoint_every=3", f"--train.cpu_processes={n}", "--train.threads=1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("done: step 6") == 1  # rank 0 reports, once
        runs[n] = metrics(out / "run")
    one, two = runs[1], runs[2]
    loss1 = [r["loss"] for r in one if "tokens_per_s" in r]
    loss2 = [r["loss"] for r in two if "tokens_per_s" in r]
    assert len(loss1) == len(loss2) == 6
    # Same global batch and data order: step 1 (before any update) sees the same tokens.
    assert loss2[0] == pytest.approx(loss1[0], abs=1e-6)
    # Later steps differ by float rounding only (matmuls of 4 rows instead of 8, summed
    # gradients), which Adam's first, sign-like updates amplify to ~1e-4 at this size.
    assert loss2 == pytest.approx(loss1, abs=1e-3)
    val1 = [r["val_loss"] for r in one if "val_loss" in r]
    val2 = [r["val_loss"] for r in two if "val_loss" in r]
    assert val2 == pytest.approx(val1, abs=1e-3)  # the validation split, shared by the ranks
    assert (tmp_path / "p2" / "run" / "checkpoints").is_dir()


def test_process_count_rules(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(launch, "usable_cores", lambda: 4)

    def count(*overrides):
        return launch.cpu_process_count(load_config(None, ["train.device=cpu", *overrides]))

    assert count("train.cpu_processes=1") == 1
    assert count("train.cpu_processes=0", "train.micro_batch_size=8") == 4
    assert count("train.cpu_processes=2", "train.micro_batch_size=8") == 2
    assert count("train.cpu_processes=3", "train.micro_batch_size=8") == 1  # 8 rows don't split
    monkeypatch.setenv("RANK", "0")
    assert count("train.cpu_processes=2", "train.micro_batch_size=8") == 1  # already a worker
    cmd = launch.relaunch_command(
        2, ["pretrain", "x"], load_config(None, ["train.micro_batch_size=8"])
    )
    assert cmd[-3:] == [
        "--train.micro_batch_size=4",
        "--train.threads=2",
        "--train.cpu_processes=1",
    ]
