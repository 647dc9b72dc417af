"""GGUF export: the file reads back with gguf's own reader, every tensor equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.export.gguf import (  # noqa: E402
    export_gguf,
    halve_rope_rows,
    interleave_rope_rows,
    read_gguf_tensors,
    state_from_gguf,
)
from lmforge.export.hf import ExportError  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.tokenizer import CHAT_TEMPLATE, train_bpe, train_char  # noqa: E402

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu")
VARIANTS = {
    "gpt2": (dict(bias=True), "gpt2"),
    "gpt2-nobias": (dict(tie_embeddings=False), "gpt2"),
    "llama": (dict(LLAMA, n_kv_heads=2, tie_embeddings=False), "llama"),
    "llama-bias": (dict(LLAMA, bias=True), "llama"),
    "qwen2": (dict(LLAMA, qkv_bias=True), "qwen2"),
    "qwen3": (dict(LLAMA, qk_norm=True, n_kv_heads=1), "qwen3"),
}


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["def add(a, b):\n    return a + b\n", "Hello, world! Ünïcödé."] * 30, 300)


def make(variant: str, vocab: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab + 5,  # padded embedding rows beyond the tokenizer
        context_length=32,
        n_layers=2,
        d_model=64,
        n_heads=4,
        **VARIANTS[variant][0],
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours_from_gguf(
    t: dict[str, np.ndarray], cfg: ModelConfig, arch: str
) -> dict[str, torch.Tensor]:
    """Rebuild our state dict from llama.cpp names (written independently of the exporter)."""
    g = {k: torch.from_numpy(v) for k, v in t.items()}
    out = {"tok_emb.weight": g["token_embd.weight"], "norm.weight": g["output_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = g["output.weight"]
    kv = cfg.n_kv_heads or cfg.n_heads
    for i in range(cfg.n_layers):
        a, b = f"blocks.{i}.", f"blk.{i}."
        out[a + "attn_norm.weight"] = g[b + "attn_norm.weight"]
        out[a + "mlp_norm.weight"] = g[b + "ffn_norm.weight"]
        out[a + "attn.proj.weight"] = g[b + "attn_output.weight"]
        out[a + "mlp.down.weight"] = g[b + "ffn_down.weight"]
        if arch == "gpt2":
            out["pos_emb.weight"] = g["position_embd.weight"]
            out[a + "attn.qkv.weight"] = g[b + "attn_qkv.weight"]
            out[a + "mlp.up.weight"] = g[b + "ffn_up.weight"]
            if cfg.bias:
                for ours, theirs in [
                    ("attn_norm", "attn_norm"),
                    ("mlp_norm", "ffn_norm"),
                    ("attn.proj", "attn_output"),
                    ("mlp.down", "ffn_down"),
                    ("attn.qkv", "attn_qkv"),
                    ("mlp.up", "ffn_up"),
                ]:
                    out[f"{a}{ours}.bias"] = g[f"{b}{theirs}.bias"]
                out["norm.bias"] = g["output_norm.bias"]
            else:  # llama.cpp's gpt2 needs biases: they must be written as zeros
                assert not g[b + "attn_qkv.bias"].any() and not g["output_norm.bias"].any()
            continue
        if cfg.bias:
            out[a + "attn.proj.bias"] = g[b + "attn_output.bias"]
            out[a + "mlp.down.bias"] = g[b + "ffn_down.bias"]
            out[a + "mlp.up.bias"] = torch.cat([g[b + "ffn_gate.bias"], g[b + "ffn_up.bias"]])
        for s in ["weight"] + (["bias"] if cfg.qkv_bias or cfg.bias else []):
            q, k, v = g[f"{b}attn_q.{s}"], g[f"{b}attn_k.{s}"], g[f"{b}attn_v.{s}"]
            if arch == "llama":
                q, k = halve_rope_rows(q, cfg.n_heads), halve_rope_rows(k, kv)
            out[f"{a}attn.qkv.{s}"] = torch.cat([q, k, v])
        out[a + "mlp.up.weight"] = torch.cat([g[b + "ffn_gate.weight"], g[b + "ffn_up.weight"]])
        if cfg.qk_norm:
            out[a + "attn.q_norm.weight"] = g[b + "attn_q_norm.weight"]
            out[a + "attn.k_norm.weight"] = g[b + "attn_k_norm.weight"]
    return out


def test_rope_row_interleaving_pairs_i_with_i_plus_half():
    w = torch.arange(2 * 8).float()[:, None]  # 2 heads of dim 8: rows 0..15
    got = interleave_rope_rows(w, 2)[:, 0].tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(halve_rope_rows(interleave_rope_rows(w, 2), 2), w)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_f32_reads_back_every_tensor_equal(variant, tok, tmp_path):
    model = make(variant, tok.vocab_size)
    path = export_gguf(model, tok, tmp_path, "f32")
    reader = gguf.GGUFReader(str(path))
    arch = VARIANTS[variant][1]
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.block_count"].contents() == 2
    back = ours_from_gguf(read_gguf_tensors(path), model.cfg, arch)
    state = model.state_dict()
    expected = {k for k in state if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
    assert set(back) == expected
    for key in expected:
        assert torch.equal(back[key], state[key]), key
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    # The library's reader gives back the same state (used to run llama.cpp's exact weights).
    loaded = state_from_gguf(path, model)
    assert loaded.keys() == back.keys()
    assert all(torch.equal(loaded[k], back[k]) for k in loaded)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_gguf_low_precision_tensors(dtype, tok, tmp_path):
    model = make("llama", tok.vocab_size)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert types["blk.0.ffn_down.weight"].name == want
    assert types["blk.0.attn_norm.weight"].name == "F32"  # 1-D tensors stay f32
    back = ours_from_gguf(read_gguf_tensors(path), model.cfg, "llama")
    for key, w in model.state_dict().items():
        if w.dim() == 1:
            assert torch.equal(back[key], w)
        elif dtype in ("f16", "bf16"):
            torch_dtype = torch.float16 if dtype == "f16" else torch.bfloat16
            assert torch.equal(back[key], w.to(torch_dtype).float()), key
        else:  # Q8_0: per block of 32, error within half a step of scale max|x|/127 (f16 scale)
            blocks, err = w.reshape(-1, 32), (back[key] - w).reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            assert bool((err.abs() <= 0.6 * step + 1e-7).all()), key


# The worst error of each block format, per block of 32 values, from its definition
# (ggml-quants.c): Q4_0/Q5_0 scale by d = max/-8 (-16) and store round(x/d) in 4 (5)
# bits, so a value of the other sign can clip by a whole step |d| = amax/8 (amax/16);
# Q4_1/Q5_1 store min and d = (max - min)/15 (31), rounding to within d/2. The f16
# scale and minimum add relative rounding of 2^-11 each: the 5% and amax·2^-10 margins.
BLOCK_ERROR = {
    "q4_0": lambda amax, rng: amax / 8,
    "q5_0": lambda amax, rng: amax / 16,
    "q4_1": lambda amax, rng: rng / 15 / 2,
    "q5_1": lambda amax, rng: rng / 31 / 2,
}


@pytest.mark.parametrize("dtype", sorted(BLOCK_ERROR))
def test_gguf_4_and_5_bit_types(dtype, tok, tmp_path):
    model = make("llama", tok.vocab_size)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == dtype.upper()
    assert types["blk.1.attn_q.weight"] == dtype.upper()
    head = "token_embd.weight" if model.cfg.tie_embeddings else "output.weight"
    assert types[head] == "Q8_0"  # the head stays at 8 bits, as llama.cpp's quantize does
    back = ours_from_gguf(read_gguf_tensors(path), model.cfg, "llama")
    for key, w in model.state_dict().items():
        if w.dim() == 1 or key in ("lm_head.weight", "tok_emb.weight"):
            continue
        got = back[key]
        blocks, err = w.reshape(-1, 32), (got - w).reshape(-1, 32)
        amax = blocks.abs().amax(dim=1, keepdim=True)
        rng = blocks.amax(dim=1, keepdim=True) - blocks.amin(dim=1, keepdim=True)
        bound = 1.05 * BLOCK_ERROR[dtype](amax, rng) + amax * 2**-10 + 1e-7
        assert bool((err.abs() <= bound).all()), (key, float((err.abs() - bound).max()))
        assert not torch.equal(got, w)  # really quantised
    smaller = [
        export_gguf(model, tok, tmp_path / f"{d}.gguf", d).stat().st_size for d in ("q8_0", dtype)
    ]
    assert smaller[1] < smaller[0]


def test_gguf_embeds_the_tokenizer(tok, tmp_path):
    model = make("gpt2", tok.vocab_size)
    reader = gguf.GGUFReader(str(export_gguf(model, tok, tmp_path, "f16")))
    f = reader.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == model.cfg.vocab_size
    assert tokens[: tok.vocab_size] == [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[tok.eot_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert types[tok.encode("def")[0]] == gguf.TokenType.NORMAL
    assert len(f["tokenizer.ggml.merges"].contents()) == tok.vocab_size - 256 - 7
    assert f["tokenizer.ggml.eos_token_id"].contents() == tok.eot_id
    assert f["tokenizer.ggml.padding_token_id"].contents() == tok.pad_id
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.chat_template"].contents() == CHAT_TEMPLATE


def test_gguf_refuses_char_tokenizer_and_odd_models(tok, tmp_path):
    with pytest.raises(ExportError, match=r"tokenizer\.kind=bpe"):
        export_gguf(make("gpt2", 40), train_char(["abc"]), tmp_path / "a.gguf")
    cfg = ModelConfig(
        vocab_size=400, context_length=8, n_layers=1, d_model=16, n_heads=2, norm="rmsnorm"
    )
    with pytest.raises(ExportError, match="no standard"):
        export_gguf(Transformer(cfg), tok, tmp_path / "b.gguf")
    exact = ModelConfig(
        vocab_size=400, context_length=8, n_layers=1, d_model=16, n_heads=2, mlp="gelu_exact"
    )
    with pytest.raises(ExportError, match="gelu_exact"):
        export_gguf(Transformer(exact), tok, tmp_path / "c.gguf")
    assert not list(tmp_path.iterdir())
