"""Export to transformers: HF loads our folder with no custom code and computes what we compute."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.export.hf import ExportError, export_hf, hf_architecture, load_hf_model  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.model.generate import generate  # noqa: E402
from lmforge.model.transformer import derived_d_ff  # noqa: E402
from lmforge.tokenizer import CHAT_TEMPLATE, train_bpe, train_char  # noqa: E402

GPT2 = dict(norm="layernorm", position="learned", mlp="gelu")
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu")
VARIANTS = {
    "gpt2": (dict(GPT2, bias=True), "gpt2"),
    "gpt2-nobias-untied": (dict(GPT2, tie_embeddings=False, norm_eps=1e-6), "gpt2"),
    "gpt2-qkv-bias": (dict(GPT2, qkv_bias=True), "gpt2"),
    # nanoGPT's baby GPT: no biases, exact GELU (HF activation_function "gelu")
    "gpt2-exact-gelu": (dict(GPT2, mlp="gelu_exact"), "gpt2"),
    "llama-gqa-untied": (
        dict(LLAMA, n_kv_heads=2, tie_embeddings=False, rope_theta=500.0),
        "llama",
    ),
    "llama-bias-tied": (dict(LLAMA, bias=True), "llama"),
    "qwen2": (dict(LLAMA, qkv_bias=True, n_kv_heads=1), "qwen2"),
    "qwen3": (dict(LLAMA, qk_norm=True, n_kv_heads=2, tie_embeddings=False), "qwen3"),
}
SAMPLES = [
    "def greet(name):\n    return f'Hello, {name}!'\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "émigré naïve — ünïcödé ✓ 😀 <|endoftext|> tabs\tand  spaces",
    "<|user|>hi<|end|><|assistant|>",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(SAMPLES * 20, 400)


def make_model(variant: str, vocab: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab,
        context_length=48,
        n_layers=2,
        d_model=32,
        n_heads=4,
        **VARIANTS[variant][0],
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # biases start at 0 and norms at 1: perturb them so they count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_logits_equal_ours(variant, tok, tmp_path):
    model = make_model(variant, tok.vocab_size)
    assert hf_architecture(model.cfg) == VARIANTS[variant][1]
    export_hf(model, tok, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__.lower().startswith(VARIANTS[variant][1])
    ids = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-untied"])
def test_hf_greedy_generate_equals_ours(variant, tok, tmp_path):
    model = make_model(variant, tok.vocab_size)
    export_hf(model, tok, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for text in SAMPLES[:2]:
        prompt = tok.encode(text)[:16]
        ours = generate(model, prompt, 24, temperature=0, stop_ids=[tok.eot_id])[0].tolist()
        theirs = hf.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, num_beams=1
        )[0].tolist()
        # HF stops at eos; ours keeps emitting the stop id until the row ends.
        assert ours[: len(theirs)] == theirs
        assert all(t == tok.eot_id for t in ours[len(theirs) :])


def test_hf_tokenizer_gives_our_ids_and_chat_template(tok, tmp_path):
    export_hf(make_model("gpt2", tok.vocab_size), tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eot_id, tok.pad_id)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
    assert hf_tok.chat_template == CHAT_TEMPLATE


def test_char_tokenizer_exports(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = train_char([text])
    export_hf(make_model("gpt2", tok.vocab_size), tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok(text + "<|endoftext|>")["input_ids"] == [*tok.encode(text), tok.eot_id]
    assert hf_tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_then_import_gives_identical_weights(variant, tok, tmp_path):
    model = make_model(variant, tok.vocab_size)
    export_hf(model, tok, tmp_path)
    back, back_tok, cfg = load_hf_model(tmp_path)
    assert asdict(cfg.model) == asdict(replace(model.cfg, d_ff=derived_d_ff(model.cfg)))
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert back_tok.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(GPT2, qk_norm=True), "qk_norm"),
        (dict(GPT2, n_kv_heads=1), "n_kv_heads"),
        (dict(norm="rmsnorm", position="learned", mlp="gelu"), "norm=rmsnorm, position=learned"),
        (dict(norm="layernorm", position="rope", mlp="swiglu"), "Change model.norm"),
        (dict(LLAMA, objective="masked"), "objective"),
        (dict(LLAMA, qk_norm=True, bias=True), "bias"),
    ],
)
def test_export_refuses_what_no_architecture_expresses(fields, message, tok, tmp_path):
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, context_length=16, n_layers=1, d_model=16, n_heads=2, **fields
    )
    with pytest.raises(ExportError, match=message):
        export_hf(Transformer(cfg), tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()
