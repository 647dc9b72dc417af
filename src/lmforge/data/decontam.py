"""Decontamination: find training documents that contain text of an evaluation set.

Following GPT-3 (Brown et al. 2020, appendix C), a document is contaminated by a
benchmark when it shares a word 13-gram (lower-cased, punctuation removed) with any
of the benchmark's items; an item shorter than 13 words counts as one n-gram of its
whole text (if it has at least ``min_words`` words, so that "the man is" never
matches). Named sets:

- ``hellaswag``: context + gold ending of each validation item (shared data)
- ``crows_pairs``: both sentences of each pair (the copy inside the package)
- ``PATH`` or ``PATH:FIELD``: a JSONL / JSON / text file (e.g. a fine-tuning test
  split); for JSONL, FIELD names the text field (several with ``+``: ``src+tgt``),
  default: every string field of the record.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmforge.data.filters import _ngram_hashes
from lmforge.data.readers import resolve_source_path, strip_compression
from lmforge.data.registry import EVAL_SETS, load_plugins
from lmforge.fileio import iter_json_lines, open_text
from lmforge.paths import shared_data

WORD = re.compile(r"\w+")
MASK64 = (1 << 64) - 1
BITMAP_SIZE = 1 << 23
BITMAP_MASK = np.uint64(BITMAP_SIZE - 1)


def words_of(text: str) -> list[str]:
    return WORD.findall(text.lower())


def iter_eval_texts(spec: str) -> Iterator[str]:
    """The texts of a named evaluation set or file."""
    if spec == "hellaswag":
        for _, rec in iter_json_lines(shared_data() / "hellaswag" / "hellaswag_val.jsonl.gz"):
            yield f"{rec['ctx']} {rec['endings'][int(rec['label'])]}"
        return
    load_plugins()
    if spec in EVAL_SETS:  # registered by a plug-in (lmforge.bias: crows_pairs)
        yield from EVAL_SETS[spec]()
        return
    path_str, _, fields = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path = resolve_source_path(path_str)
    if not path.exists():
        raise FileNotFoundError(f"decontamination set '{spec}': no file {path}")
    names = [f for f in fields.split("+") if f]
    stem = strip_compression(path.name)
    if stem.endswith(".jsonl"):
        for _, rec in iter_json_lines(path):
            yield from _strings(rec, names)
        return
    with open_text(path) as fh:
        data = fh.read()
    if stem.endswith(".json"):
        for rec in json.loads(data):
            yield from _strings(rec, names)
    else:
        yield from (ln for ln in data.splitlines() if ln.strip())


def _strings(rec: object, names: list[str]) -> Iterator[str]:
    if isinstance(rec, str):
        yield rec
    elif isinstance(rec, dict):
        for key, value in rec.items():
            if names and key not in names:
                continue
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):
                for v in value:
                    yield from _strings(v, [])
    elif isinstance(rec, list):
        for v in rec:
            yield from _strings(v, names)


def _word_ids(words: list[str]) -> np.ndarray:
    return np.fromiter((hash(w) & MASK64 for w in words), np.uint64, len(words))


def _kgrams(words: list[str], k: int) -> np.ndarray:
    """64-bit hashes of all word k-grams: a polynomial over per-word hashes (numpy, fast)."""
    return _ngram_hashes(_word_ids(words), k)


class ContaminationIndex:
    """n-gram sets of the named evaluation sets; ``matches(text)`` → {benchmark: n hits}.

    n-grams are stored as hashes built from Python's string hash: the index is built
    in the process that queries it, so the per-process hash seed is consistent. Items
    shorter than n words are kept whole, by length, and looked up as k-grams of the
    document.
    """

    def __init__(self, specs: list[str], n: int = 13, min_words: int = 8):
        self.n, self.min_words = n, min_words
        self.sets: dict[str, dict[int, np.ndarray]] = {}  # benchmark → gram length → hashes
        self.items: dict[str, int] = {}
        self.bitmaps: dict[str, np.ndarray] = {}
        for spec in specs:
            by_len: dict[int, list[np.ndarray]] = {}
            count = 0
            for text in iter_eval_texts(spec):
                count += 1
                words = words_of(text)
                if len(words) >= n:
                    by_len.setdefault(n, []).append(_kgrams(words, n))
                elif len(words) >= min_words:
                    by_len.setdefault(len(words), []).append(_kgrams(words, len(words)))
            self.sets[spec] = {k: np.unique(np.concatenate(v)) for k, v in by_len.items()}
            self.items[spec] = count
            # A bitmap of the low hash bits answers "certainly not in the set" for almost
            # every document n-gram, so only a few go on to the binary search (8 MiB each).
            bitmap = np.zeros(BITMAP_SIZE, dtype=bool)
            for index in self.sets[spec].values():
                bitmap[index & BITMAP_MASK] = True
            self.bitmaps[spec] = bitmap

    def matches(self, text: str) -> dict[str, int]:
        """Number of the document's n-gram positions found in each benchmark (0s left out)."""
        words = words_of(text)
        ids = _word_ids(words)
        doc_grams: dict[int, np.ndarray] = {}
        out = {}
        for name, by_len in self.sets.items():
            hits = 0
            for k, index in by_len.items():
                if k > len(words):
                    continue
                if k not in doc_grams:
                    doc_grams[k] = _ngram_hashes(ids, k)
                grams = doc_grams[k]
                grams = grams[self.bitmaps[name][grams & BITMAP_MASK]]
                if not len(grams):
                    continue
                # `index` is sorted and unique: a binary search beats np.isin here.
                pos = np.minimum(np.searchsorted(index, grams), len(index) - 1)
                hits += int((index[pos] == grams).sum())
            if hits:
                out[name] = hits
        return out
