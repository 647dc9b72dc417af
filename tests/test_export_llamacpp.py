"""A real llama.cpp (llama-cpp-python) runs our GGUF files: same tokens, greedy text and logits,
for every GGUF type lmforge writes.

Needs the `interop` extra: `pip install -c constraints.txt -e ".[interop]"` compiles
llama.cpp from source (≈ 13 minutes on two cores; pip caches the wheel). Without it
these tests skip with that reason; `.ci/run` installs it and sets
LMFORGE_REQUIRE_INTEROP=1, which turns the skip into a failure.
`benchmarks/gguf_llamacpp.py` runs the same comparison on trained models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import require_interop

from lmforge.config import ModelConfig
from lmforge.export.gguf import GGUF_DTYPES, export_gguf, open_llama_cpp, state_from_gguf
from lmforge.model import Transformer
from lmforge.model.generate import generate
from lmforge.tokenizer import train_bpe

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu")
VARIANTS = {
    "gpt2": dict(bias=True),
    "llama-gqa": dict(LLAMA, n_kv_heads=2, tie_embeddings=False),
    "qwen2": dict(LLAMA, qkv_bias=True),
    "qwen3": dict(LLAMA, qk_norm=True),
}
# llama.cpp against our model run on the very weights stored in the file. In f32 only
# the order of summation differs — except that ggml evaluates GELU through a float16
# lookup table (GGML_GELU_FP16), which costs GPT-2 ~1e-3. With f16/bf16/Q8_0 weights
# ggml also rounds the activations it multiplies them with to the same format, so
# its extra error is of the size of the weight rounding itself: we allow 1.5× our
# own stored-vs-fp32 difference.
F32_TOLERANCE = {"gpt2": 5e-3, "llama-gqa": 1e-4, "qwen2": 1e-4, "qwen3": 1e-4}
TEXT = [
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
]


@pytest.fixture(scope="module")
def llama_cpp():
    return require_interop("llama_cpp", "llama-cpp-python")


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT * 30, 400)


def make(variant: str, vocab: int) -> Transformer:
    torch.manual_seed(0)
    # A large init spreads the logits, so greedy choices are not near-ties.
    cfg = ModelConfig(
        vocab_size=vocab,
        context_length=64,
        n_layers=2,
        d_model=64,
        n_heads=4,
        init_std=0.2,
        **VARIANTS[variant],
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("dtype", GGUF_DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_llamacpp_matches_ours(llama_cpp, variant, dtype, tok, tmp_path):
    model = make(variant, tok.vocab_size)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype)
    stored = Transformer(model.cfg).eval()
    stored.load_state_dict(state_from_gguf(path, model), strict=False)
    llm = open_llama_cpp(path, n_ctx=64)
    try:
        for text in TEXT:
            ids = tok.encode(text)[:40]
            assert list(llm.tokenize(text.encode(), add_bos=False, special=True)) == tok.encode(
                text
            )
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[: len(ids)])
            with torch.no_grad():
                ours = stored(torch.tensor([ids]))[0].numpy()
                fp32 = model(torch.tensor([ids]))[0].numpy()
            diff = np.abs(theirs - ours).max()
            bound = F32_TOLERANCE[variant] if dtype == "f32" else 1.5 * np.abs(ours - fp32).max()
            assert diff < bound
            # Greedy decoding, token by token through llama.cpp's KV cache.
            prompt = ids[:8]
            llm.reset()
            llm.eval(prompt)
            got = []
            for _ in range(16):
                got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([got[-1]])
            if dtype == "f32":
                assert got == generate(model, prompt, 16, temperature=0)[0, 8:].tolist()
            else:
                assert_greedy_within(stored, prompt, got, bound)
    finally:
        llm.close()


def assert_greedy_within(model: Transformer, prompt: list[int], got: list[int], bound: float):
    """llama.cpp's greedy tokens, teacher-forced through our model on the same stored
    weights: wherever its choice differs from our argmax, the two candidates must be
    within twice the logit bound of each other in our logits (a near-tie that the
    proven logit agreement cannot decide), never further apart."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + got]))[0, len(prompt) - 1 : -1]
    for step, (row, token) in enumerate(zip(logits, got, strict=True)):
        gap = float(row.max() - row[token])
        assert gap <= 2 * bound, (step, token, int(row.argmax()), gap, bound)
