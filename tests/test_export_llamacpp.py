"""A real llama.cpp (llama-cpp-python) runs our GGUF files: same tokens, greedy text and logits.

Slow and optional: `pip install -c constraints.txt llama-cpp-python` compiles
llama.cpp from source (≈ 13 minutes on two cores), so CI does not install it and
these tests skip without it. `benchmarks/gguf_llamacpp.py` runs the same
comparison on trained models and reports the figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.export.gguf import export_gguf, open_llama_cpp, state_from_gguf
from lmforge.model import Transformer
from lmforge.model.generate import generate
from lmforge.tokenizer import train_bpe

pytestmark = pytest.mark.slow

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
    return pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (pip install -c constraints.txt "
        "llama-cpp-python; it compiles llama.cpp, ~13 min)",
    )


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


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
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
            if dtype == "f32":
                assert diff < F32_TOLERANCE[variant]
            else:
                assert diff < 1.5 * np.abs(ours - fp32).max()
            if dtype == "f32":  # greedy decoding, token by token through llama.cpp's KV cache
                prompt = ids[:8]
                llm.reset()
                llm.eval(prompt)
                got = []
                for _ in range(16):
                    got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                    llm.eval([got[-1]])
                ref = generate(model, prompt, 16, temperature=0)[0, 8:].tolist()
                assert got == ref
    finally:
        llm.close()
