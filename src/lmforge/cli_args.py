"""Argument-parser pieces every command shares (stdlib only, imported by every CLI module).

`add_command` makes a sub-command whose help comes from the command function's
docstring; `add_recipe_arg`, `add_checkpoint_arg` and `add_device_arg` add the
arguments that mean the same in every command.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

# What `--checkpoint` accepts (`lmforge.model_source` resolves it).
CHECKPOINT_HELP = "checkpoint, stage, run or transformers folder"


def command_doc(fn: Callable) -> str:
    """A command's help text: its function's docstring."""
    return inspect.getdoc(fn) or ""


def summary_line(doc: str) -> str:
    """The first paragraph of a docstring as one line: a command's whole summary sentence."""
    first = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(first.split())


def add_command(
    subparsers: Any, name: str, fn: Callable, raw: bool = False, **kw: Any
) -> argparse.ArgumentParser:
    """A sub-command running `fn(args, overrides)`, described by `fn`'s docstring
    (`raw` keeps the docstring's line breaks, for examples)."""
    doc = command_doc(fn)
    if raw:
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    p = subparsers.add_parser(name, help=summary_line(doc) or None, description=doc, **kw)
    p.set_defaults(func=fn)
    return p


def add_recipe_arg(
    p: argparse.ArgumentParser, default: str | None = "quickstart", optional: bool = True
) -> None:
    """The positional recipe: a YAML file or a built-in name."""
    kw: dict[str, Any] = {"nargs": "?", "default": default} if optional else {}
    p.add_argument("recipe", help="recipe file or built-in name (see `lmforge recipes`)", **kw)


def add_checkpoint_arg(
    p: argparse.ArgumentParser, required: bool = True, repeatable: bool = False, what: str = ""
) -> None:
    """`--checkpoint`: any form `lmforge.model_source` resolves."""
    help_text = (
        CHECKPOINT_HELP + (f" {what}" if what else "") + ("; repeatable" if repeatable else "")
    )
    if repeatable:
        p.add_argument("--checkpoint", action="append", required=required, help=help_text)
    else:
        p.add_argument("--checkpoint", required=required, default="", help=help_text)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="device to run the model on (cpu, cuda)")
