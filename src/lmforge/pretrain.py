"""The core slice as Python functions: tokenizer → token shards → pre-training → samples.

Each function takes the resolved `Config` and a run folder, and leaves its output
in that folder, so the CLI, `quickstart` and tests share one code path.

Run folder layout::

    config.yaml          the resolved config
    tokenizer.json
    tokens/              train_*.bin / val_*.bin + headers
    checkpoints/step_*/  weights, optimizer, RNG, trainer_state.json, tokenizer.json
    metrics.jsonl        one record per log/eval step
    summary.json         final figures
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.config import Config, ModelConfig
from lmforge.data.sources import iter_documents
from lmforge.fileio import write_json_atomic
from lmforge.model.arith import count_params, flops_per_token
from lmforge.model_source import load_model as load_model
from lmforge.shards import (
    TokenLoader,
    TokenStream,
    shards_complete,
    tokenize_documents,
)
from lmforge.tokenizer import Tokenizer, iter_limited, load_tokenizer, train_tokenizer

# torch is imported by the stages that train or load a model, not by `lmforge tokenize`
# and `lmforge tokenizer train` (≈ 2 s saved per command, and lighter forked workers).
if TYPE_CHECKING:
    from lmforge.model.transformer import Transformer
    from lmforge.train.loop import Trainer


def print0(*args: Any) -> None:
    """`train.dist.print0` (rank 0 only) without importing torch when it is not loaded:
    then no process group can exist here, and torchrun's RANK says which process this is."""
    if "torch" in sys.modules:
        from lmforge.train.dist import print0 as dist_print0

        dist_print0(*args)
    elif int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.output.dir)


