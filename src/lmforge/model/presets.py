"""The presets table lives in `lmforge.presets` (the config reads it); re-exported here."""

from lmforge.presets import PRESETS

__all__ = ["PRESETS"]
