"""`lmforge prepare RECIPE`: run the data preparation pipeline of a recipe."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmforge.config import Config, load_config


def prepare_dir_of(cfg: Config) -> Path:
    """Where `prepare` writes: ``prepare.output``, else ``<output.dir>/prepared``."""
    return Path(cfg.prepare.output) if cfg.prepare.output else Path(cfg.output.dir) / "prepared"


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    """Collect, clean, filter, redact, deduplicate, decontaminate and mix the recipe's
    `prepare.sources` into document shards (JSONL.zst) plus data_report.json/.md.

    An interrupted run resumes where it stopped; --force starts over.
    """
    from lmforge.data.pipeline import prepare

    cfg = load_config(args.recipe, overrides)
    if args.executor:
        cfg.prepare.executor = args.executor
    if args.workers is not None:
        cfg.prepare.workers = args.workers
    out = Path(args.out) if args.out else prepare_dir_of(cfg)
    report = prepare(cfg.prepare, out, force=args.force)
    t = report["totals"]
    print(
        f"prepared {t['docs_out']:,} documents ({t['bytes_out'] / 1e6:,.1f} MB, {t['words_out']:,} words) "
        f"from {t['inputs_read']:,} inputs in {report['timing']['wall_seconds']:.1f}s"
    )
    print(f"shards: {out / 'shards'}  (use it as a data.sources entry)")
    print(f"report: {out / 'data_report.md'}")
    return 0


def register(subparsers: Any) -> None:
    doc = cmd_prepare.__doc__ or ""
    p = subparsers.add_parser(
        "prepare", help=doc.splitlines()[0], description=" ".join(doc.split())
    )
    p.set_defaults(func=cmd_prepare)
    p.add_argument("recipe", nargs="?", default="data-mix", help="recipe file or built-in name")
    p.add_argument("--out", default="", help="output folder (default: prepare.output)")
    p.add_argument("--executor", choices=["local", "ray"], default="")
    p.add_argument("--workers", type=int, default=None, help="worker processes (0 = all cores)")
    p.add_argument("--force", action="store_true", help="delete the output folder and start over")
