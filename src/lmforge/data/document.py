"""The one record that flows through every data step."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Document:
    """A unit of text with provenance.

    `id` is stable across runs (a source-relative path, a record key), so splits
    and deduplication decisions are deterministic.
    """

    id: str
    text: str
    source: str = ""
    license: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
