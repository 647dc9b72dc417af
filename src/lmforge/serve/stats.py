"""Statistics of pairwise human judgments: win rates, Bradley–Terry, Elo, agreement.

A judgment compares the outputs of two models, ``a`` and ``b`` (in the item's
canonical order, not the left/right order an annotator saw), with one outcome:

    "a"         a is better
    "b"         b is better
    "tie"       equally good
    "both_bad"  neither is acceptable

For win rates, Bradley–Terry and Elo a tie and "both bad" count as half a win
for each side (the usual treatment of draws in paired comparisons; Davidson
1970 gives a model with an explicit tie parameter, which buys little here).
Agreement statistics keep the four outcomes as separate categories.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

OUTCOMES = ("a", "b", "tie", "both_bad")

# Elo scale: a difference of 400 points means odds of 10:1 (Elo 1978; the FIDE convention).
ELO_SCALE = 400.0
ELO_BASE = 1000.0


@dataclass(frozen=True)
class Judgment:
    item: int
    annotator: str
    model_a: str
    model_b: str
    outcome: str  # one of OUTCOMES


def score_of_a(outcome: str) -> float:
    """Points for model a: 1 win, 0 loss, 1/2 for a tie or 'both bad'."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
    return {"a": 1.0, "b": 0.0}.get(outcome, 0.5)


# ----------------------------------------------------------------------------- win rates


def win_rates(judgments: Sequence[Judgment], models: Sequence[str]) -> list[dict]:
    """Per model: comparisons, wins, losses, ties, both-bad and (wins + ties/2) / comparisons."""
    rows: dict[str, Counter[str]] = {m: Counter() for m in models}
    for j in judgments:
        for me, other_wins, i_win in ((j.model_a, "b", "a"), (j.model_b, "a", "b")):
            c = rows.setdefault(me, Counter())
            c["n"] += 1
            if j.outcome == i_win:
                c["wins"] += 1
            elif j.outcome == other_wins:
                c["losses"] += 1
            else:
                c[j.outcome] += 1
    out = []
    for m, c in rows.items():
        n = c["n"]
        points = c["wins"] + 0.5 * (c["tie"] + c["both_bad"])
        out.append(
            {
                "model": m,
                "n": n,
                "wins": c["wins"],
                "losses": c["losses"],
                "ties": c["tie"],
                "both_bad": c["both_bad"],
                "win_rate": points / n if n else math.nan,
            }
        )
    return out


def head_to_head(judgments: Sequence[Judgment], models: Sequence[str]) -> np.ndarray:
    """(M, M) matrix: entry [i, j] = points of model i against model j."""
    index = {m: k for k, m in enumerate(models)}
    wins = np.zeros((len(models), len(models)))
    for j in judgments:
        a, b = index[j.model_a], index[j.model_b]
        s = score_of_a(j.outcome)
        wins[a, b] += s
        wins[b, a] += 1.0 - s
    return wins


# ----------------------------------------------------------------------------- Bradley–Terry


def bradley_terry(
    wins: np.ndarray, prior: float = 0.0, max_iter: int = 10_000, tol: float = 1e-10
) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry strengths from a (M, M) matrix of points.

    Model: P(i beats j) = p_i / (p_i + p_j). Fitted with the minorization–
    maximization iteration of Hunter (2004), "MM algorithms for generalized
    Bradley–Terry models", eq. (3):

        p_i ← W_i / Σ_{j≠i} n_ij / (p_i + p_j)

    with W_i the points of i and n_ij the comparisons of i and j. Each step
    increases the likelihood; it converges to the MLE when the comparison graph
    is strongly connected (every model has won and lost somewhere). `prior`
    adds that many virtual ties between every pair, which keeps strengths
    finite for a model that never won (a mild shrinkage toward equal strength).
    Returned strengths have geometric mean 1; models never compared get 1.
    """
    w = np.asarray(wins, dtype=np.float64).copy()
    m = w.shape[0]
    if w.shape != (m, m):
        raise ValueError(f"wins must be square, got shape {w.shape}")
    if prior > 0:
        w += (prior / 2.0) * (1.0 - np.eye(m))
    np.fill_diagonal(w, 0.0)
    n = w + w.T
    played = n.sum(axis=1) > 0
    p = np.ones(m)
    if played.sum() < 2:
        return p
    w, n = w[np.ix_(played, played)], n[np.ix_(played, played)]
    total = w.sum(axis=1)
    q = np.ones(played.sum())
    for _ in range(max_iter):
        denom = (n / (q[:, None] + q[None, :])).sum(axis=1)
        new = total / denom
        # A model with no points drifts to 0; floor it so the others stay well-defined.
        new = np.maximum(new, 1e-300)
        new /= math.exp(np.log(new).mean())
        done = np.max(np.abs(np.log(new) - np.log(q))) < tol
        q = new
        if done:
            break
    p[played] = q
    return p


def to_elo_scale(strengths: np.ndarray) -> np.ndarray:
    """Bradley–Terry strengths as Elo-style ratings: p_i/(p_i+p_j) = 1/(1+10^((R_j-R_i)/400))."""
    return ELO_BASE + ELO_SCALE * np.log10(np.maximum(strengths, 1e-300))


def bootstrap_bt(
    judgments: Sequence[Judgment],
    models: Sequence[str],
    n_boot: int = 200,
    prior: float = 1.0,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the Elo-scale Bradley–Terry rating (resampling judgments).

    Returns (low, high), each of shape (M,).
    """
    if not judgments:
        nan = np.full(len(models), math.nan)
        return nan, nan
    rng = np.random.default_rng(seed)
    index = {m: k for k, m in enumerate(models)}
    a = np.array([index[j.model_a] for j in judgments])
    b = np.array([index[j.model_b] for j in judgments])
    s = np.array([score_of_a(j.outcome) for j in judgments])
    samples = np.empty((n_boot, len(models)))
    m = len(models)
    for r in range(n_boot):
        pick = rng.integers(0, len(judgments), len(judgments))
        wins = np.zeros((m, m))
        np.add.at(wins, (a[pick], b[pick]), s[pick])
        np.add.at(wins, (b[pick], a[pick]), 1.0 - s[pick])
        samples[r] = to_elo_scale(bradley_terry(wins, prior=prior))
    alpha = (1.0 - level) / 2.0
    return np.quantile(samples, alpha, axis=0), np.quantile(samples, 1.0 - alpha, axis=0)


