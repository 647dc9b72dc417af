"""Fine-tuning data: chat template, loss masks, record validation, packing without cross-talk."""

import json

import jinja2
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.finetune.code_docstring import function_examples
from lmforge.finetune.data import IGNORE, PackedExamples, PackedLM, doc_ids_from_eot
from lmforge.finetune.tasks import (
    Record,
    RecordError,
    encode_record,
    get_task,
    load_examples,
    read_records,
    render_turns,
)
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import CHAT_TEMPLATE, END, train_bpe

TEXTS = [
    "Translate the sentence into German. A dog runs across the park.",
    "Ein Hund läuft durch den Park. Summaries are short. def f(x): return x + 1",
    "Give three colours. Red, green and blue are colours of light.",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS * 20, 400)


def test_rendering_equals_the_jinja_chat_template(tok):
    """Our turn rendering is the tokenizer's CHAT_TEMPLATE (rendered by jinja2 as HF does)."""
    turns = [("system", "Be brief."), ("user", "Give three colours."), ("assistant", "Red, green")]
    messages = [{"role": r, "content": c} for r, c in turns]
    reference = jinja2.Template(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=False
    )
    assert render_turns(turns) == reference
    # Inserting role tokens by id gives the same ids as parsing the rendered text.
    ex = encode_record(get_task("chat"), tok, Record({"messages": messages}, "x.jsonl", 1))
    assert ex.ids[:-1] == tok.encode(reference)


def test_loss_is_masked_to_the_assistant_response(tok):
    """Only the response's tokens and its closing <|end|> are targets; the batch's y agrees."""
    rec = Record(
        {"instruction": "Give three colours.", "input": "", "output": "Red, green and blue"},
        "data.jsonl",
        1,
    )
    ex = encode_record(get_task("instruction"), tok, rec)
    response = [*tok.encode("Red, green and blue"), tok.specials[END]]
    trained_ids = [i for i, t in zip(ex.ids, ex.trained, strict=True) if t]
    assert trained_ids == response
    # The trained tokens are exactly the tail before the end-of-text token.
    n = len(response)
    assert ex.trained[-n - 1 : -1] == [True] * n and not any(ex.trained[: -n - 1])

    packed = PackedExamples([ex, ex], seq_len=2 * len(ex.ids), pad_id=tok.pad_id, seed=0)
    x, y = packed.batch(0, 0, 1, 1)
    targets = y[0][y[0] != IGNORE].tolist()
    assert targets == response + response
    # Each target is the next input token: masked positions are prompt, roles, separators, pad.
    for t in range(x.size(1) - 1):
        if y[0, t] != IGNORE:
            assert y[0, t] == x[0, t + 1]

    # The loss the model computes equals the mean CE over response positions only.
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, context_length=64, n_layers=1, d_model=32, n_heads=2)
    )
    logits = model(x)
    keep = y[0] != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[0][keep], y[0][keep])
    torch.testing.assert_close(model(x, y), manual)


def test_missing_field_error_names_file_line_and_field(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"instruction": "a", "output": "b"})
        + "\n"
        + json.dumps({"instruction": "c"})
        + "\n"
    )
    with pytest.raises(RecordError, match=r"train\.jsonl:2: record has no field 'output'"):
        load_examples(get_task("instruction"), tok, [str(path)])

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("source,target\nA dog.,Ein Hund.\nA cat.,\n")
    with pytest.raises(RecordError, match=r"pairs\.csv:2: field 'target' is empty"):
        load_examples(get_task("translation"), tok, [str(csv_path)])

    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(RecordError, match=r"chat\.jsonl:1: messages\[0\]\.role = 'robot'"):
        load_examples(get_task("chat"), tok, [str(bad)])


def test_readers_agree_across_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"source": "A dog.", "target": "Ein Hund."},
        {"source": "A cat.", "target": "Eine Katze."},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.csv").write_text(
        "source,target\n" + "".join(f"{r['source']},{r['target']}\n" for r in rows)
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "par.en").write_text("".join(r["source"] + "\n" for r in rows))
    (tmp_path / "par.de").write_text("".join(r["target"] + "\n" for r in rows))
    for spec in ("p.jsonl", "p.csv", "p.parquet", "par"):
        got = [r.data for r in read_records(str(tmp_path / spec))]
        assert got == rows, spec


def test_multi30k_and_scitldr_records(shared, tok):
    recs = list(read_records(str(shared / "multi30k" / "test_2016_flickr"), "en", "de"))
    assert len(recs) == 1000 and recs[0].data["source"] and recs[0].data["target"]
    ex = load_examples(
        get_task("summarization"), tok, [str(shared / "scitldr" / "test.jsonl")], limit=3
    )
    assert len(ex) == 3 and ex[0].reference


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_rows_compute_what_each_example_would_alone(position):
    """Block-diagonal attention + position restarts: packing changes no logit."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50, context_length=32, n_layers=2, d_model=32, n_heads=4, position=position
    )
    model = Transformer(cfg).eval()
    eot = 0
    a, b, c = [5, 6, 7, 8, eot], [9, 10, 11, eot], [12, 13, 14, 15, 16, eot]
    row = torch.tensor([a + b + c])
    packed = PackedLM(model, eot)(row)
    start = 0
    for ex in (a, b, c):
        alone = model(torch.tensor([ex]))
        torch.testing.assert_close(packed[:, start : start + len(ex)], alone, atol=1e-5, rtol=1e-5)
        start += len(ex)
    # Without the mask the later examples would differ (the test can fail).
    plain = model(row)
    assert not torch.allclose(plain[:, len(a) :], packed[:, len(a) :], atol=1e-3)
    assert doc_ids_from_eot(row, eot).tolist() == [[0] * 5 + [1] * 4 + [2] * 6]


def test_batches_are_a_function_of_step_and_rank(tok):
    exs = [
        encode_record(
            get_task("translation"), tok, Record({"source": f"A {i}", "target": f"B {i}"}, "f", i)
        )
        for i in range(1, 40)
    ]
    one = PackedExamples(exs, 32, tok.pad_id, seed=3)
    two = PackedExamples(exs, 32, tok.pad_id, seed=3)
    for step in (0, 5, 17):
        for rank in (0, 1):
            x1, y1 = one.batch(step, 1, 2, 2, rank, 2)
            x2, y2 = two.batch(step, 1, 2, 2, rank, 2)
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # Every example lands in exactly one row (nothing dropped by packing).
    assert int((one.ids == tok.eot_id).sum()) == len(exs)


def test_code_docstring_examples_strip_the_docstring():
    source = '''
def add(a, b):
    """Return the sum of a and b.

    More words here.
    """
    return a + b


def bare():
    """Only a docstring."""
'''
    (ex,) = function_examples(source)
    assert ex["docstring"] == "Return the sum of a and b."
    assert ex["code"] == "def add(a, b):\n    return a + b"


def test_truncation_shortens_the_prompt_and_keeps_the_response(tok):
    rec = Record({"source": "word " * 60, "target": "Short summary."}, "f.jsonl", 1)
    ex = encode_record(get_task("summarization"), tok, rec)
    packed = PackedExamples([ex], seq_len=40, pad_id=tok.pad_id, seed=0)
    assert packed.truncated == 1
    row = packed.ids[0].tolist()
    response = [*tok.encode("Short summary."), tok.specials[END]]
    assert [
        t for t, lab in zip(row, packed.labels[0].tolist(), strict=True) if lab != IGNORE
    ] == response
    assert row[0] == ex.ids[0] and row[-1] == tok.eot_id
