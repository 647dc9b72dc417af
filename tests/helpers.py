"""Small builders shared by the core tests."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import Config, load_config
from lmforge.paths import shared_data


def shakespeare_snippet(tmp: Path, n_chars: int = 200_000) -> Path:
    """A text file with the first `n_chars` of tinyshakespeare, split into 20 documents."""
    text = (shared_data() / "tinyshakespeare" / "input.txt").read_text()[:n_chars]
    folder = tmp / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    step = len(text) // 20
    for i in range(20):
        (folder / f"part{i:02d}.txt").write_text(text[i * step : (i + 1) * step])
    return folder


def tiny_config(tmp: Path, *overrides: str, corpus: Path | None = None) -> Config:
    corpus = corpus or shakespeare_snippet(tmp)
    return load_config(None, tiny_overrides(tmp, corpus) + list(overrides))


def tiny_overrides(tmp: Path, corpus: Path) -> list[str]:
    """The overrides of `tiny_config`: a 2-layer char model, 8 steps, output in tmp/run."""
    return [
        f"data.sources=[{corpus}]",
        "data.val_fraction=0.1",
        "tokenizer.kind=char",
        "model.context_length=32",
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=4",
        "train.max_steps=8",
        "train.tokens_per_step=256",
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=4",
        "train.eval_tokens=512",
        "train.checkpoint_every=4",
        "train.keep_last=10",
        "train.peak_flops=1e11",
        "train.dtype=fp32",
        f"output.dir={tmp / 'run'}",
    ]


def tiny_run_overrides(tmp: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    """`lmforge run quickstart` shrunk to seconds: tiny BPE model, few steps, few examples."""
    return [
        f"data.sources=[{corpus}]",
        "data.val_fraction=0.1",
        "tokenizer.vocab_size=400",
        "model.n_layers=1",
        "model.d_model=32",
        "model.n_heads=2",
        "model.context_length=64",
        "train.micro_batch_size=4",
        "train.tokens_per_step=256",
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_tokens=512",
        "train.checkpoint_every=2",
        "train.peak_flops=1e11",
        "train.dtype=fp32",
        "train.tensorboard=false",
        "finetune.max_steps=4",
        "finetune.max_examples=12",
        "finetune.eval_examples=2",
        "finetune.max_new_tokens=4",
        "eval.limit=3",
        "eval.samples=1",
        "eval.sample_tokens=8",
        "run.stages=[tokenizer,tokenize,pretrain,finetune,eval,export,report]",
        f"output.dir={out}",
        *extra,
    ]


def require_interop(module: str, package: str):
    """Import an interop package (the `interop` extra: llama-cpp-python, lm-eval,
    scikit-learn) or skip with the reason; `.ci/run` sets LMFORGE_REQUIRE_INTEROP=1,
    which makes a missing package a failure, so the parity tests cannot silently skip there."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = (
            f"{package} is not installed: pip install -c constraints.txt -e '.[interop]' "
            f"(llama-cpp-python compiles llama.cpp, ≈ 13 min on two cores) [{exc}]"
        )
        if os.environ.get("LMFORGE_REQUIRE_INTEROP") == "1":
            pytest.fail(message)
        pytest.skip(message)