# ----------------------------------------------------------------------------- Elo


def elo(judgments: Sequence[Judgment], models: Sequence[str], k: float = 32.0) -> dict[str, float]:
    """Online Elo ratings after the judgments in the given (time) order, starting at 1000.

    K = 32 is the classic club-player factor. Unlike Bradley–Terry, Elo depends
    on the order of the judgments; it is shown because people know the scale.
    """
    rating = dict.fromkeys(models, ELO_BASE)
    for j in judgments:
        ra, rb = rating[j.model_a], rating[j.model_b]
        expected_a = 1.0 / (1.0 + 10.0 ** ((rb - ra) / ELO_SCALE))
        delta = k * (score_of_a(j.outcome) - expected_a)
        rating[j.model_a] = ra + delta
        rating[j.model_b] = rb - delta
    return rating


# ----------------------------------------------------------------------------- agreement


def cohen_kappa(labels_1: Sequence[str], labels_2: Sequence[str]) -> float:
    """Cohen's (1960) kappa of two raters over the same items: (p_o − p_e) / (1 − p_e).

    NaN when chance agreement is 1 (both raters always give one and the same label).
    """
    if len(labels_1) != len(labels_2):
        raise ValueError("both raters must label the same items")
    n = len(labels_1)
    if n == 0:
        return math.nan
    p_o = sum(x == y for x, y in zip(labels_1, labels_2, strict=True)) / n
    c1, c2 = Counter(labels_1), Counter(labels_2)
    p_e = sum(c1[c] * c2[c] for c in set(c1) | set(c2)) / (n * n)
    return math.nan if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' (1971) kappa from an (items, categories) matrix of rater counts.

    Items may have different numbers of raters (at least 2 each): the per-item
    agreement P_i = Σ_j n_ij (n_ij − 1) / (n_i (n_i − 1)) is averaged, and chance
    agreement uses the pooled category proportions; with a constant number of
    raters this is exactly Fleiss' statistic.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n_i = counts.sum(axis=1)
    keep = n_i >= 2
    counts, n_i = counts[keep], n_i[keep]
    if len(counts) == 0:
        return math.nan
    p_item = (counts * (counts - 1)).sum(axis=1) / (n_i * (n_i - 1))
    p_cat = counts.sum(axis=0) / n_i.sum()
    p_bar, p_e = p_item.mean(), float((p_cat**2).sum())
    return math.nan if p_e >= 1.0 else float((p_bar - p_e) / (1.0 - p_e))


def agreement(judgments: Sequence[Judgment], min_shared: int = 2) -> dict:
    """Inter-annotator agreement on items judged by several people.

    Returns Fleiss' kappa over every item with two or more judgments, and
    Cohen's kappa for each pair of annotators sharing at least `min_shared` items.
    """
    by_item: dict[int, dict[str, str]] = defaultdict(dict)
    for j in judgments:
        by_item[j.item][j.annotator] = j.outcome
    multi = {item: r for item, r in by_item.items() if len(r) >= 2}
    counts = np.array(
        [[sum(o == c for o in r.values()) for c in OUTCOMES] for r in multi.values()]
    ).reshape(-1, len(OUTCOMES))
    annotators = sorted({a for r in multi.values() for a in r})
    pairs = []
    for i, x in enumerate(annotators):
        for y in annotators[i + 1 :]:
            shared = [r for r in multi.values() if x in r and y in r]
            if len(shared) >= min_shared:
                pairs.append(
                    {
                        "a": x,
                        "b": y,
                        "n_items": len(shared),
                        "kappa": cohen_kappa([r[x] for r in shared], [r[y] for r in shared]),
                        "raw": sum(r[x] == r[y] for r in shared) / len(shared),
                    }
                )
    return {
        "n_items": len(multi),
        "raters": len(annotators),
        "fleiss_kappa": fleiss_kappa(counts) if len(multi) else math.nan,
        "pairs": pairs,
    }
