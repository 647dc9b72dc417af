"""Multiple-choice scoring: the cached, batched path equals one forward pass per choice."""

import json

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.eval.multiple_choice import (
    MCItem,
    MCResult,
    encode_request,
    load_hellaswag,
    load_mc_jsonl,
    score_items,
    score_items_reference,
)
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe


@pytest.fixture(scope="module")
def items(shared):
    return load_hellaswag(shared / "hellaswag", limit=48)


@pytest.fixture(scope="module")
def tok(shared):
    texts = [
        f"{it.context} {' '.join(it.choices)}"
        for it in load_hellaswag(shared / "hellaswag", limit=600)
    ]
    return train_bpe(texts, 512)


def model_for(tok, ctx=256, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        context_length=ctx,
        n_layers=2,
        d_model=48,
        n_heads=4,
        bias=True,
        **kw,
    )
    return Transformer(cfg).eval()


def test_hellaswag_loader_matches_file(items, shared):
    assert len(items) == 48
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. he"
    assert items[0].label == 3 and len(items[0].choices) == 4


@pytest.mark.parametrize("variant", [dict(), dict(norm="rmsnorm", position="rope", mlp="swiglu")])
def test_batched_cached_scores_equal_reference(tok, items, variant):
    model = model_for(tok, **variant)
    fast = score_items(model, tok, items, max_batch_tokens=2048)
    slow = score_items_reference(model, tok, items)
    for a, b in zip(fast.loglikelihoods, slow.loglikelihoods, strict=True):
        assert a == pytest.approx(b, abs=2e-4)
    assert fast.correct() == slow.correct()
    assert fast.correct("chars") == slow.correct("chars")


def test_truncation_to_context_matches_reference(tok, items):
    model = model_for(tok, ctx=80)  # shorter than many context + ending pairs: left truncation
    fast = score_items(model, tok, items[:24])
    slow = score_items_reference(model, tok, items[:24])
    for a, b in zip(fast.loglikelihoods, slow.loglikelihoods, strict=True):
        assert a == pytest.approx(b, abs=2e-4)


def test_encode_request_moves_trailing_space(tok):
    ctx, cont = encode_request(tok, "The cat ", "sat down.")
    assert ctx == tok.encode("The cat")
    assert cont == tok.encode("The cat sat down.")[len(ctx) :]
    ctx, cont = encode_request(tok, "", "sat")
    assert ctx == [tok.eot_id] and cont == tok.encode("sat")


def test_normalised_accuracy_divides_by_length():
    res = MCResult([[-10.0, -6.0]], [0], [["a long ending", "é"]])
    assert res.predictions("none") == [1]
    assert res.predictions("chars") == [0]  # -10/13 > -6/1
    assert res.predictions("bytes") == [0]  # -10/13 > -6/2
    res = MCResult([[-4.0, -3.0]], [1], [["abcd", "éé"]])
    assert res.predictions("chars") == [0]  # -4/4 > -3/2
    assert res.predictions("bytes") == [1]  # -4/4 < -3/4
    assert res.accuracy("bytes") == 1.0


def test_generic_jsonl_errors_name_file_line_and_field(tmp_path):
    good = {"context": "Q: 2+2?", "choices": ["4", "5"], "label": 0}
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "label": 2}) + "\n")
    with pytest.raises(ValueError, match=r"task.jsonl:3: field 'label' = 2"):
        load_mc_jsonl(path)
    path.write_text(json.dumps({**good, "choices": "4"}) + "\n")
    with pytest.raises(ValueError, match=r"task.jsonl:1: field 'choices'"):
        load_mc_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"task.jsonl:1: malformed JSON"):
        load_mc_jsonl(path)
    path.write_text(json.dumps(good) + "\n")
    assert load_mc_jsonl(path) == [MCItem("Q: 2+2?", ["4", "5"], 0, "1")]


def test_masked_model_is_refused(tok, items):
    with pytest.raises(ValueError, match="causal"):
        score_items(model_for(tok, objective="masked"), tok, items[:2])
