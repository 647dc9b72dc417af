"""Sampling options against HF transformers' logits processors and `generate`; stop strings;
seeds; per-row independence of a batch."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.model.generate import StreamDecoder, complete, decode_text, generate
from lmforge.model.sampling import SamplingParams, process_logits, seen_mask
from lmforge.tokenizer import train_char

FP32_EPS = torch.finfo(torch.float32).eps

SETTINGS = {
    "repetition": dict(repetition_penalty=1.3),
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=17),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.05),
    "all": dict(repetition_penalty=1.2, temperature=1.3, top_k=200, top_p=0.9, min_p=0.02),
    "penalty_below_one": dict(repetition_penalty=0.8, top_p=0.95),
}


def hf_processors(s: dict):
    """HF's processors for the settings `s`, in the order HF `generate` builds them."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if "repetition_penalty" in s:
        procs.append(RepetitionPenaltyLogitsProcessor(s["repetition_penalty"]))
    procs.append(TemperatureLogitsWarper(s.get("temperature", 1.0)))
    if "top_k" in s:
        procs.append(TopKLogitsWarper(s["top_k"]))
    if "top_p" in s:
        procs.append(TopPLogitsWarper(s["top_p"]))
    if "min_p" in s:
        procs.append(MinPLogitsWarper(s["min_p"]))
    return procs


@pytest.mark.parametrize("name", SETTINGS)
def test_filtered_distribution_equals_hf_logits_processors(name):
    pytest.importorskip("transformers")
    s = SETTINGS[name]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g) * 3
    ids = torch.randint(0, 500, (6, 40), generator=g)  # prompt + output so far
    theirs = hf_processors(s)(ids, logits.clone())
    ours = process_logits(logits, SamplingParams(**s), seen_mask(ids, 500))
    kept = torch.isfinite(ours)
    assert torch.equal(kept, torch.isfinite(theirs))  # the same tokens survive, exactly
    assert kept.sum(-1).min() >= 1 and not torch.equal(ours, logits)  # it did something
    # The same elementwise ops on the same fp32 values: at most a rounding or two apart,
    # relative to the value (|logits| ≲ 15 after the scaling here).
    assert torch.allclose(ours[kept], theirs[kept], rtol=4 * FP32_EPS, atol=0)
    assert torch.allclose(ours.softmax(-1), theirs.softmax(-1), rtol=0, atol=16 * FP32_EPS)


def test_bad_values_name_the_field():
    for field, value in [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 1.2),
        ("repetition_penalty", 0.0),
        ("top_k", -1),
        ("max_new_tokens", 0),
    ]:
        with pytest.raises(ValueError, match=f"{field} = "):
            SamplingParams(**{field: value})


def make_model(vocab: int, context: int = 64) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab, context_length=context, n_layers=2, d_model=32, n_heads=4, init_std=0.2
    )
    return Transformer(cfg).eval()


def test_seed_reproduces_and_leaves_the_global_rng_alone():
    model = make_model(50)
    prompt = [5, 6, 7]
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, min_p=0.01, seed=11)
    state = torch.get_rng_state()
    a = generate(model, prompt, params=p)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, generate(model, prompt, params=p))
    assert not torch.equal(
        a, generate(model, prompt, params=SamplingParams(**{**vars(p), "seed": 12}))
    )


def test_batch_rows_do_not_affect_each_other():
    """Row r of a batch, seeded s + r, equals that prompt alone seeded s + r; one row
    ending at its stop id does not change the others."""
    model = make_model(50)
    prompts = torch.tensor([[5, 6, 7], [9, 9, 9], [20, 3, 4]])
    p = SamplingParams(max_new_tokens=16, temperature=0.9, repetition_penalty=1.2, seed=4)
    free = generate(model, prompts, params=p)
    stop = int(free[1, 3 + 2])  # row 1 stops at its third new token
    both = generate(model, prompts, params=p, stop_ids=[stop])
    for r in range(3):
        alone = generate(model, prompts[r].tolist(), params=p, seed=4 + r)[0, 3:].tolist()
        row = both[r, 3:].tolist()
        end = row.index(stop) if stop in row else len(row)
        assert row[:end] == alone[: alone.index(stop) if stop in alone else len(alone)]
        assert all(t == stop for t in row[end:])  # an ended row only repeats its stop id
    assert both[1, 3:].tolist().index(stop) <= 2


