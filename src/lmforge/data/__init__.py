"""Data: the Document record, sources, and (in later modules) the preparation pipeline."""

from lmforge.data.document import Document

__all__ = ["Document"]
