"""Generation metrics equal the reference libraries; batched generation equals one-by-one."""

import gzip
import json
import random

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from lmforge.config import ModelConfig
from lmforge.eval.generation import (
    bleu,
    bootstrap_ci,
    chrf,
    generate_batch,
    rouge_scores,
    split_sentences,
)
from lmforge.model.generate import generate
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_char


def degrade(sentence: str, rng: random.Random) -> str:
    """A plausible system output: some words dropped, a few neighbours swapped."""
    words = [w for w in sentence.split() if rng.random() > 0.2] or sentence.split()[:1]
    if len(words) > 3 and rng.random() < 0.5:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


@pytest.fixture(scope="module")
def multi30k(shared):
    with gzip.open(shared / "multi30k" / "val.de.gz", "rt", encoding="utf-8") as fh:
        refs = [line.rstrip("\n") for line in fh][:300]
    rng = random.Random(0)
    return [degrade(r, rng) for r in refs], refs


@pytest.fixture(scope="module")
def scitldr(shared):
    records = [json.loads(line) for line in (shared / "scitldr" / "dev.jsonl").open()][:60]
    # Hypotheses: the first two abstract sentences (a lead baseline), on separate lines.
    hyps = ["\n".join(r["source"][:2]) for r in records]
    refs = [r["target"] for r in records]
    return hyps, refs


def test_bleu_equals_sacrebleu(multi30k):
    hyps, refs = multi30k
    ours = bleu(hyps, refs, n_bootstrap=1)
    theirs = sacrebleu.corpus_bleu(hyps, [refs])
    assert ours.value == theirs.score
    assert 5 < ours.value < 95  # a real, non-degenerate comparison
    assert ours.settings["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")


def test_chrf_equals_sacrebleu(multi30k):
    hyps, refs = multi30k
    assert chrf(hyps, refs, n_bootstrap=1).value == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert chrf(hyps, refs, n_bootstrap=1, word_order=2).value == (
        sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
    )


def test_bleu_bootstrap_interval_brackets_the_score(multi30k):
    hyps, refs = multi30k
    res = bleu(hyps[:100], refs[:100], n_bootstrap=200)
    assert res.ci_low is not None and res.ci_high is not None
    assert res.ci_low < res.value < res.ci_high
    assert "bs:200" in res.settings["signature"]


def test_multi_reference_bleu_equals_sacrebleu(multi30k):
    hyps, refs = multi30k
    two = [[r, d] for r, d in zip(refs, hyps[::-1], strict=True)]
    assert (
        bleu(hyps, two, n_bootstrap=1).value
        == sacrebleu.corpus_bleu(hyps, [refs, hyps[::-1]]).score
    )
    # A variable number of references: sacrebleu skips the missing (None) ones.
    ragged = [[refs[0]], [refs[1], refs[0]], [refs[2], hyps[0], refs[3]]]
    streams = [refs[:3], [None, refs[0], hyps[0]], [None, None, refs[3]]]
    assert (
        bleu(hyps[:3], ragged, n_bootstrap=1).value
        == sacrebleu.corpus_bleu(hyps[:3], streams).score
    )
    assert (
        chrf(hyps[:3], ragged, n_bootstrap=1).value
        == sacrebleu.corpus_chrf(hyps[:3], streams).score
    )
    with pytest.raises(ValueError, match="at least one reference"):
        bleu(hyps[:2], [[refs[0]], []])


def _tiny_model(tok, context_length=512):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, context_length=context_length, n_layers=1, d_model=32, n_heads=2
    )
    return Transformer(cfg).eval()


def test_translation_scores_every_reference(shared):
    """BLEU and chrF of a generation task use all references, as sacrebleu does with them all."""
    from lmforge.eval.generation import GenerationTask, evaluate_generation
    from lmforge.tokenizer import train_bpe

    with gzip.open(shared / "multi30k" / "val.de.gz", "rt", encoding="utf-8") as fh:
        german = [line.strip() for line in fh][:8]
    tok = train_bpe(german, 300)
    prompts = [tok.encode(g[:12]) for g in german[:6]]
    model = _tiny_model(tok)
    _, first_hyps = evaluate_generation(
        model, tok, GenerationTask("translation", prompts, [[g] for g in german[:6]], ("bleu",)), 5
    )
    # A second reference (for every other example) that the greedy output matches exactly.
    refs = [[g, first_hyps[i]] if i % 2 else [g] for i, g in enumerate(german[:6])]
    task = GenerationTask("translation", prompts, refs, ("bleu", "chrf"))
    scores, hyps = evaluate_generation(model, tok, task, max_new_tokens=5)
    assert hyps == first_hyps  # greedy decoding
    by_name = {m.name: m.value for m in scores}
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert by_name["bleu"] == sacrebleu.corpus_bleu(hyps, streams).score
    assert by_name["chrf"] == sacrebleu.corpus_chrf(hyps, streams).score
    assert by_name["chrf"] > sacrebleu.corpus_chrf(hyps, streams[:1]).score  # first only


