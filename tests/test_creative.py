"""Creative writing: the task's template and mask, the built-in examples, the open-ended metrics,
and a tiny `lmforge run creative-writing`."""

import gzip
import json
import math

import pytest
import torch
from helpers import tiny_run_overrides

from lmforge.config import ModelConfig
from lmforge.finetune.creative import build_creative, clean_region, creative_records
from lmforge.finetune.tasks import Record, RecordError, encode_record, get_task
from lmforge.model.transformer import Transformer
from lmforge.paths import shared_data
from lmforge.tokenizer import END, USER, train_bpe

BOOK = "pg84_frankenstein.txt.gz"


@pytest.fixture(scope="module")
def tok():
    text = (shared_data() / "tinyshakespeare" / "input.txt").read_text()[:50_000]
    return train_bpe([text, "Continue the sonnet. Shall I compare thee"], 400)


# ----------------------------------------------------------------------------- the task


def test_record_renders_style_and_opening_and_trains_on_the_continuation_only(tok):
    rec = Record(
        {
            "prompt": "Shall I compare thee",
            "continuation": " to a summer's day?",
            "style": "sonnet",
        },
        "poems.jsonl",
        3,
    )
    ex = encode_record(get_task("creative"), tok, rec)
    trained = [i for i, t in zip(ex.ids, ex.trained, strict=True) if t]
    assert trained == [*tok.encode(" to a summer's day?"), tok.specials[END]]
    prompt = tok.decode(ex.ids[: ex.prompt_len])
    assert prompt.startswith(f"{USER}Continue the sonnet.\n\nShall I compare thee")
    assert ex.reference == " to a summer's day?"
    # A free-form style is the instruction itself; no style, just the opening.
    free = Record(
        {"prompt": "Night.", "continuation": "x", "style": "Write it as a ghost story."}, "f", 1
    )
    assert get_task("creative").to_turns(free)[0] == (
        "user",
        "Write it as a ghost story.\n\nNight.",
    )
    plain = Record({"prompt": "Night.", "continuation": "x"}, "f", 1)
    assert get_task("creative").to_turns(plain)[0] == ("user", "Night.")


def test_a_record_without_a_continuation_names_file_and_line(tok, tmp_path):
    from lmforge.finetune.tasks import load_examples

    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "a", "continuation": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(RecordError, match=r"mine\.jsonl:2: .*'continuation'"):
        load_examples(get_task("creative"), tok, [str(path)])


# ----------------------------------------------------------------------------- built-in examples


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """tinyshakespeare and one Gutenberg book (with its header and licence)."""
    folder = tmp_path_factory.mktemp("books")
    (folder / "plays.txt").write_text((shared_data() / "tinyshakespeare" / "input.txt").read_text())
    (folder / BOOK).write_bytes((shared_data() / "gutenberg" / BOOK).read_bytes())
    return [str(folder)]


def test_builtin_examples_are_deterministic_disjoint_and_held_out_of_pretraining(sources):
    a = creative_records(sources, 0.1, "tail")
    assert a == creative_records(sources, 0.1, "tail")
    assert all(len(a[s]) > 10 for s in ("train", "val", "test"))
    assert {r["style"] for r in a["test"]} == {"scene", "story"}
    texts = {s: {r["prompt"] + r["continuation"] for r in a[s]} for s in a}
    assert not texts["train"] & texts["val"] and not texts["val"] & texts["test"]
    # Held-out examples come from the tail that `data.split: tail` keeps out of pre-training.
    book = gzip.decompress((shared_data() / "gutenberg" / BOOK).read_bytes()).decode("utf-8")
    plays = (shared_data() / "tinyshakespeare" / "input.txt").read_text()
    pretrained = " ".join(
        " ".join(clean_region(t[: int(len(t) * 0.9)]).split()) for t in (book, plays)
    )
    held = [" ".join(r["continuation"].split()) for r in a["val"] + a["test"]]
    leaked = [
        c[:60] for c in held if c in pretrained
    ]  # a list: pytest's diff of a 1 MB str is slow
    assert leaked == []
    for r in a["train"] + a["test"]:
        assert "Gutenberg" not in r["prompt"] + r["continuation"]  # boilerplate stripped
        assert r["prompt"].strip() and r["continuation"].strip()


def test_build_creative_writes_jsonl_the_task_reads(sources, tmp_path, tok):
    from lmforge.finetune.tasks import load_examples

    paths = build_creative(tmp_path / "data", sources, 0.1, "tail")
    lines = paths["test"].read_text().splitlines()
    assert [json.loads(x) for x in lines] == creative_records(sources, 0.1, "tail")["test"]
    examples = load_examples(get_task("creative"), tok, [str(paths["val"])], limit=5)
    assert len(examples) == 5 and all(any(e.trained) for e in examples)


# ----------------------------------------------------------------------------- metrics