def test_stop_string_across_token_boundaries_is_cut_and_never_streamed():
    tok = train_char(["abcdefghijklmnopqrstuvwxyz .,\n"])
    model = make_model(tok.vocab_size)
    prompt = tok.encode("the cat")
    free = complete(model, tok, [prompt], SamplingParams(max_new_tokens=40, temperature=0))[0]
    text = free.text
    assert free.finish_reason == "length" and len(text) >= 10
    stop = text[6:9]  # three characters: three tokens of the character tokenizer
    pieces: list[str] = []
    params = SamplingParams(max_new_tokens=40, temperature=0, stop=("zzzz", stop))
    got = complete(model, tok, [prompt], params, lambda _r, s: pieces.append(s))[0]
    assert got.finish_reason == "stop"
    assert got.text == text[: text.index(stop)]
    assert "".join(pieces) == got.text  # the stop string never reached the stream
    # Generation ended with the token that completed the stop string.
    assert decode_text(tok, got.ids) == text[: text.index(stop) + len(stop)]


def test_stream_decoder_holds_back_a_possible_stop_string():
    tok = train_char(["abcx<>"])
    d = StreamDecoder(tok.decode, skip_ids=list(tok.specials.values()), stops=["<b>"])
    out = [d.push(t) for t in tok.encode("a<")] + [d.push(tok.eot_id)]
    assert out == ["a", "", ""]  # "<" may start "<b>": held back; end-of-text is skipped
    assert d.push(tok.encode("c")[0]) == "<c" and not d.stopped
    assert [d.push(t) for t in tok.encode("<b>x")] == ["", "", "", ""] and d.stopped
    assert d.text == "a<c" and d.flush() == ""


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.5])
def test_greedy_with_stop_id_equals_hf_generate(repetition_penalty, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf import export_hf

    tok = train_char(["abcdefghijklmnopqrstuvwxyz .,\n"])
    model = make_model(tok.vocab_size + 40)
    export_hf(model, tok, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(
        len(tok.specials), model.cfg.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1)
    )
    p = SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=repetition_penalty)
    free = generate(model, prompt, params=p)
    eos = int(free[0, 8 + 5])  # row 0 ends early; the others whenever they meet it
    ours = generate(model, prompt, params=p, stop_ids=[eos])
    with torch.no_grad():
        theirs = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=30,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos,
            pad_token_id=tok.pad_id,
        )
    assert ours.shape == theirs.shape
    for r in range(3):
        row, ref = ours[r, 8:].tolist(), theirs[r, 8:].tolist()
        end = row.index(eos) + 1 if eos in row else len(row)
        assert row[:end] == ref[:end]  # HF pads an ended row with pad_token_id, we repeat eos


def test_command_line_flags_build_the_params():
    import argparse

    from lmforge.model.sampling import add_sampling_arguments, sampling_from_args

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, SamplingParams(temperature=0.7, seed=0))
    args = parser.parse_args(
        ["--min-p", "0.1", "--repetition-penalty", "1.2", "--stop", "\\n\\n", "--stop", "THE END"]
    )
    p = sampling_from_args(args)
    assert (p.temperature, p.seed, p.min_p, p.repetition_penalty) == (0.7, 0, 0.1, 1.2)
    assert p.stop == ("\n\n", "THE END")  # a typed \n is a newline
    with pytest.raises(ValueError, match=r"--repetition-penalty 0\.0 must be > 0"):
        sampling_from_args(parser.parse_args(["--repetition-penalty", "0"]))
