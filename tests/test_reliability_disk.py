"""A full disk: the run stops with a clear error, and finished work stays intact and usable.

Most tests inject ENOSPC at a chosen byte budget (portable); one writes a real
pre-training run into a tiny tmpfs when this machine allows mounting one (root).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import shakespeare_snippet, tiny_config
from reliability_helpers import metrics_losses, newest_weights, same_weights

from lmforge.pretrain import build_model, model_config_for, tokenize_stage, tokenizer_stage
from lmforge.shards import COMPLETE, ShardError, shards_complete, tokenize_documents
from lmforge.train import checkpoint as ckpt_module
from lmforge.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from lmforge.train.loop import Trainer

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def record(stage: str, **figures) -> None:
    log = os.environ.get("LMFORGE_RELIABILITY_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"test": "disk_full", "stage": stage, **figures}) + "\n")


class FullDisk:
    """A file wrapper that accepts `budget` bytes in all, then fails with ENOSPC."""

    def __init__(self, fh, budget: dict[str, int]):
        self.fh, self.budget = fh, budget

    def write(self, data) -> int:
        if len(data) > self.budget["left"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget["left"] -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def trainer_for(cfg):
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage(cfg, run_dir)
    tokens = tokenize_stage(cfg, tok, run_dir)
    cfg = replace(cfg, model=model_config_for(cfg, tok))
    from lmforge.shards import TokenLoader

    loader = TokenLoader(tokens, "train", cfg.model.context_length, cfg.train.seed)
    model = build_model(cfg.model, cfg.train.seed)
    return Trainer(cfg, model, run_dir, loader, log=lambda *_: None)


def test_enospc_while_checkpointing_keeps_the_last_good_one_and_resume_matches(
    tmp_path, monkeypatch
):
    corpus = shakespeare_snippet(tmp_path, 60_000)
    opts = ("train.checkpoint_every=2", "train.max_steps=8")
    ref_cfg = tiny_config(tmp_path / "ref", *opts, corpus=corpus)
    trainer_for(ref_cfg).fit()
    cfg = tiny_config(tmp_path / "full", *opts, corpus=corpus)
    real_save = ckpt_module.save_file
    calls = {"n": 0}

    def save_until_full(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 8:  # optimizer.safetensors of the third checkpoint (step 6)
            raise ENOSPC
        return real_save(tensors, path, *a, **kw)

    monkeypatch.setattr(ckpt_module, "save_file", save_until_full)
    with pytest.raises(CheckpointError) as err:
        trainer_for(cfg).fit()
    message = str(err.value)
    assert "step_00000006" in message and "optimizer.safetensors" in message
    assert "the disk is full" in message
    run = tmp_path / "full" / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert not list((run / "checkpoints").glob(".tmp-*")), "the partial checkpoint was not removed"
    assert latest_checkpoint(run, log=lambda _m: None).name == "step_00000004"
    monkeypatch.setattr(ckpt_module, "save_file", real_save)  # space freed
    trainer_for(cfg).fit(resume="auto")
    assert same_weights(newest_weights(run), newest_weights(tmp_path / "ref" / "run"))
    assert metrics_losses(run) == metrics_losses(tmp_path / "ref" / "run")
    record("checkpoint", injected=1, intact=2, resumed_equal=True)


def test_enospc_while_tokenizing_keeps_finished_shards_and_is_redone(tmp_path, monkeypatch):
    from lmforge.data.sources import iter_documents
    from lmforge.shards import ShardWriter
    from lmforge.tokenizer import train_tokenizer

    corpus = shakespeare_snippet(tmp_path, 60_000)
    docs = list(iter_documents([str(corpus)]))
    tok = train_tokenizer((d.text for d in docs), "char", 0)
    ref = tmp_path / "ref"
    tokenize_documents(docs, tok, ref, 0.1, shard_tokens=10_000)
    budget = {"left": 25_000}  # bytes: two train shards of 20,000 fit, the third does not
    real_open = ShardWriter._open

    def open_on_small_disk(self):
        real_open(self)
        self.fh = FullDisk(self.fh, budget)

    monkeypatch.setattr(ShardWriter, "_open", open_on_small_disk)
    out = tmp_path / "tokens"
    with pytest.raises(ShardError, match=r"train_00001\.bin\.tmp: could not write token shard"):
        tokenize_documents(docs, tok, out, 0.1, shard_tokens=10_000)
    assert not (out / COMPLETE).exists() and not shards_complete(out, tok.hash)
    assert not list(out.glob("*.tmp")), "partial shard left behind"
    finished = sorted(p.name for p in out.glob("train_*.json"))
    assert finished == ["train_00000.json"]
    # the finished shard is complete and identical to the uninterrupted one
    assert (out / "train_00000.bin").read_bytes() == (ref / "train_00000.bin").read_bytes()
    header = json.loads((out / "train_00000.json").read_text())
    assert header["n_tokens"] * 2 == (out / "train_00000.bin").stat().st_size
    monkeypatch.setattr(ShardWriter, "_open", real_open)  # space freed
    tokenize_documents(docs, tok, out, 0.1, shard_tokens=10_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in ref.iterdir()
    }
    record("tokenize", injected=1, intact=1, resumed_equal=True)


def test_enospc_in_prepare_names_the_file_and_rerun_matches(tmp_path, shared, monkeypatch):
    from lmforge.config import PrepareConfig, PrepareSource
    from lmforge.data import pipeline
    from lmforge.data.pipeline import prepare

    cfg = PrepareConfig(
        sources=[
            PrepareSource(
                path=str(shared / "gutenberg"),
                name="books",
                include=["pg35_*", "pg46_*", "pg1513_*"],
                license="public-domain",
            )
        ],
        workers=1,
        task_bytes=150_000,
        decontaminate=[],
        repetition=False,
    )
    ref = tmp_path / "ref"
    prepare(cfg, ref, log=lambda _s: None)
    budget = {"left": 200_000}
    real_init = pipeline.ShardWriter.__init__

    def init_on_small_disk(self, path):
        real_init(self, path)
        self.raw = FullDisk(self.raw, budget)
        import zstandard

        self.zfh = zstandard.ZstdCompressor(level=pipeline.ZSTD_LEVEL).stream_writer(self.raw)

    monkeypatch.setattr(pipeline.ShardWriter, "__init__", init_on_small_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError) as err:
        prepare(cfg, out, log=lambda _s: None)
    assert err.value.errno == errno.ENOSPC and str(err.value.filename).endswith(".tmp")
    assert "No space left on device" in str(err.value)
    assert not (out / "data_report.json").exists()
    done = list((out / "_state").rglob("*.done"))
    monkeypatch.setattr(pipeline.ShardWriter, "__init__", real_init)  # space freed
    prepare(cfg, out, log=lambda _s: None)
    snap = lambda d: {
        p.relative_to(d).as_posix(): p.read_bytes() for p in sorted((d / "shards").rglob("*"))
    }
    assert snap(out) == snap(ref)
    assert not list(out.rglob("*.tmp"))
    record("prepare", injected=1, intact=len(done), resumed_equal=True)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_pretrain_into_a_tiny_tmpfs_stops_with_a_clear_error(tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "900k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the ENOSPC injections cover this")
    try:
        corpus = shakespeare_snippet(tmp_path, 60_000)
        args = [
            "pretrain",
            f"--data.sources=[{corpus}]",
            "--tokenizer.kind=char",
            "--model.context_length=32",
            "--model.n_layers=1",
            "--model.d_model=32",
            "--model.n_heads=2",
            "--train.max_steps=200",
            "--train.tokens_per_step=256",
            "--train.micro_batch_size=4",
            "--train.eval_every=1000",
            "--train.checkpoint_every=1",
            "--train.keep_last=1000",
            "--train.peak_flops=1e11",
            "--train.tensorboard=false",
            f"--output.dir={mnt / 'run'}",
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(
            [sys.executable, "-m", "lmforge", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert "lmforge: error:" in done.stderr
        # the checkpoint writer or the metrics log is the first to hit the full disk
        assert "the disk is full" in done.stderr or "No space left on device" in done.stderr
        assert not list((mnt / "run" / "checkpoints").glob(".tmp-*"))
        ckpts = list_checkpoints(mnt / "run")
        assert len(ckpts) >= 1, "nothing fit: make the tmpfs larger"
        for ckpt in ckpts:
            ckpt_module.verify_checkpoint(ckpt)  # every finished checkpoint is whole
        model = build_model(json_model_config(ckpts[-1]), 0)
        ckpt_module.load_checkpoint(ckpts[-1], model)  # and loads into a model
        record("pretrain_tmpfs", checkpoints_intact=len(ckpts), error=done.stderr.strip()[-200:])
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def json_model_config(ckpt: Path):
    from lmforge.config import config_from_dict

    state = json.loads((ckpt / "trainer_state.json").read_text())
    return config_from_dict(state["config"]).model


def test_full_disk_file_wrapper_fails_at_the_budget(tmp_path):
    budget = {"left": 5}
    with (tmp_path / "f").open("wb") as raw:
        fh = FullDisk(raw, budget)
        fh.write(b"12345")
        with pytest.raises(OSError) as err:
            fh.write(b"6")
    assert err.value.errno == errno.ENOSPC and (tmp_path / "f").read_bytes() == b"12345"
