"""The tokenizer, tokenize and pretrain stages: their `lmforge` commands and how they run
inside `lmforge run` (the work itself is in `lmforge.pretrain`)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmforge.cli_args import add_command, add_recipe_arg
from lmforge.config import load_config
from lmforge.stages import Stage, StageContext, finished

# ----------------------------------------------------------------------------- commands


def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Train a tokenizer (byte-level BPE or char) on the recipe's data sources."""
    from lmforge.pretrain import run_dir_of, tokenizer_stage

    cfg = load_config(args.recipe, overrides)
    run_dir = Path(args.out) if args.out else run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage(cfg, run_dir, force=True)
    print(
        f"wrote {run_dir / 'tokenizer.json'} ({tok.kind}, vocabulary {tok.vocab_size}, hash {tok.hash})"
    )
    return 0


def cmd_tokenize(args: argparse.Namespace, overrides: list[str]) -> int:
    """Tokenise the recipe's data sources into train/val token shards."""
    from lmforge.pretrain import run_dir_of, tokenize_stage, tokenizer_stage

    cfg = load_config(args.recipe, overrides)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage(cfg, run_dir)
    out = tokenize_stage(cfg, tok, run_dir, force=True)
    print(f"token shards in {out}")
    return 0


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    """Pre-train a model (next-token objective) from a recipe; --resume auto continues a run."""
    from lmforge.pretrain import pretrain
    from lmforge.train.dist import dist_info
    from lmforge.train.launch import cpu_process_count, relaunch

    cfg = load_config(args.recipe, overrides)
    n = cpu_process_count(cfg)
    if n > 1:
        argv = ["pretrain", *([args.recipe] if args.recipe else [])]
        argv += [
            *(["--resume", args.resume] if args.resume else []),
            *(f"--{o}" for o in overrides),
        ]
        return relaunch(n, argv, cfg)
    summary = pretrain(cfg, resume=args.resume)
    if not dist_info().is_main:
        return 0  # under torchrun, rank 0 reports
    if "val_bpb" in summary:
        print(
            f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, "
            f"val {summary['val_bpb']:.3f} bits/byte (unigram baseline {summary['unigram_bpb']:.3f})"
        )
    elif "val_pppl" in summary:  # masked LM
        print(
            f"done: step {summary['step']}, masked val loss {summary['val_loss']:.4f}, "
            f"pseudo-perplexity {summary['val_pppl']:.2f} (unigram baseline {summary['unigram_ppl']:.2f})"
        )
    return 0


def register_tokenizer(sub: Any) -> None:
    tk = sub.add_parser("tokenizer", help="Tokenizer commands: `lmforge tokenizer train`.")
    tk_sub = tk.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    p = add_command(tk_sub, "train", cmd_tokenizer_train)
    add_recipe_arg(p)
    p.add_argument("--out", default="", help="folder for tokenizer.json (default: the run folder)")


def register_tokenize(sub: Any) -> None:
    add_recipe_arg(add_command(sub, "tokenize", cmd_tokenize))


def register_pretrain(sub: Any) -> None:
    p = add_command(sub, "pretrain", cmd_pretrain)
    add_recipe_arg(p)
    p.add_argument(
        "--resume", default="", help="'auto' (newest valid checkpoint of the run) or a path"
    )


# ----------------------------------------------------------------------------- inside a run


def run_tokenizer(ctx: StageContext) -> dict[str, Any]:
    from lmforge.pretrain import tokenizer_stage

    cfg, folder = ctx.cfg, ctx.folder("tokenizer")
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage(
        replace(cfg, tokenizer=replace(cfg.tokenizer, path="")), folder, force=True
    )
    return {"kind": tok.kind, "vocab_size": tok.vocab_size, "hash": tok.hash}


def run_tokenize(ctx: StageContext) -> dict[str, Any]:
    from lmforge.pretrain import tokenize_stage
    from lmforge.shards import split_info
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(ctx.cfg.tokenizer.path)
    out = tokenize_stage(ctx.cfg, tok, ctx.run_dir, force=True)
    summary = {}
    for split in ("train", "val"):
        info = split_info(out, split)
        summary[split] = {
            "tokens": info.n_tokens,
            "documents": info.n_documents,
            "bytes": info.n_bytes,
        }
    return summary


def run_pretrain(ctx: StageContext) -> dict[str, Any]:
    from lmforge.pretrain import pretrain

    return finished(pretrain(ctx.cfg, resume="auto"), "pre-training")


def pretrained_model(folder: Path) -> Path:
    from lmforge.train.checkpoint import resolve_checkpoint

    return resolve_checkpoint(folder)


TOKENIZER_STAGE = Stage(
    "tokenizer",
    ("tokenizer", "data.sources", "data.max_bytes"),
    ("prepare",),
    run_tokenizer,
    "tokenizer",
    register=register_tokenizer,
)
TOKENIZE_STAGE = Stage(
    "tokenize", ("data",), ("tokenizer",), run_tokenize, "tokens", register=register_tokenize
)
PRETRAIN_STAGE = Stage(
    "pretrain",
    ("model", "train"),
    ("tokenize",),
    run_pretrain,
    "pretrain",
    register=register_pretrain,
    model=pretrained_model,
    model_label="pretrained",
)
