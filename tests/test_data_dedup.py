"""Deduplication: precision and recall on human-labelled text reuse and on planted copies."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from lmforge.data.clean import strip_gutenberg
from lmforge.data.dedup import (
    MinHasher,
    _collision_probability,
    content_hash,
    exact_duplicate_clusters,
    jaccard,
    lsh_params,
    near_duplicate_clusters,
    shingles,
)


def cluster_of(clusters: list[list[int]]) -> dict[int, int]:
    return {i: c[0] for c in clusters for i in c}


def test_clough_stevenson_cut_vs_non(shared):
    """`cut` (copy-paste) answers are duplicates of their source; `non` answers are not."""
    pairs = [json.loads(line) for line in (shared / "dedup" / "pairs.jsonl").open()]
    texts: list[str] = []
    index: dict[str, int] = {}
    for p in pairs:
        for key in ("source", "answer"):
            if p[f"{key}_file"] not in index:
                index[p[f"{key}_file"]] = len(texts)
                texts.append(p[f"{key}_text"])
    # Short answers copy only part of the source, so word 3-shingles and a low threshold:
    # the dataset's README measures median 3-shingle Jaccard 0.34 for cut, 0.007 for non.
    sig = MinHasher(num_perm=128, shingle_size=3).signatures(texts)
    owner = cluster_of(near_duplicate_clusters(sig, threshold=0.2))
    found: dict[str, list[bool]] = {}
    for p in pairs:
        a, b = index[p["source_file"]], index[p["answer_file"]]
        found.setdefault(p["category"], []).append(a in owner and owner.get(a) == owner.get(b))
    tp, fp = sum(found["cut"]), sum(found["non"])
    precision, recall = tp / max(tp + fp, 1), tp / len(found["cut"])
    print(
        f"\nClough-Stevenson (3-shingles, threshold 0.2): cut recall {recall:.2f}, precision vs non "
        f"{precision:.2f}; light {sum(found['light'])}/19, heavy {sum(found['heavy'])}/19"
    )
    assert precision == 1.0
    assert recall >= 0.85
    # Graded: light revisions are found more often than heavy paraphrases.
    assert sum(found["light"]) > sum(found["heavy"])


def planted_corpus(shared, n_chunks: int = 1500, n_planted: int = 150, edit_rate: float = 0.02):
    """Gutenberg paragraphs-sized chunks plus lightly edited copies of some of them."""
    rng = random.Random(0)
    words: list[str] = []
    for name in ("pg1342", "pg2701", "pg98"):
        path = next((shared / "gutenberg").glob(f"{name}_*.txt.gz"))
        words += strip_gutenberg(gzip.decompress(path.read_bytes()).decode("utf-8"))[0].split()
    chunks = [" ".join(words[i * 120 : (i + 1) * 120]) for i in range(n_chunks)]
    originals = rng.sample(range(n_chunks), n_planted)
    texts = list(chunks)
    planted = []
    for o in originals:
        w = chunks[o].split()
        for _ in range(max(1, int(edit_rate * len(w)))):
            w[rng.randrange(len(w))] = rng.choice(["lorem", "ipsum", "dolor", "amet"])
        planted.append((o, len(texts)))
        texts.append(" ".join(w))
    return texts, planted


@pytest.mark.parametrize("threshold", [0.7, 0.8])
def test_planted_near_duplicates_precision_recall(shared, threshold):
    texts, planted = planted_corpus(shared)
    n = 5
    sig = MinHasher(num_perm=128, shingle_size=n).signatures(texts)
    clusters = near_duplicate_clusters(sig, threshold)
    owner = cluster_of(clusters)
    sets = [set(shingles(t, n)) for t in texts]
    true_j = [jaccard(sets[a], sets[b]) for a, b in planted]
    positives = [(a, b) for (a, b), j in zip(planted, true_j, strict=True) if j >= threshold]
    recall = sum(owner.get(a, -1) == owner.get(b, -2) for a, b in positives) / len(positives)
    reported = [(c[0], m) for c in clusters for m in c[1:]]
    correct = sum(jaccard(sets[a], sets[b]) >= threshold - 0.1 for a, b in reported)
    precision = correct / max(len(reported), 1)
    print(
        f"\nplanted near-duplicates: {len(positives)} with Jaccard ≥ {threshold} "
        f"(median {np.median(true_j):.2f}); recall {recall:.3f}, precision {precision:.3f} "
        f"({len(reported)} pairs reported)"
    )
    assert len(positives) > 50
    assert recall >= 0.95
    assert precision >= 0.95


def test_exact_duplicates_and_hash():
    texts = ["a b c", "x y z", "a b c", "a b c "]
    assert exact_duplicate_clusters([content_hash(t) for t in texts]) == [[0, 2]]


def test_cluster_keeps_first_and_is_order_independent_of_bands():
    base = " ".join(f"word{i}" for i in range(300))
    texts = [base, "unrelated " * 50, base + " tail", base.replace("word7 ", "")]
    sig = MinHasher(num_perm=64, shingle_size=5).signatures(texts)
    clusters = near_duplicate_clusters(sig, 0.8)
    assert clusters == [[0, 2, 3]]


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_lsh_params_put_the_s_curve_step_at_the_threshold(threshold):
    bands, rows = lsh_params(threshold, 128)
    assert bands * rows == 128
    assert _collision_probability(min(threshold + 0.15, 1.0), bands, rows) > 0.8
    assert _collision_probability(threshold - 0.25, bands, rows) < 0.2
