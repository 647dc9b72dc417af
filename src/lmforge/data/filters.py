"""Filters: each looks at one document and keeps it or names why it goes.

A filter's ``check(doc)`` returns ``None`` to keep the document or a short reason
string (``"gopher:few_stop_words"``) to drop it. Filters say which documents they
apply to (prose, code or all) through ``applies_to``; prose heuristics never judge
code and vice versa. Thresholds default to the published values they come from.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from lmforge.data.document import Document

WORD = re.compile(r"\S+")


def is_code(doc: Document) -> bool:
    return doc.meta.get("kind") == "code"


class Filter:
    """Base: a named check that returns None (keep) or a drop reason. A filter's options
    are its dataclass fields (`FilterStep` runs it as a pipeline step)."""

    name = "filter"
    applies_to = "all"  # "text" (prose), "code" or "all"

    def applies(self, doc: Document) -> bool:
        if self.applies_to == "all":
            return True
        return is_code(doc) == (self.applies_to == "code")

    def check(self, doc: Document) -> str | None:
        raise NotImplementedError


@dataclass
class LengthFilter(Filter):
    name = "length"

    min_chars: int = 200
    max_chars: int = 0

    def check(self, doc: Document) -> str | None:
        n = len(doc.text)
        if n < self.min_chars:
            return "length:too_short"
        if self.max_chars and n > self.max_chars:
            return "length:too_long"
        return None


@dataclass
class GopherQualityFilter(Filter):
    """Quality heuristics of Gopher (Rae et al. 2021, appendix A.1.1 "Quality filtering")."""

    name = "gopher_quality"
    applies_to = "text"
    STOP_WORDS: ClassVar[set[str]] = {"the", "be", "to", "of", "and", "that", "have", "with"}
    BULLETS = ("•", "-", "*", "‣", "◦", "⁃", "·", "–")

    min_words: int = 50
    max_words: int = 100_000
    mean_word_len: tuple[float, float] = (3.0, 10.0)  # (min, max) of the mean word length
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2

    def check(self, doc: Document) -> str | None:
        words = doc.text.split()
        n = len(words)
        if n < self.min_words:
            return "gopher:too_few_words"
        if self.max_words and n > self.max_words:
            return "gopher:too_many_words"
        mean = sum(len(w) for w in words) / n
        if not self.mean_word_len[0] <= mean <= self.mean_word_len[1]:
            return "gopher:mean_word_length"
        symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
        if symbols / n > self.max_symbol_word_ratio:
            return "gopher:symbol_ratio"
        lines = [ln for ln in doc.text.split("\n") if ln.strip()]
        if lines:
            bullets = sum(ln.lstrip().startswith(self.BULLETS) for ln in lines)
            if bullets / len(lines) > self.max_bullet_lines:
                return "gopher:bullet_lines"
            ellipsis = sum(ln.rstrip().endswith(("...", "…")) for ln in lines)
            if ellipsis / len(lines) > self.max_ellipsis_lines:
                return "gopher:ellipsis_lines"
        alpha = sum(any(c.isalpha() for c in w) for w in words)
        if alpha / n < self.min_alpha_words:
            return "gopher:non_alpha_words"
        stop = 0
        for w in words:
            if w.lower().strip(".,;:!?\"'()") in self.STOP_WORDS:
                stop += 1
                if stop >= self.min_stop_words:
                    break
        if stop < self.min_stop_words:
            return "gopher:few_stop_words"
        return None


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every word n-gram (polynomial over word ids; wraps on overflow)."""
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    mult = np.uint64(1_000_003)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * mult + ids[k : len(ids) - n + 1 + k]
    return h


@dataclass
class GopherRepetitionFilter(Filter):
    """Repetition heuristics of Gopher (Rae et al. 2021, table A1).

    Duplicate lines / paragraphs (by count and by characters), the character share
    of the most frequent 2/3/4-gram, and the character share of words covered by
    duplicated 5..10-grams. n-grams are hashed with numpy so a whole book takes
    milliseconds rather than seconds.
    """

    name = "gopher_repetition"
    applies_to = "text"
    TOP_NGRAM = ((2, 0.20), (3, 0.18), (4, 0.16))
    DUP_NGRAM = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

    dup_line_frac: float = 0.30
    dup_para_frac: float = 0.30
    dup_line_char_frac: float = 0.20
    dup_para_char_frac: float = 0.20

    @staticmethod
    def _dup_fracs(parts: list[str]) -> tuple[float, float]:
        if not parts:
            return 0.0, 0.0
        seen: set[str] = set()
        dup = dup_chars = 0
        for p in parts:
            if p in seen:
                dup += 1
                dup_chars += len(p)
            seen.add(p)
        total = sum(len(p) for p in parts)
        return dup / len(parts), dup_chars / max(total, 1)

    def check(self, doc: Document) -> str | None:
        text = doc.text
        paras = [p.strip() for p in re.split(r"\n{2,}", text) if p.strip()]
        frac, chars = self._dup_fracs(paras)
        if frac > self.dup_para_frac:
            return "repetition:duplicate_paragraphs"
        if chars > self.dup_para_char_frac:
            return "repetition:duplicate_paragraph_chars"
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        frac, chars = self._dup_fracs(lines)
        if frac > self.dup_line_frac:
            return "repetition:duplicate_lines"
        if chars > self.dup_line_char_frac:
            return "repetition:duplicate_line_chars"
        words = text.split()
        if len(words) < 2:
            return None
        vocab: dict[str, int] = {}
        ids = np.fromiter(
            (vocab.setdefault(w, len(vocab) + 1) for w in words), np.uint64, len(words)
        )
        lengths = np.fromiter((len(w) for w in words), np.int64, len(words))
        total = float(lengths.sum())
        cum = np.concatenate([[0], np.cumsum(lengths)])
        for n, limit in self.TOP_NGRAM:
            if len(words) < n:
                break
            h = _ngram_hashes(ids, n)
            _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
            top = int(np.argmax(counts))
            if counts[top] < 2:
                continue
            first = int(np.argmax(inverse == top))
            ngram_chars = cum[first + n] - cum[first]
            if counts[top] * ngram_chars / total > limit:
                return f"repetition:top_{n}gram"
        for n, limit in self.DUP_NGRAM:
            if len(words) < n:
                break
            h = _ngram_hashes(ids, n)
            _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
            dup_start = counts[inverse] > 1
            # Mark every word covered by a duplicated n-gram (difference array).
            cover = np.zeros(len(words) + 1, dtype=np.int64)
            starts = np.nonzero(dup_start)[0]
            np.add.at(cover, starts, 1)
            np.add.at(cover, starts + n, -1)
            covered = np.cumsum(cover[:-1]) > 0
            if lengths[covered].sum() / total > limit:
                return f"repetition:duplicate_{n}grams"
        return None


