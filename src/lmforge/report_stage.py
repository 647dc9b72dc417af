"""The report stage: `lmforge report`/`compare`, and the report card that ends `lmforge run`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmforge.cli_args import add_command
from lmforge.stages import Stage, StageContext


def cmd_report(args: argparse.Namespace, overrides: list[str]) -> int:
    """(Re)build the report card (report.html, report.md) of a run folder."""
    from lmforge.report import write_report

    paths = write_report(Path(args.run))
    print(f"wrote {paths['html']} and {paths['markdown']}")
    return 0


def cmd_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    """Put several runs side by side: key metrics, and the config keys that differ."""
    from lmforge.report import compare_runs

    out = compare_runs(args.runs, args.out)
    print(f"wrote {out}")
    return 0


def register(sub: Any) -> None:
    p = add_command(sub, "report", cmd_report)
    p.add_argument("run", help="run folder")
    p = add_command(sub, "compare", cmd_compare)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="compare.html", help="HTML file to write")


def run_report(ctx: StageContext) -> dict[str, Any]:
    from lmforge.report import write_report

    paths = write_report(ctx.run_dir)
    return {k: str(v) for k, v in paths.items()}


STAGE = Stage("report", (), (), run_report, "", register=register)
