"""SIGKILL at seeded random points of every long-running command; the rerun must lose nothing.

Each test runs the command once uninterrupted (counting its file operations),
then, for each seeded kill point k, runs it again killed just before operation
k (see `reliability_helpers`), reruns it with resume and compares the final
artefacts with the uninterrupted run's bit for bit (CPU runs are deterministic).

The default suite runs a few points per stage; ``-m slow`` runs 20 per stage.
`benchmarks/reliability.py` runs the slow suite and writes the table in
BENCHMARKS.md from the records the tests append to $LMFORGE_RELIABILITY_LOG.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
from pathlib import Path

import pytest
from helpers import shakespeare_snippet, tiny_run_overrides
from reliability_helpers import (
    count_ops,
    kill_points,
    metrics_losses,
    newest_weights,
    run_killed,
    same_weights,
    tree_bytes,
)
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.pretrain import tokenize_stage, tokenizer_stage
from lmforge.shards import shards_complete
from lmforge.train.checkpoint import list_checkpoints, verify_checkpoint

# The default suite also has tests/test_run.py's SIGKILL of `lmforge run`.
FAST_POINTS, SLOW_POINTS = 2, 20
SEED = 20261130


def record(stage: str, **figures) -> None:
    """Append one result line for benchmarks/reliability.py (when it asks for them)."""
    log = os.environ.get("LMFORGE_RELIABILITY_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"test": "kill", "stage": stage, **figures}) + "\n")


def pretrain_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        f"--data.sources=[{corpus}]",
        "--data.val_fraction=0.1",
        "--tokenizer.kind=char",
        "--model.context_length=32",
        "--model.n_layers=1",
        "--model.d_model=32",
        "--model.n_heads=2",
        "--train.max_steps=8",
        "--train.tokens_per_step=256",
        "--train.micro_batch_size=4",
        "--train.warmup_steps=2",
        "--train.log_every=1",
        "--train.eval_every=4",
        "--train.eval_tokens=256",
        "--train.checkpoint_every=2",
        "--train.keep_last=2",
        "--train.peak_flops=1e11",
        "--train.dtype=fp32",
        "--train.tensorboard=false",
        f"--output.dir={out}",
        *extra,
    ]


def killed(proc) -> bool:
    return proc.returncode == -signal.SIGKILL


def rerun(args: list[str]) -> None:
    """The rerun after a kill, in this process (saves an interpreter start per point)."""
    from lmforge.cli import main

    assert main(args) == 0


# ----------------------------------------------------------------------------- tokenize


def check_tokenize(tmp_path: Path, n_points: int) -> None:
    """Both ways of splitting validation off, half of the kill points each."""
    corpus = shakespeare_snippet(tmp_path, 40_000)
    total = 0
    for i, split in enumerate(("document", "tail")):
        base = [
            "--tokenizer.kind=char",
            f"--data.sources=[{corpus}]",
            "--data.val_fraction=0.2",
            f"--data.split={split}",
        ]
        args = lambda out, base=base: ["tokenize", *base, f"--output.dir={out}"]
        ref = tmp_path / f"ref-{split}"
        n_ops = count_ops(args(ref), tmp_path)
        assert (ref / "tokens" / "tokens_complete.json").exists()
        # the shards; the marker may be missing when the kill came after the last header
        want = tree_bytes(ref / "tokens", "*_0*")
        assert {"train_00000.bin", "val_00000.bin"} <= set(want)
        points = kill_points(n_ops, (n_points + 1 - i) // 2, SEED + i)
        for k in points:
            out = tmp_path / f"{split}-k{k}"
            proc = run_killed(args(out), k)
            assert killed(proc), (k, proc.returncode, proc.stderr[-2000:])
            # the consumer (pretrain, run) takes the folder only if it is complete
            cfg = load_config("quickstart", [o.lstrip("-") for o in base] + [f"output.dir={out}"])
            tok = tokenizer_stage(cfg, out)
            tokens = tokenize_stage(cfg, tok, out)
            assert shards_complete(tokens, tok.hash)
            assert tree_bytes(tokens, "*_0*") == want, f"{split} kill point {k}: tokens differ"
        total += len(points)
    record("tokenize", points=total, survived=total, ops=n_ops)


def test_kill_tokenize_fast(tmp_path):
    check_tokenize(tmp_path, 2)


@pytest.mark.slow
def test_kill_tokenize_slow(tmp_path):
    check_tokenize(tmp_path, SLOW_POINTS)


# ----------------------------------------------------------------------------- pretrain


def check_pretrain(tmp_path: Path, n_points: int) -> None:
    corpus = shakespeare_snippet(tmp_path, 30_000)
    ref = tmp_path / "ref"
    n_ops = count_ops(pretrain_args(corpus, ref), tmp_path)
    want_w, want_l = newest_weights(ref), metrics_losses(ref)
    assert sorted(want_l) == list(range(1, 9))
    points = kill_points(n_ops, n_points, SEED + 1)
    for k in points:
        out = tmp_path / f"k{k}"
        proc = run_killed(pretrain_args(corpus, out), k)
        assert killed(proc), (k, proc.returncode, proc.stderr[-2000:])
        rerun([*pretrain_args(corpus, out), "--resume", "auto"])
        assert same_weights(newest_weights(out), want_w), f"kill point {k}: weights differ"
        assert metrics_losses(out) == want_l, f"kill point {k}: losses differ"
    record("pretrain", points=len(points), survived=len(points), ops=n_ops)


@pytest.mark.slow
def test_kill_pretrain_slow(tmp_path):
    check_pretrain(tmp_path, SLOW_POINTS)


# ----------------------------------------------------------------------------- checkpoint writing


def check_checkpoint_writes(tmp_path: Path, n_points: int, resume: bool = False) -> None:
    """A checkpoint every step, so most operations are inside `save_checkpoint`.

    After each kill every folder named ``step_*`` must verify and hold exactly the
    uninterrupted run's tensors for that step: a half-written one is never taken.
    With `resume`, the rerun must then end with the uninterrupted run's weights and losses.
    """
    corpus = shakespeare_snippet(tmp_path, 30_000)
    extra = ("--train.checkpoint_every=1", "--train.keep_last=3")
    ref = tmp_path / "ref"
    n_ops = count_ops(pretrain_args(corpus, ref, *extra, "--train.keep_last=100"), tmp_path)
    want = {p.name: ckpt_tensors(p) for p in list_checkpoints(ref)}
    assert len(want) == 8
    want_l = metrics_losses(ref)
    points = kill_points(n_ops, n_points, SEED + 2)
    seen = 0
    for k in points:
        out = tmp_path / f"k{k}"
        proc = run_killed(pretrain_args(corpus, out, *extra), k)
        assert killed(proc), (k, proc.returncode, proc.stderr[-2000:])
        for ckpt in list_checkpoints(out):
            verify_checkpoint(ckpt)
            got = ckpt_tensors(ckpt)
            assert same_weights(got, want[ckpt.name]), (k, ckpt.name)
            seen += 1
        if resume:
            rerun([*pretrain_args(corpus, out, *extra), "--resume", "auto"])
            assert same_weights(ckpt_tensors(list_checkpoints(out)[-1]), want["step_00000008"])
            assert metrics_losses(out) == want_l, k
    record("checkpoint", points=len(points), survived=len(points), ops=n_ops, verified=seen)


def ckpt_tensors(ckpt: Path) -> dict:
    """Weights, Adam moments and RNG state of a checkpoint, as flat name → tensor."""

    out = {f"model.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    from lmforge.train.checkpoint import read_optimizer_state, read_rng_state

    opt = read_optimizer_state(ckpt)
    for i, state in opt.get("state", {}).items():
        for name, value in state.items():
            out[f"opt.{i}.{name}"] = value
    out["rng"] = read_rng_state(ckpt)["cpu"]
    return out


def test_kill_pretrain_and_checkpoint_writes_fast(tmp_path):
    check_checkpoint_writes(tmp_path, FAST_POINTS, resume=True)


@pytest.mark.slow
def test_kill_checkpoint_writes_slow(tmp_path):
    check_checkpoint_writes(tmp_path, SLOW_POINTS)


# ----------------------------------------------------------------------------- finetune


def finetune_args(data: Path, out: Path) -> list[str]:
    return [
        "finetune",
        f"--output.dir={out}",
        "--tokenizer.kind=char",
        "--model.context_length=96",
        "--model.n_layers=1",
        "--model.d_model=32",
        "--model.n_heads=2",
        "--model.dropout=0.1",
        "--train.max_steps=6",
        "--train.tokens_per_step=384",
        "--train.micro_batch_size=2",
        "--train.warmup_steps=2",
        "--train.log_every=1",
        "--train.eval_every=3",
        "--train.checkpoint_every=2",
        "--train.peak_flops=1e11",
        "--train.tensorboard=false",
        "--finetune.task=translation",
        f"--finetune.train_files=[{data}]",
        f"--finetune.val_files=[{data}]",
        f"--finetune.test_files=[{data}]",
        "--finetune.max_examples=12",
        "--finetune.eval_examples=2",
        "--finetune.max_new_tokens=4",
        "--finetune.method=lora",
        "--finetune.lora_rank=2",
        "--finetune.lora_dropout=0.1",
    ]


def pairs_file(shared: Path, tmp_path: Path, n: int = 32) -> Path:
    with gzip.open(shared / "multi30k" / "train.en.gz", "rt") as fs:
        src = [next(fs).strip() for _ in range(n)]
    with gzip.open(shared / "multi30k" / "train.de.gz", "rt") as ft:
        tgt = [next(ft).strip() for _ in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"source": s, "target": t}) + "\n" for s, t in zip(src, tgt, strict=True)
        )
    )
    return path


def check_finetune(shared: Path, tmp_path: Path, n_points: int) -> None:
    data = pairs_file(shared, tmp_path)
    ref = tmp_path / "ref"
    n_ops = count_ops(finetune_args(data, ref), tmp_path)
    want_w, want_l = newest_weights(ref), metrics_losses(ref)
    want_test = (ref / "test_outputs.jsonl").read_bytes()
    points = kill_points(n_ops, n_points, SEED + 3)
    for k in points:
        out = tmp_path / f"k{k}"
        proc = run_killed(finetune_args(data, out), k)
        assert killed(proc), (k, proc.returncode, proc.stderr[-2000:])
        rerun([*finetune_args(data, out), "--resume", "auto"])
        assert same_weights(newest_weights(out), want_w), f"kill point {k}: weights differ"
        assert metrics_losses(out) == want_l, f"kill point {k}: losses differ"
        assert (out / "test_outputs.jsonl").read_bytes() == want_test, k
    record("finetune", points=len(points), survived=len(points), ops=n_ops)


def test_kill_finetune_fast(shared, tmp_path):
    check_finetune(shared, tmp_path, 1)


@pytest.mark.slow
def test_kill_finetune_slow(shared, tmp_path):
    check_finetune(shared, tmp_path, SLOW_POINTS)


# ----------------------------------------------------------------------------- lmforge run


def run_args(tmp_path: Path, corpus: Path, out: Path) -> list[str]:
    overrides = tiny_run_overrides(
        tmp_path,
        corpus,
        out,
        "train.max_steps=6",
        "finetune.max_steps=4",
        "run.stages=[tokenizer,tokenize,pretrain,finetune]",
    )
    return ["run", "quickstart", *(f"--{o}" for o in overrides)]


def check_run(tmp_path: Path, n_points: int) -> None:
    corpus = shakespeare_snippet(tmp_path, 30_000)
    ref = tmp_path / "ref"
    n_ops = count_ops(run_args(tmp_path, corpus, ref), tmp_path)
    want = {s: newest_weights(ref / s) for s in ("pretrain", "finetune")}
    want_tokens = tree_bytes(ref / "tokens")
    points = kill_points(n_ops, n_points, SEED + 4)
    for k in points:
        out = tmp_path / f"k{k}"
        proc = run_killed(run_args(tmp_path, corpus, out), k)
        assert killed(proc), (k, proc.returncode, proc.stderr[-2000:])
        rerun(run_args(tmp_path, corpus, out))
        assert tree_bytes(out / "tokens") == want_tokens, k
        for stage, w in want.items():
            assert same_weights(newest_weights(out / stage), w), (k, stage)
    record("run", points=len(points), survived=len(points), ops=n_ops)


@pytest.mark.slow
def test_kill_run_slow(tmp_path):
    check_run(tmp_path, SLOW_POINTS)


def test_weights_compare_can_fail(tmp_path):
    """The comparison the kill tests rely on sees a one-bit change."""
    import torch
    from safetensors.torch import save_file

    a = {"w": torch.ones(3)}
    b = {"w": torch.ones(3).clone()}
    b["w"][1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    save_file(b, str(tmp_path / "b.safetensors"))
    assert same_weights(a, a) and not same_weights(a, load_file(str(tmp_path / "b.safetensors")))


def test_unfinished_tokens_folders_are_never_taken_as_finished(tmp_path):
    """The states a kill can leave, built by hand (several shards per split)."""
    from lmforge.data.sources import iter_documents
    from lmforge.shards import COMPLETE, tokenize_documents
    from lmforge.tokenizer import train_tokenizer

    corpus = shakespeare_snippet(tmp_path, 40_000)
    docs = list(iter_documents([str(corpus)]))
    tok = train_tokenizer((d.text for d in docs), "char", 0)

    def folder(name):
        out = tmp_path / name
        tokenize_documents(docs, tok, out, 0.3, shard_tokens=5_000)
        assert len(list(out.glob("val_*.bin"))) >= 2 and shards_complete(out, tok.hash)
        (out / COMPLETE).unlink()
        return out

    assert shards_complete(folder("no-marker"), tok.hash)  # killed just before the marker
    out = folder("header-missing")  # killed between a shard's rename and its header
    sorted(out.glob("val_*.json"))[-1].unlink()
    assert not shards_complete(out, tok.hash)
    out = folder("tmp-left")  # killed while writing a shard
    sorted(out.glob("train_*.bin"))[-1].rename(out / "train_00009.bin.tmp")
    sorted(out.glob("train_*.json"))[-1].unlink()
    assert not shards_complete(out, tok.hash)
    out = folder("no-val")  # killed after the train split, before any val header
    for p in out.glob("val_*"):
        p.unlink()
    assert not shards_complete(out, tok.hash)
    other = train_tokenizer(["xyz"], "char", 0)
    full = tmp_path / "other-tokenizer"
    tokenize_documents(docs, tok, full, 0.3, shard_tokens=5_000)
    assert not shards_complete(full, other.hash)
