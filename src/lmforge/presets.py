"""Named model shapes, from CPU-sized to GPU-scale (stdlib only: the config reads it).

Each preset lists only the `ModelConfig` fields it sets; recipes and the command
line may still override any of them. `vocab_size` is left to the tokenizer
unless the shape is defined by it (GPT-2's 50,257 padded to 50,304 for
matmul-friendly shapes, as nanoGPT does; Llama 3's 128,256).
"""

from __future__ import annotations

from typing import Any

_GPT2: dict[str, Any] = dict(
    norm="layernorm", position="learned", mlp="gelu", bias=True, tie_embeddings=True,
    context_length=1024, vocab_size=50304,
)  # fmt: skip
_LLAMA: dict[str, Any] = dict(
    norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=False,
    rope_theta=500000.0,
)  # fmt: skip

# Llama 3.2's 1B and 3B share all but depth, width and heads.
_LLAMA32: dict[str, Any] = dict(
    _LLAMA,
    n_kv_heads=8,
    d_ff=8192,
    context_length=2048,
    vocab_size=128256,
    tie_embeddings=True,
)
# The baby GPT's shape (char-level: the vocabulary comes from the tokenizer).
_BABY_SHAPE: dict[str, Any] = dict(
    context_length=64, vocab_size=0, n_layers=4, n_heads=4, d_model=128
)
_MASKED: dict[str, Any] = dict(_GPT2, objective="masked")

PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU "baby GPT" for shakespeare_char (char-level; vocab from the tokenizer),
    # as nanoGPT builds it: no biases (its train.py sets bias=False) and exact GELU (nn.GELU).
    "baby-gpt": dict(_GPT2, **_BABY_SHAPE, bias=False, mlp="gelu_exact"),
    # Small shapes that train on two CPU cores in minutes.
    "cpu-tiny": dict(n_layers=2, d_model=128, n_heads=4, context_length=128),
    "cpu-small": dict(n_layers=4, d_model=256, n_heads=4, context_length=256),
    "cpu-llama-small": dict(
        _LLAMA,
        n_layers=4,
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        context_length=256,
        rope_theta=10000.0,
    ),
    # GPT-2 family (Radford et al. 2019).
    "gpt2-124m": dict(_GPT2, n_layers=12, n_heads=12, d_model=768),
    "gpt2-350m": dict(_GPT2, n_layers=24, n_heads=16, d_model=1024),
    "gpt2-774m": dict(_GPT2, n_layers=36, n_heads=20, d_model=1280),
    "gpt2-1.5b": dict(_GPT2, n_layers=48, n_heads=25, d_model=1600),
    # Llama-style (Llama 3.2 1B/3B, Llama 3 8B shapes).
    "llama-1b": dict(_LLAMA32, n_layers=16, d_model=2048, n_heads=32),
    "llama-3b": dict(_LLAMA32, n_layers=28, d_model=3072, n_heads=24),
    "llama-8b": dict(
        _LLAMA,
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        context_length=2048,
        vocab_size=128256,
    ),
    # Llama-style 60M (the small Llama of Zhao et al. 2024, GaLore; Llama 2's 32k vocabulary).
    "llama-60m": dict(
        _LLAMA,
        n_layers=8,
        d_model=512,
        n_heads=8,
        d_ff=1376,
        context_length=1024,
        vocab_size=32000,
        rope_theta=10000.0,
    ),
    # Encoder-only masked LMs: bidirectional attention, BERT's 80/10/10 objective
    # (`lmforge.masked`). bert-base is BERT-base's shape (Devlin et al. 2019): 12 layers,
    # width 768, 12 heads, 512 positions, 30,522-token WordPiece vocabulary.
    # RoPE, not learned positions: on char-level tinyshakespeare a learned-position masked
    # LM sat at the unigram plateau for 350+ steps, a RoPE one left it within 100 (docs/plan.md).
    "cpu-masked": dict(_MASKED, position="rope", **_BABY_SHAPE),
    "bert-base": dict(
        _MASKED, n_layers=12, n_heads=12, d_model=768, context_length=512, vocab_size=30522
    ),
}
