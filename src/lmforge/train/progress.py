"""A live progress bar on a terminal; plain log lines everywhere else (CI, files, ranks > 0)."""

from __future__ import annotations

import sys
from typing import Any


class ProgressBar:
    def __init__(self, total: int, start: int, enabled: bool):
        self.bar: Any = None
        if not (enabled and sys.stdout.isatty()):
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        # rich redirects print() above the bar, so the loop's log lines still appear.
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, info: str | None = None) -> None:
        if self.bar is None:
            return
        if info is None:
            self.bar.update(self.task, completed=step)
        else:
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