def tokenizer_stage(cfg: Config, run_dir: Path, force: bool = False) -> Tokenizer:
    """Load `tokenizer.path`, reuse the run's tokenizer, or train one on the data sources."""
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    path = run_dir / "tokenizer.json"
    if path.exists() and not force:
        return load_tokenizer(path)
    texts = (d.text for d in iter_documents(cfg.data.sources))
    limit = cfg.tokenizer.train_bytes or cfg.data.max_bytes
    tok = train_tokenizer(iter_limited(texts, limit), cfg.tokenizer.kind, cfg.tokenizer.vocab_size)
    tok.save(path)
    print0(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens → {path}")
    return tok


def tokens_dir_of(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.data.tokens_dir) if cfg.data.tokens_dir else run_dir / "tokens"


def tokenize_stage(cfg: Config, tok: Tokenizer, run_dir: Path, force: bool = False) -> Path:
    """Write train/val token shards unless matching ones exist."""
    out = tokens_dir_of(cfg, run_dir)
    if not force and shards_complete(out, tok.hash):
        return out
    docs = iter_documents(cfg.data.sources)
    if cfg.data.max_bytes:
        docs = _limit_docs(docs, cfg.data.max_bytes)
    counts = tokenize_documents(docs, tok, out, cfg.data.val_fraction, split=cfg.data.split)
    for split, c in counts.items():
        print0(
            f"tokens/{split}: {c['n_documents']:,} documents, {c['n_tokens']:,} tokens, "
            f"{c['n_bytes']:,} bytes ({c['n_bytes'] / max(c['n_tokens'], 1):.2f} bytes/token)"
        )
    return out


def _limit_docs(docs, max_bytes: int):
    seen = 0
    for doc in docs:
        yield doc
        seen += len(doc.text.encode("utf-8", errors="replace"))
        if seen >= max_bytes:
            return


def model_config_for(cfg: Config, tok: Tokenizer) -> ModelConfig:
    return replace(cfg.model, vocab_size=cfg.model.vocab_size or tok.vocab_size)


def build_model(mcfg: ModelConfig, seed: int) -> Transformer:
    import torch

    from lmforge.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(mcfg)


def unigram_bits_per_byte(tokens_dir: Path, vocab_size: int) -> float:
    """Entropy of the validation token distribution, in bits per byte of text.

    A model that ignores context and knows the exact unigram frequencies of the
    validation set scores this; any real language model should beat it.
    """
    stream = TokenStream(tokens_dir, "val")
    counts = stream.counts(vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    bits_per_token = float(-(p * np.log2(p)).sum())
    return bits_per_token * stream.n_tokens / max(stream.n_bytes, 1)


@dataclass
class PretrainSetup:
    """What `setup_pretrain` built: the trainer, and what the run's summary adds."""

    trainer: Trainer
    params: int
    tokens_dir: Path
    vocab_size: int
    masked_baseline: dict[str, float]


def setup_pretrain(cfg: Config) -> PretrainSetup:
    """Everything before the training loop: threads, process group, tokenizer, shards
    (each built if missing), model, loaders and the `Trainer`."""
    import torch

    from lmforge.hardware import pick_device
    from lmforge.train.dist import barrier, init_distributed
    from lmforge.train.loop import Trainer
    from lmforge.train.tensor_parallel import data_rank

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    info = init_distributed(pick_device(cfg.train.device), cfg.train.dist_timeout_s)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun rank 0 writes the tokenizer and shards while the others wait
    # (at most train.dist_timeout_s), then they find and reuse them.
    if not info.is_main:
        barrier()
    tok = tokenizer_stage(cfg, run_dir)
    tokens_dir = tokenize_stage(cfg, tok, run_dir)
    if info.is_main:
        barrier()
    mcfg = model_config_for(cfg, tok)
    cfg = replace(cfg, model=mcfg)
    model = build_model(mcfg, cfg.train.seed)
    params = count_params(mcfg)
    print0(
        f"model: {params['total'] / 1e6:.2f}M parameters ({mcfg.n_layers} layers, width {mcfg.d_model}, "
        f"{mcfg.n_heads} heads, context {mcfg.context_length}); "
        f"{flops_per_token(mcfg) / 1e6:.1f} MFLOP per training token"
    )
    train = TokenLoader(tokens_dir, "train", mcfg.context_length, cfg.train.seed, tok.hash)
    val = TokenLoader(tokens_dir, "val", mcfg.context_length, cfg.train.seed, tok.hash)
    tokens_per_byte: float | None = val.stream.n_tokens / max(val.stream.n_bytes, 1)
    train_data: Any = train
    # Under torchrun each data-parallel rank scores every world_size-th validation batch
    # (the ranks of a tensor-parallel group score the same ones together).
    val_rank, val_world = data_rank(cfg, info)
    val_data: Any = lambda: itertools.islice(
        val.sequential(cfg.train.eval_tokens, cfg.train.micro_batch_size),
        val_rank,
        None,
        val_world,
    )
    hooks: list[Any] = []
    masked_baseline: dict[str, float] = {}
    if mcfg.objective == "masked":
        # Bidirectional model: BERT-style corrupted windows; val loss is masked-token CE
        # (not a per-byte figure), pseudo-perplexity comes from an eval hook.
        from lmforge.masked import masked_sources

        train_data, val_data, hooks, unigram_ppl = masked_sources(
            train, val, tok, cfg.train.seed, cfg.train.eval_tokens, cfg.train.micro_batch_size
        )
        tokens_per_byte, masked_baseline = None, {"unigram_ppl": unigram_ppl}
    trainer = Trainer(
        cfg,
        model,
        run_dir,
        train_data,
        val_data=val_data,
        tokens_per_byte=tokens_per_byte,
        eval_hooks=hooks,
        extra_files={"tokenizer.json": tok.to_json().encode("utf-8")},
    )
    return PretrainSetup(trainer, params["total"], tokens_dir, tok.vocab_size, masked_baseline)


def pretrain(cfg: Config, resume: str = "") -> dict[str, Any]:
    """Tokenizer, shards (if needed), then the training loop. Returns the summary."""
    setup = setup_pretrain(cfg)
    trainer = setup.trainer
    summary = trainer.fit(resume=resume)
    summary.update(setup.masked_baseline)
    summary["params"] = setup.params
    summary["unigram_bpb"] = unigram_bits_per_byte(setup.tokens_dir, setup.vocab_size)
    if trainer.dist.is_main:
        write_json_atomic(trainer.run_dir / "summary.json", summary)
    return summary


def bits_per_byte(loss_nats_per_token: float, tokens_per_byte: float) -> float:
    return loss_nats_per_token / math.log(2) * tokens_per_byte
