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
    base = [
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
    return load_config(None, base + list(overrides))
