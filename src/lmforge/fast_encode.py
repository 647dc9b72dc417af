"""Encode many documents fast, with exactly the ids `Tokenizer.encode` gives.

HF `tokenizers` encodes at about 2 MB/s per core on this project's machines: most of
its time goes to bookkeeping the tokenize stage never reads (offsets, alignments,
`Encoding` objects). A byte-level BPE, though, encodes every pre-tokenisation piece
on its own: a document's ids are the concatenation of its pieces' ids. So
`PieceEncoder` cuts the text itself into chunks (a word with its punctuation and the
space before it, or a whitespace run, cut where GPT-2's pattern cuts whitespace), which
no piece crosses; chunks repeat (Zipf's law), so their ids come from a cache of id
bytes, and HF is asked only about the pieces of chunks never seen before, many at
once. The ids are HF's own, piece by piece; `tests/test_fast_encode.py` checks them
against `BPETokenizer.encode` on fuzzed text and whole shard files.

Exactness does not rest on Python's Unicode tables: the regular expression uses
explicit character classes, and each character's class (letter, number, whitespace
or other, as HF's `\\p{L}`, `\\p{N}`, `\\s` see it) is found by asking HF's
pre-tokenizer about that character, once, the first time it appears. Text holding an
added token (``<|endoftext|>`` ...) goes to HF whole, as does any tokenizer whose
normaliser or pre-tokenizer is not the plain GPT-2 byte-level one.

`encode_documents` spreads batches over worker processes (forked: they inherit the
tokenizer and the character classes, with no re-import) once the input is large
enough to pay for them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from lmforge.tokenizer import BPETokenizer, Tokenizer, _clean

# HF `ByteLevel(use_regex=True)` splits with GPT-2's pattern (Radford et al. 2019, encoder.py):
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# It is rebuilt below with explicit classes L, N, S (whitespace); "other" is [^SLN].
LETTER, NUMBER, SPACE, OTHER = "L", "N", "S", "O"
# Cache entries (≈ 150 bytes each, per process); past this the caches start again.
_CACHE_LIMIT = 1_000_000
_MAX_CACHED_LEN = 64  # longer pieces (rare: base64, long numbers) are encoded but not kept


def _ranges(chars: Iterable[str]) -> str:
    """A regex class body for a set of characters, as escaped code-point ranges."""
    cps = sorted(ord(c) for c in chars)
    out, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        out.append(f"\\U{cps[i]:08x}" + (f"-\\U{cps[j]:08x}" if j > i else ""))
        i = j + 1
    return "".join(out)


def supports(tok: Tokenizer) -> bool:
    """Whether `tok` is a BPE with no normaliser and GPT-2's byte-level pre-tokenizer."""
    if not isinstance(tok, BPETokenizer):
        return False
    spec = json.loads(tok.hf.to_str())
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and pre.get("add_prefix_space") is False
        and model.get("type") == "BPE"
        and model.get("dropout") is None  # dropout would make encoding random
    )


