"""Minimal-pair bias benchmarks: CrowS-Pairs and any data set of the same shape.

A minimal set is two (or more) sentences that differ only in the group they
mention, one of them marked as the stereotypical one. A model "prefers the
stereotype" on a set when it gives that sentence the strictly highest score.
The bias score is the percentage of sets where it does; an unbiased model
scores 50% on pairs (1/k on sets of k).

Scores (Nangia et al. 2020, "CrowS-Pairs", §4):

- causal LMs: the total log-likelihood of the sentence (every token, after an
  end-of-text boundary; `lmforge.eval.intrinsic.evaluate_texts`), as
  lm-evaluation-harness scores CrowS-Pairs;
- masked LMs: the original pseudo-log-likelihood metric: only the tokens the
  sentences share (difflib "equal" spans of the token ids; the unmodified
  tokens) are scored, each masked in turn and predicted from the rest
  (`lmforge.masked.pseudo_log_likelihoods`). Scoring only shared tokens keeps
  the frequency of the modified words themselves out of the comparison.

As in the original metric, scores are rounded to 3 decimals and a tie counts
in the total but not as a preference ("neutral"); ties are reported.
Intervals are 95% Wilson score intervals; two models compare on the same sets
with a paired bootstrap interval and an exact McNemar test.

Files (`load_minimal_pairs`):

- CSV with columns ``sent_more, sent_less, bias_type`` (CrowS-Pairs itself,
  optional ``stereo_antistereo``) or ``more, less, category``;
- JSONL (optionally gzipped), one set per line: ``{"more": str, "less": str,
  "category": str}`` or ``{"sentences": [str, ...], "stereotype": int, "category": str}``
  (optional ``"id"``, ``"direction"``).

CrowS-Pairs ships inside the package (``bias/data/``, CC BY-SA 4.0, with its
attribution): the CSV's five columns lmforge reads, as gzipped JSONL.
"""

from __future__ import annotations

import csv
import difflib
import math
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.data.readers import strip_compression
from lmforge.fileio import iter_json_lines, open_text
from lmforge.tokenizer import Tokenizer

Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


@dataclass
class MinimalSet:
    """Sentences differing only in the group mentioned; `stereotype` indexes the biased one."""

    sentences: list[str]
    category: str = "all"
    stereotype: int = 0
    direction: str = "stereo"  # CrowS-Pairs: "stereo" or "antistereo"
    id: str = ""


# ----------------------------------------------------------------------------- loading


def _pair_from(rec: dict[str, Any], where: str) -> MinimalSet:
    if "sentences" in rec:
        sents = rec["sentences"]
        if not isinstance(sents, list) or len(sents) < 2:
            raise ValueError(f"{where}: 'sentences' must be a list of at least 2 strings")
        stereo = rec.get("stereotype", 0)
        if not isinstance(stereo, int) or not 0 <= stereo < len(sents):
            raise ValueError(f"{where}: 'stereotype' = {stereo!r} is not an index of 'sentences'")
    else:
        more = rec.get("more", rec.get("sent_more"))
        less = rec.get("less", rec.get("sent_less"))
        if more is None or less is None:
            raise ValueError(
                f"{where}: needs 'more' and 'less' (or 'sent_more'/'sent_less', or 'sentences')"
            )
        sents, stereo = [more, less], 0
    if not all(isinstance(s, str) and s.strip() for s in sents):
        raise ValueError(f"{where}: every sentence must be a non-empty string")
    category = rec.get("category", rec.get("bias_type", "all")) or "all"
    direction = rec.get("direction", rec.get("stereo_antistereo", "stereo")) or "stereo"
    return MinimalSet(
        [str(s) for s in sents], str(category), stereo, str(direction), str(rec.get("id", ""))
    )


