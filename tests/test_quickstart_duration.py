"""The quickstart's duration is quoted once, the same (measured) figure, everywhere."""

import re
from pathlib import Path

from lmforge.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
# any "<about|≈|~> N minutes on two CPU cores" claim
CLAIM = re.compile(r"(?:about|roughly|≈|~)\s*[\w.–-]+(?:\s+to\s+\w+)?\s+minutes? on two CPU cores")


def _quickstart_help() -> str:
    sub = build_parser()._subparsers._group_actions[0]
    return " ".join(sub.choices["quickstart"].description.split())


def _texts() -> dict[str, str]:
    files = [ROOT / "README.md", ROOT / "src/lmforge/recipes/quickstart.yaml"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    out = {
        str(p.relative_to(ROOT)): " ".join(p.read_text().replace("#", " ").split()) for p in files
    }
    out["lmforge quickstart --help"] = _quickstart_help()
    return out


def test_every_quote_of_the_quickstart_duration_is_the_same():
    from lmforge.quickstart import DURATION

    texts = _texts()
    for where in ("README.md", "docs/index.md", "src/lmforge/recipes/quickstart.yaml"):
        assert DURATION in texts[where], where
    assert DURATION in texts["lmforge quickstart --help"]
    for where, text in texts.items():
        for claim in CLAIM.findall(text):
            assert claim == DURATION, (where, claim)