def test_distinct_n_and_repetition_against_hand_counts():
    from lmforge.eval.creative import distinct_n, repetition_rate

    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran → 4 unique of 6; bigrams: the-cat, cat-sat,
    # the-cat, cat-ran → 3 of 4; trigrams: 2 of 2.
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == 1.0
    assert math.isnan(distinct_n(["a b"], 3))
    # 4-grams of "a b c d a b c d": abcd bcda cdab dabc abcd → one repeat in five.
    assert repetition_rate("a b c d a b c d") == pytest.approx(1 / 5)
    assert repetition_rate("a a a a a a") == pytest.approx(2 / 3)
    assert repetition_rate("too short") is None


def test_self_bleu_against_sacrebleu_directly():
    import sacrebleu

    from lmforge.eval.creative import self_bleu

    texts = [
        "the night was dark and the wind was cold",
        "the night was long and the sea was cold",
        "a bright morning came over the quiet town",
    ]
    direct = [sacrebleu.sentence_bleu(t, [o for o in texts if o is not t]).score for t in texts]
    assert self_bleu(texts) == pytest.approx(sum(direct) / 3, abs=1e-9)
    assert self_bleu(["same words here now"] * 3) == pytest.approx(100.0)
    assert math.isnan(self_bleu(["alone"]))


def test_continuation_nll_equals_scoring_each_item_alone(tok):
    """Batched, right-padded scoring = one unpadded forward per item, continuation tokens only."""
    import torch.nn.functional as F

    from lmforge.eval.creative import CreativeItem, continuation_nll
    from lmforge.finetune.tasks import prompt_ids

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, context_length=64, n_layers=2, d_model=32, n_heads=4
    )
    model = Transformer(cfg).eval()
    pairs = [
        ("To be, or not", " to be"),
        ("Now is the winter", " of our discontent made"),
        ("A", " b"),
    ]
    items = [CreativeItem(prompt_ids(tok, [("user", p)]), p, c) for p, c in pairs]
    res = continuation_nll(model, tok, items, batch_size=3)
    for it, nll, n in zip(items, res.per_text_nll, res.per_text_tokens, strict=True):
        cont = tok.encode(it.continuation)
        ids = torch.tensor([it.prompt_ids + cont])
        with torch.no_grad():
            logp = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
        start = len(it.prompt_ids) - 1
        direct = -sum(float(logp[start + j, t]) for j, t in enumerate(cont))
        assert n == len(cont)
        # float32 logits over a 400-word vocabulary: log-softmax agrees to ~1e-6 per token
        # whatever the batch shape; a few tokens summed stay well inside 1e-4.
        assert nll == pytest.approx(direct, rel=1e-4, abs=1e-4)
    assert res.perplexity == pytest.approx(math.exp(sum(res.per_text_nll) / res.n_tokens))


# ----------------------------------------------------------------------------- the recipe


def test_tiny_creative_writing_run_reports_base_and_finetuned(tmp_path):
    from lmforge.run import run_recipe

    corpus = tmp_path / "corpus"  # two documents whose tails hold a few examples each
    corpus.mkdir()
    plays = (shared_data() / "tinyshakespeare" / "input.txt").read_text()
    for i in range(2):
        (corpus / f"part{i}.txt").write_text(plays[i * 30_000 : (i + 1) * 30_000])
    out = tmp_path / "run"
    overrides = tiny_run_overrides(
        tmp_path,
        corpus,
        out,
        "data.split=tail",
        "model.context_length=128",
        "train.tokens_per_step=512",
        "finetune.tokens_per_step=512",
        "finetune.max_examples=16",
        "eval.limit=4",
        "eval.sample_tokens=12",
        "run.stages=[tokenizer,tokenize,pretrain,finetune,eval,report]",
    )
    run_recipe("creative-writing", overrides)
    ev = json.loads((out / "eval" / "eval.json").read_text())
    by_label = {
        c["checkpoint"].split(":")[0]: {
            r["metric"]: r for r in c["results"] if r["task"] == "creative"
        }
        for c in ev["checkpoints"]
    }
    assert set(by_label) == {"pretrained", "finetuned"}
    for metrics in by_label.values():
        for name in ("perplexity", "distinct_1", "distinct_2", "self_bleu", "repetition_4"):
            assert name in metrics
        assert metrics["perplexity"]["value"] > 1 and metrics["perplexity"]["n"] == 4
    outputs = [
        json.loads(x) for x in (out / "eval" / "eval_outputs.jsonl").read_text().splitlines()
    ]
    assert len(outputs) == 8 and all("hypothesis" in o for o in outputs)
    card = (out / "report.md").read_text()
    assert "Creative writing" in card and "distinct-2" in card and "self-BLEU" in card


def test_documented_records_load_through_the_task(tmp_path):
    """The examples of docs/reference/inputs.md's creative section are valid records."""
    import re
    from pathlib import Path

    from lmforge.finetune.tasks import read_records

    page = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "inputs.md").read_text()
    section = page[page.index("## Creative-writing records") :]
    block = re.findall(r"```json\n(.*?)```", section, re.S)[0]
    (tmp_path / "mine.jsonl").write_text(block)
    turns = [get_task("creative").to_turns(r) for r in read_records(str(tmp_path / "mine.jsonl"))]
    assert turns[0][0][1].startswith("Continue the sonnet.\n\nShall I compare")
    assert turns[1][0][1].startswith("Write it as a ghost story, in the present tense.\n\n")