def load_minimal_pairs(path: str | Path, limit: int = 0) -> list[MinimalSet]:
    """Read a CSV or JSONL minimal-pairs file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"minimal-pairs file not found: {path}")
    sets: list[MinimalSet] = []
    suffix = Path(strip_compression(path.name.lower())).suffix
    if suffix in (".jsonl", ".json"):
        for n, rec in iter_json_lines(path):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            s = _pair_from(rec, f"{path}:{n}")
            s.id = s.id or str(n)
            sets.append(s)
            if limit and len(sets) >= limit:
                break
    elif suffix in (".csv", ".tsv"):
        with open_text(path, newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for rec in reader:
                s = _pair_from(dict(rec), f"{path}:{reader.line_num}")
                s.id = s.id or rec.get("") or str(reader.line_num)
                sets.append(s)
                if limit and len(sets) >= limit:
                    break
    else:
        raise ValueError(
            f"{path}: minimal pairs must be .csv, .tsv or .jsonl (optionally .gz/.zst/.bz2/.xz)"
        )
    if not sets:
        raise ValueError(f"{path}: no minimal pairs found")
    return sets


def crows_pairs_path() -> Path:
    """The packaged CrowS-Pairs (Nangia et al. 2020; ``bias/data/ATTRIBUTION.md``)."""
    return Path(__file__).with_name("data") / "crows_pairs.jsonl.gz"


def load_crows_pairs(path: str | Path | None = None, limit: int = 0) -> list[MinimalSet]:
    """CrowS-Pairs (1,508 pairs, 9 bias types) as packaged, or from `path`."""
    return load_minimal_pairs(path or crows_pairs_path(), limit)


# ----------------------------------------------------------------------------- statistics


def wilson_interval(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (Wilson 1927); (nan, nan) when n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 or k = n one bound is exactly 0 or 1; rounding would leave it just inside.
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test on discordant counts b, c (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


# ----------------------------------------------------------------------------- scores


@dataclass
class PairScores:
    """Per-sentence scores (log-likelihoods, nats) of minimal sets, and the bias figures."""

    sets: list[MinimalSet]
    scores: list[list[float]] = field(default_factory=list)
    scorer: str = "causal"  # "causal" (log-likelihood) or "masked" (pseudo-log-likelihood)
    truncated: int = 0  # masked: sets with a sentence cut to the context (scored on the cut)

    def outcome(self, i: int) -> int | None:
        """1 if the stereotypical sentence strictly wins, 0 if not, None on a tie."""
        rounded = [round(s, 3) for s in self.scores[i]]
        st = self.sets[i].stereotype
        best = max(rounded)
        if rounded.count(best) > 1 and rounded[st] == best:
            return None
        return int(rounded[st] == best)

    def indices(self, category: str | None = None, direction: str | None = None) -> list[int]:
        return [
            i
            for i, s in enumerate(self.sets)
            if (category is None or s.category == category)
            and (direction is None or s.direction == direction)
        ]

    def figure(self, idx: Iterable[int]) -> dict[str, Any]:
        """% stereotype preferred (ties count in n as neutral), Wilson interval, mean margin."""
        idx = list(idx)
        outcomes = [self.outcome(i) for i in idx]
        k = sum(o for o in outcomes if o is not None)
        ties = sum(o is None for o in outcomes)
        n = len(idx)
        lo, hi = wilson_interval(k, n)
        margins = [self.margin(i) for i in idx]
        mean = sum(margins) / n if n else float("nan")
        sd = math.sqrt(sum((m - mean) ** 2 for m in margins) / (n - 1)) if n > 1 else float("nan")
        sizes = {len(self.sets[i].sentences) for i in idx}
        return {
            "pct_stereotype": 100.0 * k / n if n else float("nan"),
            "ci_low": 100.0 * lo,
            "ci_high": 100.0 * hi,
            "n": n,
            "stereotype_preferred": k,
            "ties": ties,
            "ideal": 100.0 / sizes.pop() if len(sizes) == 1 else None,
            "mean_margin": mean,  # log-lik. of the stereotypical minus the best other, nats
            "mean_margin_stderr": sd / math.sqrt(n) if n > 1 else float("nan"),
        }

    def margin(self, i: int) -> float:
        s = self.scores[i]
        st = self.sets[i].stereotype
        return s[st] - max(x for j, x in enumerate(s) if j != st)

    def summary(self) -> dict[str, Any]:
        cats = sorted({s.category for s in self.sets})
        dirs = sorted({s.direction for s in self.sets})
        return {
            "scorer": self.scorer,
            "truncated_sets": self.truncated,
            "overall": self.figure(range(len(self.sets))),
            "by_category": {c: self.figure(self.indices(category=c)) for c in cats},
            "by_direction": {d: self.figure(self.indices(direction=d)) for d in dirs},
        }

    def to_results(self, task: str = "crows_pairs") -> list[Any]:
        """`lmforge.eval.results.Result`s: overall and one per category."""
        from lmforge.eval.results import Result

        summ = self.summary()
        out = []
        for name, fig in [("", summ["overall"]), *summ["by_category"].items()]:
            out.append(
                Result(
                    task=f"{task}:{name}" if name else task,
                    metric="pct_stereotype",
                    value=fig["pct_stereotype"],
                    n=fig["n"],
                    ci_low=fig["ci_low"],
                    ci_high=fig["ci_high"],
                    settings={"scorer": self.scorer, "ideal": fig["ideal"], "ties": fig["ties"]},
                )
            )
        return out


def compare_paired(
    a: PairScores,
    b: PairScores,
    category: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    indices: list[int] | None = None,
) -> dict[str, Any]:
    """B − A on the same sets: difference in % stereotype, paired bootstrap 95% CI, McNemar p.

    `category` or explicit set `indices` restrict the comparison to a subset.
    """
    if [s.sentences for s in a.sets] != [s.sentences for s in b.sets]:
        raise ValueError("compare_paired: the two score sets are not on the same minimal pairs")
    idx = indices if indices is not None else a.indices(category=category)
    oa = [a.outcome(i) or 0 for i in idx]
    ob = [b.outcome(i) or 0 for i in idx]
    n = len(idx)
    if n == 0:
        raise ValueError(f"compare_paired: no sets in category {category!r}")
    diff = 100.0 * (sum(ob) - sum(oa)) / n
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot):
        draw = [rng.randrange(n) for _ in range(n)]
        boots.append(100.0 * sum(ob[j] - oa[j] for j in draw) / n)
    boots.sort()
    only_a = sum(1 for x, y in zip(oa, ob, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(oa, ob, strict=True) if y and not x)
    return {
        "category": category or "all",
        "n": n,
        "difference": diff,
        "ci_low": boots[int(0.025 * n_boot)],
        "ci_high": boots[min(n_boot - 1, int(0.975 * n_boot))],
        "stereotype_only_a": only_a,
        "stereotype_only_b": only_b,
        "mcnemar_p": mcnemar_exact_p(only_a, only_b),
    }


def shared_token_mask(ids: list[int], others: list[list[int]]) -> list[bool]:
    """Positions of `ids` inside difflib "equal" spans against every other sentence."""
    keep = [True] * len(ids)
    for other in others:
        equal = [False] * len(ids)
        matcher = difflib.SequenceMatcher(None, ids, other, autojunk=False)
        for op, i1, i2, _j1, _j2 in matcher.get_opcodes():
            if op == "equal":
                for p in range(i1, i2):
                    equal[p] = True
        keep = [k and e for k, e in zip(keep, equal, strict=True)]
    return keep


@torch.no_grad()
def _masked_scores(
    model: nn.Module, tok: Tokenizer, sets: list[MinimalSet]
) -> tuple[list[list[float]], int]:
    """Scores per set, and how many sets had a sentence longer than the context."""
    from lmforge.masked import pseudo_log_likelihoods

    ctx = int(getattr(model, "cfg").context_length)  # noqa: B009 (nn.Module typing)
    out = []
    truncated = 0
    for s in sets:
        full = [tok.encode(t) for t in s.sentences]
        truncated += any(len(ids) > ctx - 1 for ids in full)
        token_lists = [ids[: ctx - 1] for ids in full]
        row = []
        for i, ids in enumerate(token_lists):
            others = [t for j, t in enumerate(token_lists) if j != i]
            shared = shared_token_mask(ids, others)
            seq = torch.tensor([tok.eot_id, *ids])  # the boundary the model trained with
            score = torch.tensor([False, *shared])
            if not score.any():
                row.append(0.0)
                continue
            pll = pseudo_log_likelihoods(model, seq, tok.mask_id, score)
            row.append(float(pll[score].sum()))
        out.append(row)
    return out, truncated


def score_pairs(
    model: nn.Module,
    tok: Tokenizer,
    sets: list[MinimalSet],
    max_batch_tokens: int = 8192,
) -> PairScores:
    """Score every sentence of every set with `model` (causal or masked; see the docstring)."""
    from lmforge.eval.intrinsic import evaluate_texts

    masked = getattr(getattr(model, "cfg", None), "objective", "causal") == "masked"
    was_training = model.training
    model.eval()
    truncated = 0
    try:
        if masked:
            scores, truncated = _masked_scores(model, tok, sets)
        else:
            flat = [t for s in sets for t in s.sentences]
            res = evaluate_texts(model, tok, flat, max_batch_tokens=max_batch_tokens)
            it = iter(res.per_text_nll)
            scores = [[-next(it) for _ in s.sentences] for s in sets]
    finally:
        model.train(was_training)
    return PairScores(sets, scores, "masked" if masked else "causal", truncated)


def summary_table(named: dict[str, dict[str, Any]]) -> str:
    """Markdown-ish table: one row per category, one column per model summary."""
    names = list(named)
    cats: list[str] = []
    for summ in named.values():
        for c in summ["by_category"]:
            if c not in cats:
                cats.append(c)
    header = ["category", "n", *names]
    rows = []
    for label, getter in [("overall", lambda s: s["overall"])] + [
        (c, (lambda s, c=c: s["by_category"].get(c))) for c in cats
    ]:
        cells = []
        n = ""
        for name in names:
            fig = getter(named[name])
            if fig is None:
                cells.append("-")
                continue
            n = str(fig["n"])
            cells.append(f"{fig['pct_stereotype']:.1f} [{fig['ci_low']:.1f}, {fig['ci_high']:.1f}]")
        rows.append([label, n, *cells])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def group_counts(sets: list[MinimalSet]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for s in sets:
        counts[s.category] += 1
    return dict(counts)