def test_translation_outputs_are_saved_beside_eval_json(shared, tmp_path):
    from lmforge.eval.results import CheckpointResults, read_eval_json, write_eval_json
    from lmforge.eval.tasks import TaskOptions, run_task
    from lmforge.finetune.tasks import get_task, read_records
    from lmforge.tokenizer import train_bpe

    spec = str(shared / "multi30k" / "val")
    records = list(read_records(spec, limit=4))
    tok = train_bpe([t for r in records for _, t in get_task("translation").to_turns(r)], 300)
    opts = TaskOptions(data=[spec], limit=4, max_new_tokens=4)
    results = run_task(_tiny_model(tok), tok, "translation", opts)
    write_eval_json(tmp_path / "eval.json", [CheckpointResults("ckpt", results)])
    lines = [json.loads(x) for x in (tmp_path / "eval_outputs.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2, 3]
    assert all(x["task"] == "translation" and x["checkpoint"] == "ckpt" for x in lines)
    assert all(x["source"] and x["references"] for x in lines)
    hyps = [x["hypothesis"] for x in lines]
    streams = [[x["references"][0] for x in lines]]
    saved = {r.metric: r for r in read_eval_json(tmp_path / "eval.json")[0].results}
    assert saved["bleu"].value == sacrebleu.corpus_bleu(hyps, streams).score
    assert saved["bleu"].settings["outputs"] == "eval_outputs.jsonl"


def test_rouge_equals_rouge_score(scitldr):
    hyps, refs = scitldr
    ours = rouge_scores(hyps, refs, sentence_split=False, n_bootstrap=1)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    per = [scorer.score_multi(r, h) for h, r in zip(hyps, refs, strict=True)]
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = sum(p[t].fmeasure * 100 for p in per) / len(per)
        assert ours[t].value == pytest.approx(expected, rel=1e-12)
        assert ours[t].n == len(hyps)
    # Newline-separated sentences make Lsum differ from L: the summary-level LCS is in use.
    assert ours["rougeLsum"].value != ours["rougeL"].value


def test_rouge_lsum_with_sentence_splitting(scitldr):
    hyps, refs = scitldr
    flat = [h.replace("\n", " ") for h in hyps]
    ours = rouge_scores(flat, refs, rouge_types=["rougeLsum"], sentence_split=True, n_bootstrap=1)
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    expected = [
        scorer.score_multi([split_sentences(r) for r in rs], split_sentences(h))[
            "rougeLsum"
        ].fmeasure
        for h, rs in zip(flat, refs, strict=True)
    ]
    assert ours["rougeLsum"].value == pytest.approx(100 * sum(expected) / len(expected), rel=1e-12)


def test_split_sentences():
    text = "We propose X. It works well! Does it scale? Yes. See Fig. 2 for e.g. details."
    assert split_sentences(text).split("\n") == [
        "We propose X.",
        "It works well!",
        "Does it scale?",
        "Yes.",
        "See Fig.",
        "2 for e.g. details.",
    ]


def test_bootstrap_ci_of_constant_is_the_constant():
    assert bootstrap_ci([3.0] * 20) == (3.0, 3.0)
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, n_bootstrap=500)
    assert lo < 0.5 < hi


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_batch_equals_one_by_one(temperature):
    tok = train_char(["abcdefghij klmnop"])
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layers=2, d_model=32, n_heads=4)
    ).eval()
    prompts = [tok.encode(p) for p in ["abc", "hij k", "abd", "p", "mnop a"]]
    got = generate_batch(model, prompts, 12, temperature=temperature, seed=3, batch_size=8)
    # Prompt i alone, seeded 3 + i: batching (by length, longest first) changes nothing,
    # greedy or sampled, because every row draws from its own generator.
    for i, p in enumerate(prompts):
        alone = generate(model, p, 12, temperature=temperature, seed=3 + i)
        assert got[i] == alone[0, len(p) :].tolist()


def test_generate_batch_cuts_at_stop_token():
    tok = train_char(["abc"])
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, context_length=16, n_layers=1, d_model=16, n_heads=2)
    ).eval()
    free = generate_batch(model, [tok.encode("ab")], 8, temperature=0.0)[0]
    stop = free[3]
    cut = generate_batch(model, [tok.encode("ab")], 8, temperature=0.0, stop_ids=[stop])[0]
    assert cut == free[: free.index(stop)]


@pytest.mark.parametrize(
    "task, spec, metrics",
    [
        ("translation", "multi30k/val", {"bleu", "chrf"}),
        ("summarization", "scitldr/dev.jsonl", {"rouge1", "rouge2", "rougeL", "rougeLsum"}),
    ],
)
def test_finetune_task_prompts_and_scores(shared, task, spec, metrics):
    from lmforge.eval.generation import evaluate_generation, finetune_task
    from lmforge.finetune.tasks import get_task, prompt_ids, read_records
    from lmforge.tokenizer import ASSISTANT, train_bpe

    records = list(read_records(str(shared / spec), limit=6))
    turns = [get_task(task).to_turns(r) for r in records]
    tok = train_bpe([t for ts in turns for _, t in ts], 400)
    gen_task = finetune_task(tok, task, str(shared / spec), limit=6)
    # The prompt is the fine-tuning chat layout up to and including '<|assistant|>'.
    assert gen_task.prompts[0] == prompt_ids(tok, turns[0][:-1])
    assert gen_task.prompts[0][-1] == tok.specials[ASSISTANT]
    if task == "summarization":  # every gold TLDR is a reference
        assert gen_task.references[0] == [t.strip() for t in records[0].data["target"]]
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tok.vocab_size, context_length=512, n_layers=1, d_model=32, n_heads=2
        )
    ).eval()
    scores, hyps = evaluate_generation(model, tok, gen_task, max_new_tokens=6)
    assert {m.name for m in scores} == metrics and len(hyps) == 6
    by_name = {m.name: m for m in scores}
    if task == "translation":
        refs = [r[0] for r in gen_task.references]
        assert by_name["bleu"].value == sacrebleu.corpus_bleu(hyps, [refs]).score
        assert by_name["chrf"].value == sacrebleu.corpus_chrf(hyps, [refs]).score
        assert "signature" in by_name["bleu"].settings
    else:
        assert by_name["rouge1"].value == pytest.approx(
            rouge_scores(hyps, gen_task.references, n_bootstrap=1)["rouge1"].value
        )