class LanguageFilter(Filter):
    """Language identification with py3langid's packaged model (no download).

    Sets ``meta["language"]`` and ``meta["language_score"]`` on every prose document.
    """

    name = "language"
    applies_to = "text"
    _identifier = None

    def __init__(self, languages: list[str], min_score: float = 0.5, sample_chars: int = 5000):
        self.languages = set(languages)
        self.min_score = min_score
        self.sample_chars = sample_chars

    @classmethod
    def identifier(cls):  # type: ignore[no-untyped-def]
        if cls._identifier is None:
            from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

            # norm_probs: scores become probabilities, so `min_score` is a probability.
            model = Path(MODEL_DIR) / MODEL_FILE
            cls._identifier = LanguageIdentifier.from_modelpath(model, norm_probs=True)
        return cls._identifier

    def classify(self, text: str) -> tuple[str, float]:
        # Sample from the middle of long texts: starts are often titles or navigation.
        if len(text) > self.sample_chars:
            mid = len(text) // 2
            text = text[mid - self.sample_chars // 2 : mid + self.sample_chars // 2]
        lang, score = self.identifier().classify(text)
        return str(lang), float(score)

    def check(self, doc: Document) -> str | None:
        lang, score = self.classify(doc.text)
        doc.meta["language"] = lang
        doc.meta["language_score"] = round(score, 4)
        if not self.languages:
            return None
        if lang not in self.languages:
            return f"language:{lang}"
        if score < self.min_score:
            return "language:low_confidence"
        return None


# A short built-in list of unambiguous adult-content words, in the spirit of the LDNOOBW
# list used by C4 (Raffel et al. 2020). C4 dropped any page with one such word; we use a
# ratio so that literature or medical text that mentions one is kept.
FLAGGED_WORDS = frozenset(
    [
        "porn",
        "porno",
        "pornography",
        "pornographic",
        "xxx",
        "nsfw",
        "hentai",
        "camgirl",
        "camgirls",
        "blowjob",
        "blowjobs",
        "handjob",
        "gangbang",
        "bukkake",
        "milf",
        "dildo",
        "dildos",
        "cumshot",
        "creampie",
        "deepthroat",
        "fisting",
        "masturbate",
        "masturbating",
        "masturbation",
        "orgasm",
        "orgasms",
        "threesome",
        "striptease",
        "escort",
        "escorts",
        "horny",
        "slut",
        "sluts",
        "whore",
        "whores",
    ]
)


@dataclass
class FlaggedWordsFilter(Filter):
    """Word-list toxicity / adult-content filter: drop when flagged words exceed a ratio."""

    name = "flagged_words"

    max_ratio: float = 0.01
    words: frozenset[str] = FLAGGED_WORDS

    def check(self, doc: Document) -> str | None:
        words = re.findall(r"[a-z]+", doc.text.lower())
        if not words:
            return None
        flagged = sum(w in self.words for w in words)
        if flagged / len(words) > self.max_ratio:
            return "flagged_words:ratio"
        return None


@dataclass
class CodeFilter(Filter):
    """Code heuristics from Codex (Chen et al. 2021) and StarCoder (Li et al. 2023).

    Drop files with a line over 1,000 characters, mean line length over 100, under 25%
    alphanumeric characters, or an auto-generated marker in the first lines.
    """

    name = "code"
    applies_to = "code"
    GENERATED = re.compile(
        r"auto-?generated|autogenerated|do not edit|generated by|code generator", re.I
    )

    max_line: int = 1000
    max_mean_line: float = 100.0
    min_alnum: float = 0.25

    def check(self, doc: Document) -> str | None:
        lines = doc.text.split("\n")
        if max(len(ln) for ln in lines) > self.max_line:
            return "code:long_line"
        if sum(len(ln) for ln in lines) / len(lines) > self.max_mean_line:
            return "code:mean_line_length"
        text = doc.text
        alnum = sum(c.isalnum() for c in text)
        if alnum / max(len(text), 1) < self.min_alnum:
            return "code:alphanumeric_fraction"
        if self.GENERATED.search("\n".join(lines[:5])):
            return "code:auto_generated"
        return None


def language_counts(docs: list[Document]) -> Counter[str]:
    return Counter(str(d.meta.get("language", d.meta.get("code_language", "?"))) for d in docs)
