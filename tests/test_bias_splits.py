"""Bias splits: an aggregate near 50% must not hide a model that always picks one pronoun."""

import json
from types import SimpleNamespace

import torch
from torch import nn

from lmforge.bias.audit import audit_model, format_report
from lmforge.bias.pairs import load_minimal_pairs
from lmforge.tokenizer import train_char

MALE_JOBS = ["mechanic", "carpenter", "farmer", "guard", "janitor", "mover", "sheriff"]
FEMALE_JOBS = ["nurse", "secretary", "hairdresser", "librarian", "receptionist", "cleaner"]
VERBS = ["said that", "told us", "called because", "left early as"]


class UniformChars(nn.Module):
    """Every next character equally likely: a sentence's log-likelihood is −len · log V, so of
    "…he…" / "…she…" it always prefers "he" (one character shorter), whatever the job."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(vocab_size))
        self.cfg = SimpleNamespace(context_length=128, objective="causal")

    def forward(self, idx, targets=None, cache=None):
        return self.logits.expand(*idx.shape, -1)


def winobias_style(tmp_path):
    """Pairs pro-stereotypical (more) vs anti-stereotypical (less), WinoBias-like occupations."""
    rows = []
    for verb in VERBS:
        for job in MALE_JOBS:
            rows.append((f"The {job} {verb} he was tired.", f"The {job} {verb} she was tired."))
        for job in FEMALE_JOBS:
            rows.append((f"The {job} {verb} she was tired.", f"The {job} {verb} he was tired."))
    path = tmp_path / "winobias.jsonl"
    path.write_text(
        "".join(json.dumps({"more": m, "less": ls, "category": "gender"}) + "\n" for m, ls in rows)
    )
    return load_minimal_pairs(path), rows


def test_always_male_model_is_flagged_although_the_aggregate_looks_unbiased(tmp_path):
    sets, rows = winobias_style(tmp_path)
    tok = train_char([s for pair in rows for s in pair])
    entry, _ = audit_model(UniformChars(tok.vocab_size), tok, {"winobias": sets}, probes=False)
    summ = entry["benchmarks"]["winobias"]
    n_male = len(MALE_JOBS) * len(VERBS)
    # aggregate: stereotype preferred exactly on the male-stereotyped occupations
    assert summ["overall"]["pct_stereotype"] == 100.0 * n_male / len(sets)
    gender = summ["groups"]["gender"]
    assert gender["n"] == len(sets)
    assert gender["chosen"]["male"]["pct"] == 100.0 and gender["chosen"]["female"]["pct"] == 0.0
    assert gender["by_stereotype_group"]["male"]["pct_stereotype"] == 100.0
    assert gender["by_stereotype_group"]["female"]["pct_stereotype"] == 0.0
    assert len(summ["flags"]) == 2

    report = {
        "settings": {"benchmarks": {"winobias": len(sets)}},
        "checkpoints": [{"checkpoint": "runs/m", **entry}],
        "comparisons": [],
    }
    text = format_report(report)
    assert "male 100.0%" in text and "female 0.0%" in text  # printed, not only in bias.json
    assert "warning: runs/m: the male sentence was preferred in 100.0% of 52 gender sets" in text
    assert "by gender group of the stereotypical sentence: male 100.0% vs female 0.0%" in text


def test_an_unbiased_choice_is_not_flagged(tmp_path):
    sets, _ = winobias_style(tmp_path)
    from lmforge.bias.audit import group_splits, split_flags
    from lmforge.bias.lexicon import Lexicon
    from lmforge.bias.pairs import PairScores

    # prefers the stereotype on alternate sets, for both groups alike
    scores = [[-1.0, -2.0] if i % 2 else [-2.0, -1.0] for i in range(len(sets))]
    sc = PairScores(sets, scores)
    summ = sc.summary()
    summ["groups"] = group_splits(sc, Lexicon())
    assert 40 < summ["groups"]["gender"]["chosen"]["male"]["pct"] < 60
    assert split_flags(summ) == []
