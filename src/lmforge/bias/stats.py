"""Data-side bias statistics: who is mentioned, and next to which jobs and sentiments.

For every source, counts of:

- words and sentences (or windows);
- mentions of each demographic term group of the lexicon (``gender:male``,
  ``religion:muslim``, ...), and the number of sentences mentioning it;
- co-occurrence of each group with each occupation and with positive/negative
  sentiment words: the number of sentences that contain both (default), or,
  with ``window=N``, the number of (group mention, word) pairs at most N words
  apart.

`summarize` turns the counts into the report section: mentions per 10,000
words, the share of each group within its axis, the net sentiment rate of the
sentences mentioning each group ((positive − negative co-occurrences) /
sentences), the occupations most associated with each group, and for gender the
male share of the gendered sentences of each occupation.

Counting is plain word matching (lowercase, single words and two-word phrases),
with the limitations listed in `lmforge.bias.lexicon`. `BiasStatisticsStep`
counts the documents flowing through the prepare pipeline without changing
them; its counters merge across tasks and `lmforge.data.report` turns them
into the ``bias`` section of ``data_report.json``.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from lmforge.bias.lexicon import Lexicon
from lmforge.data.document import Document
from lmforge.data.steps import DropHook, Step

SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+|\n\s*\n")
WORD = re.compile(r"[a-z]+")  # apostrophes split: "she's" counts "she"
SEP = "|"  # counter keys: kind|source|label[|label]


class TermIndex:
    """Maps words and two-word phrases to their labels ("gender:male", "occupation:nurse", ...)."""

    def __init__(self, lexicon: Lexicon):
        self.labels: dict[str, list[str]] = defaultdict(list)
        for axis, groups in lexicon.groups.items():
            for group, terms in groups.items():
                for t in terms:
                    self.labels[t].append(f"{axis}:{group}")
        for o in lexicon.occupations:
            self.labels[o].append(f"occupation:{o}")
        for pol, words in lexicon.sentiment.items():
            for w in words:
                self.labels[w].append(f"sentiment:{pol}")
        self.has_phrases = any(" " in t for t in self.labels)

    def find(self, words: list[str]) -> list[tuple[int, str]]:
        """(position, label) for every term occurrence in `words`."""
        out = []
        labels = self.labels
        for i, w in enumerate(words):
            for lab in labels.get(w, ()):
                out.append((i, lab))
            if self.has_phrases and i + 1 < len(words):
                for lab in labels.get(f"{w} {words[i + 1]}", ()):
                    out.append((i, lab))
        return out


def is_group_label(label: str) -> bool:
    return not label.startswith(("occupation:", "sentiment:"))


def count_document(
    text: str, source: str, index: TermIndex, counts: Counter[str], window: int = 0
) -> None:
    """Add the counts of one document to `counts` (keys ``kind|source|labels``)."""
    src = (source or "unknown").replace(SEP, "/")  # the separator of the counter keys
    counts[f"docs{SEP}{src}"] += 1
    units: list[list[str]]
    lowered = text.lower()
    if window > 0:
        units = [WORD.findall(lowered)]
    else:
        units = [WORD.findall(s) for s in SENTENCE_END.split(lowered)]
    for words in units:
        if not words:
            continue
        counts[f"words{SEP}{src}"] += len(words)
        hits = index.find(words)
        if window <= 0:
            counts[f"sentences{SEP}{src}"] += 1
        if not hits:
            continue
        for _, lab in hits:
            if is_group_label(lab):
                counts[f"mentions{SEP}{src}{SEP}{lab}"] += 1
        if window > 0:
            groups = [(i, lab) for i, lab in hits if is_group_label(lab)]
            attrs = [(i, lab) for i, lab in hits if not is_group_label(lab)]
            for gi, g in groups:
                counts[f"units{SEP}{src}{SEP}{g}"] += 1
                for ai, a in attrs:
                    if abs(ai - gi) <= window:
                        counts[f"cooc{SEP}{src}{SEP}{g}{SEP}{a}"] += 1
        else:
            present = {lab for _, lab in hits}
            groups_here = [lab for lab in present if is_group_label(lab)]
            attrs_here = [lab for lab in present if not is_group_label(lab)]
            for g in groups_here:
                counts[f"units{SEP}{src}{SEP}{g}"] += 1
                for a in attrs_here:
                    counts[f"cooc{SEP}{src}{SEP}{g}{SEP}{a}"] += 1
            for a in attrs_here:
                if a.startswith("occupation:"):
                    counts[f"units{SEP}{src}{SEP}{a}"] += 1


def count_documents(
    docs: Iterable[Document], lexicon: Lexicon | None = None, window: int = 0
) -> Counter[str]:
    index = TermIndex(lexicon or Lexicon())
    counts: Counter[str] = Counter()
    for d in docs:
        count_document(d.text, d.source, index, counts, window)
    return counts


def _source_summary(c: dict[str, Counter[str]], lexicon: Lexicon, window: int) -> dict[str, Any]:
    words = c["words"][""]
    out: dict[str, Any] = {
        "documents": c["docs"][""],
        "words": words,
        "unit": f"window of ±{window} words" if window > 0 else "sentence",
    }
    if window <= 0:
        out["sentences"] = c["sentences"][""]
    axes: dict[str, Any] = {}
    for axis, groups in lexicon.groups.items():
        total = sum(c["mentions"][f"{axis}:{g}"] for g in groups)
        ax: dict[str, Any] = {}
        for g in groups:
            lab = f"{axis}:{g}"
            m = c["mentions"][lab]
            units = c["units"][lab]
            pos = c["cooc"][f"{lab}{SEP}sentiment:positive"]
            neg = c["cooc"][f"{lab}{SEP}sentiment:negative"]
            occ = {
                o: c["cooc"][f"{lab}{SEP}occupation:{o}"]
                for o in lexicon.occupations
                if c["cooc"][f"{lab}{SEP}occupation:{o}"]
            }
            ax[g] = {
                "mentions": m,
                "per_10k_words": round(1e4 * m / words, 3) if words else 0.0,
                "share_of_axis": round(m / total, 4) if total else None,
                "units": units,
                "positive_cooc": pos,
                "negative_cooc": neg,
                "net_sentiment_rate": round((pos - neg) / units, 4) if units else None,
                "top_occupations": dict(sorted(occ.items(), key=lambda kv: (-kv[1], kv[0]))[:10]),
            }
        axes[axis] = ax
    out["groups"] = axes
    if "gender" in lexicon.groups and {"male", "female"} <= set(lexicon.groups["gender"]):
        occ_gender = {}
        for o in lexicon.occupations:
            m = c["cooc"][f"gender:male{SEP}occupation:{o}"]
            f = c["cooc"][f"gender:female{SEP}occupation:{o}"]
            if m + f:
                occ_gender[o] = {"male": m, "female": f, "male_share": round(m / (m + f), 4)}
        out["occupation_gender"] = dict(
            sorted(occ_gender.items(), key=lambda kv: -(kv[1]["male"] + kv[1]["female"]))
        )
    return out


def summarize(
    counts: Counter[str] | dict[str, int], lexicon: Lexicon | None = None, window: int = 0
) -> dict[str, Any]:
    """The report section: per source and for all sources together (see the docstring)."""
    lexicon = lexicon or Lexicon()
    per_src: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for key, v in counts.items():
        parts = key.split(SEP)
        kind, src, rest = parts[0], parts[1], SEP.join(parts[2:])
        for s in (src, "*all*"):
            per_src[s][kind][rest] += v
    sources = sorted(s for s in per_src if s != "*all*")
    return {
        "lexicon": lexicon.source,
        "all": _source_summary(per_src["*all*"], lexicon, window),
        "sources": {s: _source_summary(per_src[s], lexicon, window) for s in sources},
    }


def bias_statistics(
    docs: Iterable[Document], lexicon: Lexicon | None = None, window: int = 0
) -> dict[str, Any]:
    """Counts and co-occurrences of demographic groups in `docs`, per source (see docstring)."""
    lexicon = lexicon or Lexicon()
    return summarize(count_documents(docs, lexicon, window), lexicon, window)


class BiasStatisticsStep(Step):
    """Pipeline step that counts (see the docstring) and passes every document on unchanged."""

    name = "bias_statistics"

    def __init__(self, lexicon: Lexicon, window: int = 0, on_drop: DropHook | None = None):
        super().__init__(on_drop)
        self.index = TermIndex(lexicon)
        self.window = window

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        st = self.stats
        for doc in docs:
            t0 = time.process_time()
            st.add_in(doc)
            count_document(doc.text, doc.source, self.index, st.counters, self.window)
            st.add_out(doc)
            st.seconds += time.process_time() - t0
            yield doc

    def process(self, doc: Document) -> Document | str:  # pragma: no cover - run instead
        return doc


def render_markdown(section: dict[str, Any], max_groups: int = 12) -> str:
    """The ``## Bias statistics`` part of data_report.md."""
    a = section["all"]
    lines = [
        "## Bias statistics",
        "",
        f"Demographic term groups in the output ({a['words']:,} words; co-occurrence unit: "
        f"{a['unit']}; lexicon: {section['lexicon']}).",
        "",
        "| axis | group | mentions | per 10k words | share of axis | net sentiment | top occupations |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    rows = 0
    for axis, groups in a["groups"].items():
        for g, s in groups.items():
            if not s["mentions"] or rows >= max_groups * 4:
                continue
            rows += 1
            share = "-" if s["share_of_axis"] is None else f"{s['share_of_axis']:.3f}"
            net = "-" if s["net_sentiment_rate"] is None else f"{s['net_sentiment_rate']:+.3f}"
            occ = ", ".join(f"{o} {n}" for o, n in list(s["top_occupations"].items())[:4])
            lines.append(
                f"| {axis} | {g} | {s['mentions']:,} | {s['per_10k_words']:.1f} | {share} | {net} | {occ} |"
            )
    occ_gender = a.get("occupation_gender", {})
    if occ_gender:
        lines += ["", "Male share of the gendered sentences per occupation (most frequent first): "]
        lines.append(
            ", ".join(
                f"{o} {v['male_share']:.2f} (n={v['male'] + v['female']})"
                for o, v in list(occ_gender.items())[:15]
            )
        )
    return "\n".join(lines) + "\n"


def balancing_weights(
    summary: dict[str, Any], axis: str = "gender", target: float = 0.5
) -> dict[str, Any]:
    """Source weight multipliers that balance a two-group axis in the mixed corpus.

    With mentions a_s, b_s of the two groups in source s, the mixed share of the
    first group is Σ w_s a_s / Σ w_s (a_s + b_s). Sources leaning to the
    under-represented group get weight k (the others keep 1), with k solving
    share(k) = `target` in closed form. Multiply each source's
    ``prepare.sources[].weight`` by its factor. Raises ValueError when no source
    leans the other way (reweighting cannot balance the mix; CDA can).
    """
    sources = summary["sources"]
    groups = sorted({g for s in sources.values() for g in s["groups"].get(axis, {})})
    if len(groups) != 2:
        raise ValueError(f"balancing needs an axis with two groups; {axis!r} has {groups}")
    g1, g2 = groups
    a = {n: s["groups"][axis][g1]["mentions"] for n, s in sources.items()}
    t = {n: a[n] + s["groups"][axis][g2]["mentions"] for n, s in sources.items()}
    total_a, total = sum(a.values()), sum(t.values())
    if total == 0:
        raise ValueError(f"no mentions of the {axis} groups in any source")
    share = total_a / total
    over_first = share > target
    helpers = [n for n in sources if t[n] and (a[n] / t[n] < target) == over_first]
    others = [n for n in sources if n not in helpers]
    if not helpers:
        raise ValueError(
            f"every source leans the same way on {axis} ({g1} share {share:.3f}): "
            "reweighting sources cannot reach the target; use counterfactual augmentation"
        )
    a_h, t_h = sum(a[n] for n in helpers), sum(t[n] for n in helpers)
    a_o, t_o = sum(a[n] for n in others), sum(t[n] for n in others)
    k = (target * t_o - a_o) / (a_h - target * t_h)
    weights = {n: (k if n in helpers else 1.0) for n in sources}
    new_share = sum(weights[n] * a[n] for n in sources) / sum(weights[n] * t[n] for n in sources)
    return {
        "axis": axis,
        "group": g1,
        "share_before": share,
        "share_after": new_share,
        "weights": weights,
    }
