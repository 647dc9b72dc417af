"""Template probes on a bigram Transformer (answers known by hand) and `lmforge bias` end to end."""

from __future__ import annotations

import json
import string

import pytest
from helpers import tiny_config
from test_bias_pairs import bigram_table, bigram_transformer

from lmforge.bias.lexicon import Lexicon
from lmforge.bias.probes import ProbeSpec, run_probes, sentiment_score
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def toy():
    tok = train_tokenizer([string.ascii_letters + string.digits + " .,;:!?'-"], "char", 0)
    return bigram_transformer(tok.vocab_size, seed=1), tok


def test_context_free_model_has_no_template_gap(toy):
    # Every default template ends with the same word after the subject ("worked as",
    # "was very", ...): a bigram model's continuation probabilities cannot depend on
    # the subject, so every gap is 0 and greedy continuations are identical.
    model, tok = toy
    out = run_probes(model, tok, axes=["gender", "religion"], generate_samples=1, max_new_tokens=8)
    for axis in ("gender", "religion"):
        s = out["summary"][axis]
        assert s["occupation_mean_gap"] == pytest.approx(0.0, abs=1e-4)
        assert s["trait_mean_gap"] == pytest.approx(0.0, abs=1e-4)
        assert s["continuation_sentiment_gap"] == 0.0
    ex = out["details"]["gender"]["examples"]
    assert ex["male"][0].startswith("The man was known for")


def test_gap_equals_the_hand_computed_bigram_difference(toy):
    # With the subject last, the first continuation token " " is predicted from the
    # subject's last character ('y' of "boy", 'l' of "girl"); the rest is shared.
    # So every attribute's gap is |log P(' '|'y') − log P(' '|'l')|, leaning one way.
    model, tok = toy
    spec = ProbeSpec(
        subjects={"gender": {"male": ["the boy"], "female": ["the girl"]}},
        occupation_templates=["{subject}"],
        adjective_templates=["{subject}"],
        generation_prompts=["{subject}"],
    )
    table = bigram_table(model)
    space = tok.encode(" ")[0]
    diff = table[tok.encode("y")[0], space] - table[tok.encode("l")[0], space]
    lex = Lexicon()
    out = run_probes(model, tok, lex, spec, generate_samples=0)
    s = out["summary"]["gender"]
    assert s["occupation_mean_gap"] == pytest.approx(abs(diff), abs=1e-4)
    assert s["trait_mean_gap"] == pytest.approx(abs(diff), abs=1e-4)
    leaning = "male" if diff > 0 else "female"
    assert s["occupation_leans_to"] == {leaning: len(lex.occupations)}
    rel = out["details"]["gender"]["occupations"]["relative_logprob"]["nurse"]
    assert rel["male"] == pytest.approx(diff / 2, abs=1e-4)
    assert "continuation_sentiment" not in s


def test_sentiment_score_counts_lexicon_words():
    assert sentiment_score("A kind, brave and lazy man.", Lexicon()) == 1
    assert sentiment_score("Nothing here", Lexicon()) == 0


def test_bias_cli_compares_two_checkpoints(tmp_path):
    """Train a tiny BPE model, then `lmforge bias` on two of its checkpoints."""
    from lmforge.cli import main
    from lmforge.pretrain import pretrain

    cfg = tiny_config(tmp_path, "tokenizer.kind=bpe", "tokenizer.vocab_size=300")
    pretrain(cfg)
    run = tmp_path / "run"
    a, b = run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000008"
    pairs = tmp_path / "mine.jsonl"
    pairs.write_text(
        "\n".join(
            json.dumps({"more": m, "less": ls, "category": "gender"})
            for m, ls in [("He is strong.", "She is strong."), ("She cooks.", "He cooks.")]
        )
    )
    out = tmp_path / "bias.json"
    rc = main(
        [
            "bias",
            "--checkpoint",
            str(a),
            "--checkpoint",
            str(b),
            "--pairs",
            "crows_pairs",
            "--pairs",
            f"mine={pairs}",
            "--limit",
            "30",
            "--axis",
            "gender",
            "--samples",
            "1",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["lmforge_bias"] == 1
    assert [c["checkpoint"] for c in report["checkpoints"]] == [str(a), str(b)]
    for c in report["checkpoints"]:
        crows = c["benchmarks"]["crows_pairs"]["overall"]
        assert (
            crows["n"] == 30 and 0 <= crows["ci_low"] <= crows["pct_stereotype"] <= crows["ci_high"]
        )
        assert c["benchmarks"]["mine"]["overall"]["n"] == 2
        assert "gender" in c["probes"]
        assert {r["task"] for r in c["results"]} >= {"crows_pairs", "mine", "mine:gender"}
    comps = {x["benchmark"]: x for x in report["comparisons"]}
    assert set(comps) == {"crows_pairs", "mine"}
    assert comps["mine"]["a"] == str(a) and comps["mine"]["b"] == str(b)
    # Data-side statistics from the command line too.
    corpus = next(iter(cfg.data.sources))
    rc = main(["bias", "--data", corpus, "--out", str(tmp_path / "data_bias.json")])
    assert rc == 0
    stats = json.loads((tmp_path / "data_bias.json").read_text())["data"]["statistics"]
    assert stats["all"]["groups"]["gender"]["male"]["mentions"] > 0
    # The bias stage of `lmforge run` on the same checkpoints, labelled.
    from dataclasses import replace

    from lmforge.bias.run import bias_stage

    cfg.bias = replace(cfg.bias, limit=10, probes=False)
    summary = bias_stage(cfg, {"early": a, "late": b}, tmp_path / "stage")["summary"]
    saved = json.loads((tmp_path / "stage" / "bias.json").read_text())
    assert set(summary) == {"early", "late"} and saved["summary"] == summary
    assert 0.0 <= summary["late"]["crows_pairs"]["overall"] <= 100.0
    assert saved["comparisons"][0]["a"] == str(a)
