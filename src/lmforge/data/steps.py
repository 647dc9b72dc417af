"""Pipeline steps: generators over documents that count what they do.

A step is an object with a ``run(docs) -> Iterator[Document]`` generator (also its
``__call__``) and a `StepStats`. Subclasses implement ``process(doc)``, which returns
the (possibly changed) document, or a string: the reason it was dropped; a step that
adds or holds documents overrides ``run``. Dropped documents are handed to
``on_drop`` (the exclusions writer) with their reason. Steps outside this file plug
in by name through `lmforge.data.registry`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import PrepareConfig, PrepareSource
from lmforge.data import filters as F
from lmforge.data.clean import clean_text
from lmforge.data.document import Document
from lmforge.data.pii import redact
from lmforge.data.readers import Reader, Skip, Task
from lmforge.data.registry import configured_steps, load_plugins

EXAMPLES_PER_REASON = 3
SNIPPET_CHARS = 300

# The counts of a `StepStats`, in report order.
TOTALS = ("docs_in", "docs_out", "bytes_in", "bytes_out", "words_in", "words_out")

DropHook = Callable[[Document | None, str, str, dict[str, Any]], None]


def measure(doc: Document) -> tuple[int, int]:
    """(UTF-8 bytes, whitespace words) of a document, cached while its text is unchanged."""
    cached = doc.__dict__.get("_measure")
    if cached is not None and cached[0] is doc.text:
        return cached[1], cached[2]
    n_bytes = len(doc.text.encode("utf-8", errors="replace"))
    n_words = len(doc.text.split())
    doc.__dict__["_measure"] = (doc.text, n_bytes, n_words)
    return n_bytes, n_words


@dataclass
class StepStats:
    """What one step did, summed over the documents of one or many tasks."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    words_in: int = 0
    words_out: int = 0
    seconds: float = 0.0
    dropped: Counter[str] = field(default_factory=Counter)
    counters: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add_in(self, doc: Document) -> None:
        b, w = measure(doc)
        self.docs_in += 1
        self.bytes_in += b
        self.words_in += w

    def add_out(self, doc: Document) -> None:
        b, w = measure(doc)
        self.docs_out += 1
        self.bytes_out += b
        self.words_out += w

    def add_drop(self, reason: str, example: dict[str, Any]) -> None:
        self.dropped[reason] += 1
        if sum(e["reason"] == reason for e in self.examples) < EXAMPLES_PER_REASON:
            self.examples.append({"reason": reason, **example})

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **{key: getattr(self, key) for key in TOTALS},
            "seconds": round(self.seconds, 4),
            "dropped": dict(sorted(self.dropped.items())),
            "counters": dict(sorted(self.counters.items())),
            "examples": self.examples,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StepStats:
        return cls(
            **{key: d[key] for key in ("name", *TOTALS, "seconds")},
            dropped=Counter(d["dropped"]),
            counters=Counter(d["counters"]),
            examples=list(d["examples"]),
        )

    def merge(self, other: StepStats) -> None:
        for key in (*TOTALS, "seconds"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.dropped.update(other.dropped)
        self.counters.update(other.counters)
        for ex in other.examples:
            if sum(e["reason"] == ex["reason"] for e in self.examples) < EXAMPLES_PER_REASON:
                self.examples.append(ex)


def doc_example(doc: Document) -> dict[str, Any]:
    ex: dict[str, Any] = {"id": doc.id, "source": doc.source, "snippet": doc.text[:SNIPPET_CHARS]}
    for key in ("path", "line", "url"):
        if key in doc.meta:
            ex[key] = doc.meta[key]
    return ex


class Step:
    """A document → document-or-drop-reason transform, run as a counting generator."""

    name = "step"

    def __init__(self, on_drop: DropHook | None = None):
        self.stats = StepStats(self.name)
        self.on_drop = on_drop

    def process(self, doc: Document) -> Document | str:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        return self.run(docs)

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        st = self.stats
        for doc in docs:
            t0 = time.process_time()
            st.add_in(doc)
            out = self.process(doc)
            if isinstance(out, str):
                example = doc_example(doc)
                st.add_drop(out, example)
                if self.on_drop:
                    self.on_drop(doc, out, self.name, {})
                st.seconds += time.process_time() - t0
                continue
            st.add_out(out)
            st.seconds += time.process_time() - t0
            yield out


class ReadStep:
    """The first step: a source reader; bad input becomes counted drops naming file and line."""

    name = "read"

    def __init__(self, src: PrepareSource, cfg: PrepareConfig, on_drop: DropHook | None = None):
        self.reader = Reader(src, cfg.max_file_bytes, cfg.max_line_bytes)
        self.stats = StepStats(self.name)
        self.on_drop = on_drop

    def __call__(self, task: Task) -> Iterator[Document]:
        st = self.stats
        items = self.reader.read_task(task)
        while True:
            t0 = time.process_time()
            item = next(items, None)
            if item is None:
                st.seconds += time.process_time() - t0
                return
            if isinstance(item, Skip):
                reason = f"read:{item.reason}"
                st.docs_in += 1
                st.add_drop(reason, {**item.to_json(), "source": self.reader.name})
                if self.on_drop:
                    self.on_drop(None, reason, self.name, item.to_json())
                st.seconds += time.process_time() - t0
                continue
            st.add_in(item)
            st.add_out(item)
            st.counters[f"license:{item.license}"] += 1
            st.seconds += time.process_time() - t0
            yield item


class CleanStep(Step):
    name = "clean"

    def __init__(self, cfg: PrepareConfig, on_drop: DropHook | None = None):
        super().__init__(on_drop)
        self.repair, self.boilerplate = cfg.fix_unicode, cfg.strip_boilerplate

    def process(self, doc: Document) -> Document | str:
        text, changes = clean_text(doc.text, F.is_code(doc), self.repair, self.boilerplate)
        self.stats.counters.update(changes)
        if not text.strip():
            return "clean:empty_after_cleaning"
        doc.text = text
        return doc


class FilterStep(Step):
    """Runs one `Filter` on the documents it applies to."""

    def __init__(self, flt: F.Filter, on_drop: DropHook | None = None):
        self.name = flt.name
        super().__init__(on_drop)
        self.filter = flt

    def process(self, doc: Document) -> Document | str:
        if not self.filter.applies(doc):
            self.stats.counters["not_applicable"] += 1
            return doc
        reason = self.filter.check(doc)
        if isinstance(self.filter, F.LanguageFilter) and "language" in doc.meta:
            self.stats.counters[f"language:{doc.meta['language']}"] += 1
        return reason if reason else doc


class PIIStep(Step):
    name = "pii"

    def process(self, doc: Document) -> Document | str:
        text, counts = redact(doc.text)
        if counts:
            self.stats.counters.update(counts)
            self.stats.counters["documents_redacted"] += 1
            doc.meta["pii"] = dict(sorted(counts.items()))
            doc.text = text
        return doc


_CONTAMINATION_CACHE: dict[tuple[tuple[str, ...], int], Any] = {}


class DecontamStep(Step):
    name = "decontaminate"

    def __init__(self, cfg: PrepareConfig, on_drop: DropHook | None = None):
        super().__init__(on_drop)
        from lmforge.data.decontam import ContaminationIndex

        load_plugins(cfg.plugins)  # named sets registered by plug-ins (bias: crows_pairs)
        key = (tuple(cfg.decontaminate), cfg.decontam_ngram)
        if key not in _CONTAMINATION_CACHE:  # one index per worker process
            _CONTAMINATION_CACHE[key] = ContaminationIndex(list(key[0]), key[1])
        self.index = _CONTAMINATION_CACHE[key]
        self.action = cfg.decontam_action

    def process(self, doc: Document) -> Document | str:
        hits = self.index.matches(doc.text)
        if not hits:
            return doc
        for name, n in hits.items():
            self.stats.counters[f"documents:{name}"] += 1
            self.stats.counters[f"ngrams:{name}"] += n
        if self.action == "flag":
            doc.meta["contamination"] = hits
            return doc
        return "contaminated:" + "+".join(sorted(hits))


def build_steps(cfg: PrepareConfig, on_drop: DropHook | None = None) -> list[Step]:
    """The per-document steps after reading, in order, as the config enables them."""
    steps: list[Step] = [CleanStep(cfg, on_drop)]
    flts: list[F.Filter] = [F.LengthFilter(cfg.min_chars, cfg.max_chars)]
    # Language identification first (as in FineWeb): it is cheap, and the English-tuned
    # quality rules below would otherwise take the blame for every foreign page. It always
    # runs (the report counts languages) and drops only when `languages` is not empty.
    flts.append(F.LanguageFilter(cfg.languages, cfg.min_language_score))
    if cfg.quality:
        flts.append(F.GopherQualityFilter(max_words=cfg.max_words))
    if cfg.repetition:
        flts.append(F.GopherRepetitionFilter())
    if cfg.max_flagged_word_ratio > 0:
        flts.append(F.FlaggedWordsFilter(cfg.max_flagged_word_ratio))
    if cfg.code_filters:
        flts.append(F.CodeFilter())
    steps += [FilterStep(f, on_drop) for f in flts]
    # prepare.steps: filters and steps registered by name
    steps += configured_steps(cfg, "filter", on_drop, lambda f: FilterStep(f, on_drop))
    if cfg.pii:
        steps.append(PIIStep(on_drop))
    if cfg.decontaminate:
        steps.append(DecontamStep(cfg, on_drop))
    return steps


def build_post_dedup_steps(cfg: PrepareConfig, on_drop: DropHook | None = None) -> list[Step]:
    """Steps of stage 3, after deduplication and mixing: the registered ones (`lmforge.bias`
    registers CDA and term statistics), then ``prepare.steps`` of stage ``post_dedup``."""
    return configured_steps(cfg, "post_dedup", on_drop, lambda f: FilterStep(f, on_drop))


def merge_step_stats(results: list[dict[str, Any]]) -> list[StepStats]:
    """Sum per-task statistics step by step (steps are in the same order in every task)."""
    merged: dict[str, StepStats] = {}
    for res in results:
        for st in res["steps"]:
            s = StepStats.from_json(st)
            if s.name in merged:
                merged[s.name].merge(s)
            else:
                merged[s.name] = s
    return list(merged.values())