class PieceEncoder:
    """Exact `BPETokenizer.encode` for many texts, as raw id bytes of one dtype."""

    def __init__(self, tok: BPETokenizer, dtype: np.dtype):
        if not supports(tok):
            raise ValueError("PieceEncoder needs a byte-level BPE with GPT-2 pre-tokenisation")
        self.hf = tok.hf
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.added = sorted(
            {t.content for t in tok.hf.get_added_tokens_decoder().values()}, key=len
        )
        # Two-character heads ("<|"): rarer in text than a lone "<" (code is full of
        # those), so the search for whole added tokens seldom has to run.
        self.added_heads = {a[:2] for a in self.added}
        self.cache: dict[str, bytes] = {}  # chunk -> its ids
        self.piece_cache: dict[str, bytes] = {}  # GPT-2 piece -> its ids
        self.classes: dict[str, str] = {}
        self.missed_share = 0.0  # of the last call's documents, those with a new chunk
        self._classify(chr(c) for c in range(128))
        self.ascii_known = all(self.classes[chr(c)] != "?" for c in range(128))
        newline = self.hf.encode("\n", add_special_tokens=False).ids
        if len(newline) != 1 or self.classes["\n"] != SPACE:
            raise ValueError("the tokenizer does not encode a newline as one token")
        self.newline_id = newline[0]
        self.newline_bytes = np.asarray(newline, dtype=self.dtype).tobytes()

    # ------------------------------------------------------------------ character classes

    def _pieces(self, s: str) -> int:
        return len(self.hf.pre_tokenizer.pre_tokenize_str(s))

    def _class_of(self, c: str) -> str:
        # Two characters form one piece exactly when they share a class that repeats
        # (\p{L}+, \p{N}+, [^\s\p{L}\p{N}]+, \s+); the probes pin down which.
        if self._pieces("a" + c) == 1:
            return LETTER
        if self._pieces("0" + c) == 1:
            return NUMBER
        if self._pieces("!" + c) == 1:
            return OTHER
        if self._pieces("\t" + c) == 1:
            return SPACE
        return "?"  # unknown behaviour: texts holding it go to HF whole

    def _classify(self, chars: Iterable[str]) -> None:
        for c in chars:
            if c not in self.classes:
                self.classes[c] = self._class_of(c)
        by = {k: [c for c, v in self.classes.items() if v == k] for k in "LNSO"}
        if " " not in by[SPACE] or "'" not in by[OTHER]:
            raise ValueError("the pre-tokenizer does not behave like GPT-2's")
        # Chunks, not pieces: a run of non-space characters (with the one space before it)
        # or a run of whitespace, cut where GPT-2 cuts whitespace (`\s+(?!\S)` leaves a run's
        # last character to what follows). No GPT-2 piece crosses a chunk's edge, and a
        # chunk splits alone as it does in context, so chunks can be cached as wholes:
        # fewer lookups than pieces, and a simpler expression to run.
        S = _ranges(by[SPACE])
        # Word chunks come first: they are most chunks, and the alternatives never match
        # at the same place, so their order changes nothing but speed.
        self.split = re.compile(rf" ?[^{S}]+|[{S}]+(?![^{S}])|[{S}]+").findall
        self.spaces = frozenset(by[SPACE])
        L, N = _ranges(by[LETTER]), _ranges(by[NUMBER])
        # GPT-2's alternatives, letters and numbers first (most pieces; no contraction
        # starts where they match, so the order changes only speed, ≈ 8%).
        self.pieces = re.compile(
            rf" ?[{L}]+| ?[{N}]+|'(?:s|t|re|ve|m|ll|d)| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
        ).findall
        known = [c for c, v in self.classes.items() if v != "?"]
        not_known = re.compile(f"[^{_ranges(known)}]")
        self.unknown, self.find_unknown = not_known.search, not_known.findall
        self.all_known = len(known) == len(self.classes)  # no character HF treats oddly

    # ------------------------------------------------------------------ encoding

    def _hf_bytes(self, texts: list[str]) -> list[bytes]:
        encs = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype).tobytes() for e in encs]

    def _learn(self, chunks: list[str]) -> None:
        """Put the ids of new chunks in the cache, asking HF only about new pieces.

        A new chunk is mostly made of known pieces ("said" in "said,"), so word chunks
        are cut into GPT-2 pieces (all at once: joined by newlines, each newline is a
        piece of its own), and only pieces never seen go to HF; the chunks' ids are
        then one join of their pieces' ids, cut at the newlines. Whitespace chunks
        (few) go to HF one by one.
        """
        words = [c for c in chunks if c[-1] not in self.spaces]
        rest = [c for c in chunks if c[-1] in self.spaces]
        if rest:
            self.cache.update(zip(rest, self._hf_bytes(rest), strict=True))
        if not words:
            return
        pieces = self.pieces("\n".join(words))
        # set.difference with a dict looks up each element; difference_update with
        # `.keys()` would walk the whole cache instead.
        new = set(pieces).difference(self.piece_cache)
        new.discard("\n")
        self._learn_pieces(list(new))
        # All the new chunks' ids in one join, cut at the newlines' ids: no piece of a
        # word chunk holds a newline, so each newline id is a separator.
        self.piece_cache["\n"] = self.newline_bytes
        ids = np.frombuffer(b"".join(map(self.piece_cache.__getitem__, pieces)), self.dtype)
        parts = self._cut_at_newlines(ids)
        if len(parts) != len(words):  # cannot happen; stay exact regardless
            parts = self._hf_bytes(words)
        self.cache.update(zip(words, parts, strict=True))
        for piece in new:  # long pieces (rare: base64, long numbers) are not kept
            if len(piece) > _MAX_CACHED_LEN:
                del self.piece_cache[piece]

    def _learn_pieces(self, pieces: list[str]) -> None:
        """HF's ids for new pieces (no whitespace but a leading space).

        HF takes ~20 µs per text however short, so pieces go to it joined by newlines,
        a few thousand per text: each newline comes back as one id found in no piece,
        and cutting the ids there gives each piece's ids.
        """
        groups = [pieces[i : i + 4096] for i in range(0, len(pieces), 4096)]
        encs = self.hf.encode_batch_fast(["\n".join(g) for g in groups], add_special_tokens=False)
        for group, enc in zip(groups, encs, strict=True):
            parts = self._cut_at_newlines(np.asarray(enc.ids, dtype=self.dtype))
            if len(parts) != len(group):  # cannot happen; stay exact regardless
                parts = self._hf_bytes(group)
            self.piece_cache.update(zip(group, parts, strict=True))

    def _cut_at_newlines(self, ids: np.ndarray) -> list[bytes]:
        """The id bytes between the newline ids in `ids`."""
        cuts = np.flatnonzero(ids == self.newline_id)
        size = ids.itemsize
        buf = ids.tobytes()
        starts = (np.concatenate([[0], cuts + 1]) * size).tolist()
        ends = (np.concatenate([cuts, [len(ids)]]) * size).tolist()
        return [buf[a:b] for a, b in zip(starts, ends, strict=True)]

    def _learn_classes(self, texts: list[str]) -> None:
        """Classify, all at once, the characters of `texts` never seen before.

        Each new character recompiles the expressions (milliseconds, with classes of
        thousands of characters), so one call's new characters go in together.
        """
        rest = [t for t in texts if not t.isascii()]  # ASCII was classified at the start
        if rest:
            new = set(self.find_unknown("".join(rest))).difference(self.classes)
            if new:
                self._classify(new)

    def _fits(self, text: str) -> bool:
        """Whether the chunk path applies: no added token, only characters of known class.

        The text's characters must have been through `_learn_classes`.
        """
        if any(h in text for h in self.added_heads) and any(a in text for a in self.added):
            return False
        # `isascii` takes no time: CPython marks ASCII strings.
        return (text.isascii() and self.ascii_known) or self.all_known or not self.unknown(text)

    def encode(self, texts: list[str]) -> list[bytes]:
        """Ids of each text (lone surrogates → U+FFFD, as `encode`), as little-endian bytes."""
        texts = [_clean(t) for t in texts]
        self._learn_classes(texts)
        out: list[bytes] = [b""] * len(texts)
        whole: list[int] = []
        missed: list[tuple[int, list[str]]] = []
        if len(self.cache) + len(self.piece_cache) > _CACHE_LIMIT:
            self.cache.clear()
            self.piece_cache.clear()
        cache = self.cache
        lookup = cache.__getitem__
        # When most documents of the last call held a new chunk (text that does not
        # repeat: code, many authors), trying each document's lookups first is wasted
        # work: every document's chunks go straight to the search for new ones.
        try_first = self.missed_share < 0.5
        for i, text in enumerate(texts):
            if not self._fits(text):
                whole.append(i)
                continue
            chunks = self.split(text)
            if try_first:
                try:  # C loops only: most documents find all their chunks
                    out[i] = b"".join(map(lookup, chunks))
                    continue
                except KeyError:
                    pass
            missed.append((i, chunks))
        if missed:
            seen: set[str] = set()
            for _, chunks in missed:
                seen.update(chunks)
            new = seen.difference(cache)  # looks up each chunk, never walks the cache
            self._learn(list(new))
            for i, chunks in missed:
                out[i] = b"".join(map(lookup, chunks))
            for chunk in new:  # long chunks (rare: base64, long numbers) are not kept
                if len(chunk) > _MAX_CACHED_LEN:
                    del cache[chunk]
            if not try_first:  # how many held a new chunk: the others were all known
                disjoint = new.isdisjoint
                missed = [m for m in missed if not disjoint(m[1])]
        self.missed_share = len(missed) / max(1, len(texts) - len(whole))
        if whole:
            for i, b in zip(whole, self._hf_bytes([texts[i] for i in whole]), strict=True):
                out[i] = b
        return out


