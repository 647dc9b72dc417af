"""Where shared test data lives: $LMFORGE_SHARED_DATA, else ../shared/data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data() -> Path:
    env = os.environ.get("LMFORGE_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in [Path.cwd(), *here.parents]:
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"
