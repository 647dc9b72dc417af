"""Sub-command `lmforge checkpoint` (registered from `cli.EXTRA_COMMAND_MODULES`)."""

from __future__ import annotations

import argparse
import inspect


def cmd_consolidate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Turn a sharded checkpoint (train.checkpoint_format = sharded) into the single-file one.

    Reads every rank's shards in this one process (no process group, no GPU) and
    writes model.safetensors, the optimizer state, RNG and trainer state in the
    gathered layout that generate, fine-tune, export, eval and resume read. The
    whole model and optimizer state are held in memory once, as a gathered save would.

        lmforge checkpoint consolidate runs/x/checkpoints/step_00001000 --out runs/x/full
    """
    from lmforge.train.checkpoint import resolve_checkpoint
    from lmforge.train.sharded import consolidate

    out = consolidate(resolve_checkpoint(args.step_dir), args.out)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    doc = inspect.getdoc(cmd_consolidate) or ""
    p = sub.add_parser(
        "checkpoint",
        help="Work on checkpoints: consolidate a sharded one into the single-file one.",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    c = verbs.add_parser(
        "consolidate", help=doc.splitlines()[0], description=doc, formatter_class=raw
    )
    c.set_defaults(func=cmd_consolidate)
    c.add_argument("step_dir", help="a sharded checkpoint folder (or a run folder: its newest)")
    c.add_argument("--out", required=True, help="the folder to write (must not exist)")