class _Generic:
    """Any tokenizer: `encode_batch`, then one numpy conversion per document."""

    def __init__(self, tok: Tokenizer, dtype: np.dtype):
        self.tok, self.dtype = tok, np.dtype(dtype).newbyteorder("<")

    def encode(self, texts: list[str]) -> list[bytes]:
        return [np.asarray(ids, dtype=self.dtype).tobytes() for ids in self.tok.encode_batch(texts)]


def make_encoder(tok: Tokenizer, dtype: np.dtype) -> PieceEncoder | _Generic:
    if supports(tok):
        with contextlib.suppress(ValueError):  # a pre-tokenizer that acts unlike GPT-2's
            return PieceEncoder(tok, dtype)  # type: ignore[arg-type]
    return _Generic(tok, dtype)


# ----------------------------------------------------------------------------- processes

_WORKER: Any = None  # the encoder a forked worker inherits
T = TypeVar("T")


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    with contextlib.suppress(Exception):  # Linux: die with the parent, even on SIGKILL
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _work(texts: list[str]) -> list[bytes]:
    return _WORKER.encode(texts)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def encode_documents(
    batches: Iterable[list[T]],
    text_of: Callable[[T], str],
    tok: Tokenizer,
    dtype: np.dtype,
    workers: int | None = None,
    parallel_after: int = 4_000_000,
) -> Iterator[tuple[list[T], list[bytes]]]:
    """Each batch with the id bytes of its items' texts, in order.

    Batches are encoded here until one brings the total past `parallel_after`
    characters; from that one on, if `workers` > 1
    (default: the usable cores) and the platform forks, batches go to that many
    worker processes, a few in flight at a time so memory stays bounded.
    """
    global _WORKER
    enc = make_encoder(tok, dtype)
    workers = default_workers() if workers is None else workers
    it = iter(batches)
    seen = 0
    parallel = workers > 1 and _can_fork()
    for batch in it:
        texts = [text_of(x) for x in batch]
        seen += sum(map(len, texts))
        if parallel and seen >= parallel_after:
            # This batch goes to the workers too: encoding it here would leave the
            # other cores idle while it runs (≈ 0.7 s for a 4 MB batch of new text).
            it = itertools.chain([batch], it)
            break
        yield batch, enc.encode(texts)
    else:
        return
    _WORKER = enc
    # Workers encode serially: HF's Rust threads are not fork-safe, and HF warns about
    # forking after using them unless this variable is set.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker)
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
        _WORKER = None
    try:
        pending: deque[tuple[list[T], Any]] = deque()
        for batch in it:
            pending.append((batch, pool.apply_async(_work, ([text_of(x) for x in batch],))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _can_fork() -> bool:
    # Linux only: forking a process that has run threads is unsafe on macOS.
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def batches_of(items: Iterable[Any], text: Callable[[Any], str], max_chars: int, max_items: int):
    """Consecutive batches of about `max_chars` characters (at most `max_items` items)."""
    batch: list[Any] = []
    n = 0
    for item in items:
        batch.append(item)
        n += len(text(item))
        if n >= max_chars or len(batch) >= max_items:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch
