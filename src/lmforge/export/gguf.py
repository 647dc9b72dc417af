"""GGUF files for llama.cpp, written with the `gguf` package (llama.cpp's own writer).

The architecture follows the HF mapping (`hf.hf_architecture`): GPT-2-style models
become llama.cpp's ``gpt2``, Llama-style ones ``llama``, q/k/v-bias ones ``qwen2``
and QK-norm ones ``qwen3``. Tensor names follow llama.cpp's table
(`gguf.TENSOR_NAMES`). Two layout details differ from ours:

- llama.cpp's ``llama`` architecture rotates *adjacent* pairs (x[2i], x[2i+1]) with
  RoPE, while we (and HF) rotate (x[i], x[i + D/2]). The q and k rows of every head
  are therefore reordered so that rows i and i + D/2 become neighbours — the same
  permutation llama.cpp's own HF converter applies. ``qwen2``/``qwen3`` use the
  "rotate half" (NeoX) layout and need no reordering.
- llama.cpp's ``gpt2`` requires every bias; a model without them gets zeros.

Weights are stored as f32, f16, bf16, or one of the block quantisations that the
`gguf` package writes: Q8_0 (blocks of 32 int8 values with one f16 scale), Q5_0 /
Q5_1 and Q4_0 / Q4_1 (5 or 4 bits a value, with a scale, and for ``_1`` a minimum,
per block of 32). The K-quants (Q4_K, Q6_K, ...) need llama.cpp's own ``quantize``
tool: ``gguf`` cannot write them. As in llama.cpp's converter, 1-D tensors (norms,
biases) stay f32, and a matrix whose rows are not a multiple of the quantisation
block falls back to f16. With 4- and 5-bit types the output head (the token
embedding when the two are tied) is written in Q8_0, as llama.cpp's ``quantize``
keeps that layer at a higher precision than the rest: its errors reach every logit
directly.

The tokenizer travels inside the file: byte-level BPE vocabulary, merges, token
types (specials are CONTROL), special token ids and the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.export.hf import ExportError, hf_architecture
from lmforge.fileio import atomic_path
from lmforge.model.transformer import Transformer, derived_d_ff, rope_inv_freq
from lmforge.tokenizer import CHAT_TEMPLATE, BPETokenizer, Tokenizer

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ExportError(
            "GGUF export needs the gguf package: pip install 'lmforge[export]'"
        ) from None
    return gguf


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows (or biases) per head from "rotate half" to adjacent-pair RoPE.

    Within a head of D rows, row i (first half) and row i + D/2 (second half) form one
    rotation pair; the output puts them at 2i and 2i + 1.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def halve_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleave_rope_rows`."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check_gguf(m: ModelConfig) -> str:
    """The model's HF architecture, if llama.cpp computes it as lmforge does; else ExportError."""
    arch = hf_architecture(m)
    if arch not in ("gpt2", "llama", "qwen2", "qwen3"):
        raise ExportError(
            f"GGUF export does not write {arch} models yet; export an HF folder (--format hf)"
        )
    if m.head_dim and m.head_dim * m.n_heads != m.d_model:
        raise ExportError(
            f"model.head_dim = {m.head_dim} != d_model / n_heads: GGUF export does not write "
            "it yet; export an HF folder (--format hf)"
        )
    if m.mlp == "gelu_exact":
        raise ExportError(
            "model.mlp = gelu_exact: llama.cpp's GPT-2 computes the tanh form of GELU, so "
            "its logits would differ; export this model to an HF folder (activation 'gelu'), "
            "or train with model.mlp=gelu for GGUF"
        )
    if m.rope_scaling == "llama3" and arch != "llama":
        raise ExportError(
            f"model.rope_scaling = llama3 on a {arch} model: llama.cpp applies Llama 3's "
            "frequency scaling (its rope_freqs tensor) to the llama architecture only"
        )
    return arch


def _block_tensors(
    ours: dict[str, torch.Tensor], m: ModelConfig, arch: str, i: int,
    bias: Callable[[str, int], torch.Tensor | None],
) -> dict[str, torch.Tensor | None]:  # fmt: skip
    """Block i's tensors under llama.cpp's short names ("attn_q", "ffn_up_b": a bias)."""
    a = f"blocks.{i}."
    named = {
        "attn_norm": ours[a + "attn_norm.weight"],
        "attn_norm_b": bias(a + "attn_norm.bias", m.d_model),
        "ffn_norm": ours[a + "mlp_norm.weight"],
        "ffn_norm_b": bias(a + "mlp_norm.bias", m.d_model),
        "attn_output": ours[a + "attn.proj.weight"],
        "attn_output_b": bias(a + "attn.proj.bias", m.d_model),
        "ffn_down": ours[a + "mlp.down.weight"],
        "ffn_down_b": bias(a + "mlp.down.bias", m.d_model),
    }
    if arch == "gpt2":
        named["attn_qkv"] = ours[a + "attn.qkv.weight"]
        named["attn_qkv_b"] = bias(a + "attn.qkv.bias", 3 * m.d_model)
        named["ffn_up"] = ours[a + "mlp.up.weight"]
        named["ffn_up_b"] = bias(a + "mlp.up.bias", derived_d_ff(m))
        return named
    heads, kv = m.n_heads, m.n_kv_heads or m.n_heads
    head_dim = m.d_model // heads
    sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
    for s in ("weight", "bias"):
        if a + "attn.qkv." + s not in ours:
            continue
        q, k, v = ours[a + "attn.qkv." + s].split(sizes, dim=0)
        if arch == "llama":
            q, k = interleave_rope_rows(q, heads), interleave_rope_rows(k, kv)
        tail = "" if s == "weight" else "_b"
        named["attn_q" + tail], named["attn_k" + tail], named["attn_v" + tail] = q, k, v
    named["ffn_gate"], named["ffn_up"] = ours[a + "mlp.up.weight"].chunk(2, dim=0)
    if a + "mlp.up.bias" in ours:
        named["ffn_gate_b"], named["ffn_up_b"] = ours[a + "mlp.up.bias"].chunk(2, dim=0)
    if m.qk_norm:
        named["attn_q_norm"] = ours[a + "attn.q_norm.weight"]
        named["attn_k_norm"] = ours[a + "attn.k_norm.weight"]
    return named


def gguf_tensors(model: Transformer) -> tuple[str, dict[str, torch.Tensor]]:
    """llama.cpp architecture name and float32 tensors under llama.cpp's names and layouts."""
    m = model.cfg
    arch = _check_gguf(m)
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {"token_embd.weight": ours["tok_emb.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = ours["pos_emb.weight"]

    def bias(key: str, n: int) -> torch.Tensor | None:
        if key in ours:
            return ours[key]
        return torch.zeros(n) if arch == "gpt2" else None

    for i in range(m.n_layers):
        for name, t in _block_tensors(ours, m, arch, i, bias).items():
            if t is not None:
                kind = "bias" if name.endswith("_b") else "weight"
                out[f"blk.{i}.{name.removesuffix('_b')}.{kind}"] = t.contiguous()
    if m.rope_scaling == "llama3":
        # llama.cpp divides each RoPE frequency by its factor: plain / scaled.
        plain = rope_inv_freq(replace(m, rope_scaling="none"))
        out["rope_freqs.weight"] = (plain / rope_inv_freq(m)).float()
    out["output_norm.weight"] = ours["norm.weight"]
    if arch == "gpt2":
        out["output_norm.bias"] = bias("norm.bias", m.d_model)  # type: ignore[assignment]
    if not m.tie_embeddings:
        out["output.weight"] = ours["lm_head.weight"]
    return arch, out


def _encode_tensor(
    gguf: Any, t: torch.Tensor, dtype: str, head: bool = False
) -> tuple[np.ndarray, Any]:
    """(array, raw_dtype) for `add_tensor`: 1-D stays f32; a block type falls back to f16
    where a row is not a whole number of blocks; a 4/5-bit file's head is Q8_0."""
    q = gguf.GGMLQuantizationType
    data = t.numpy().astype(np.float32)
    if t.dim() == 1 or dtype == "f32":
        return data, None
    if dtype == "f16":
        return data.astype(np.float16), None
    if dtype == "bf16":
        return gguf.quants.quantize(data, q.BF16), q.BF16
    qtype = q.Q8_0 if head else getattr(q, dtype.upper())
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype


def _vocab(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges for llama.cpp's "gpt2" (byte-level BPE) tokenizer."""
    if not isinstance(tok, BPETokenizer):
        raise ExportError(
            "GGUF export needs a byte-level BPE tokenizer (llama.cpp has no character "
            "vocabulary); train with tokenizer.kind=bpe"
        )
    data = json.loads(tok.hf.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r} is not BPE")
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    normal, control, unused = 1, 3, 5  # gguf.TokenType values
    for i in range(vocab_size):
        piece = tok.hf.id_to_token(i)
        if piece is None:  # the embedding has more rows than the tokenizer has tokens
            tokens.append(f"[PAD{i}]")
            types.append(unused)
        else:
            tokens.append(piece)
            types.append(control if i in special else normal)
    # tokenizers writes merges as "a b" strings (old) or [a, b] pairs (new).
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def export_gguf(
    model: Transformer,
    tok: Tokenizer,
    path: str | Path,
    dtype: str = "f16",
    name: str = "lmforge-model",
) -> Path:
    """Write `model` and `tok` to one GGUF file; `path` may be a folder (→ model-DTYPE.gguf)."""
    gguf = _gguf()
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"GGUF dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    m = model.cfg
    arch, tensors = gguf_tensors(model)  # raises before any file is written
    tokens, types, merges = _vocab(tok, m.vocab_size)
    path = Path(path)
    if path.suffix != ".gguf":
        path = path / f"model-{dtype}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # model-f16.gguf.tmp until the whole file is written
        w = gguf.GGUFWriter(tmp, arch)
        _add_metadata(w, gguf, m, arch, dtype, name)
        _add_tokenizer(w, tok, tokens, types, merges)
        for tname, t in tensors.items():
            head = tname == "output.weight" or (tname == "token_embd.weight" and m.tie_embeddings)
            data, raw_dtype = _encode_tensor(gguf, t, dtype, head=head)
            w.add_tensor(tname, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _add_metadata(w: Any, gguf: Any, m: ModelConfig, arch: str, dtype: str, name: str) -> None:
    """The model's name, file type and shape keys."""
    w.add_name(name)
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
            "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
            "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[dtype]
    )
    w.add_context_length(m.context_length)
    w.add_embedding_length(m.d_model)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(derived_d_ff(m))
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads or m.n_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(m.norm_eps)
    else:
        w.add_layer_norm_rms_eps(m.norm_eps)
        w.add_rope_freq_base(m.rope_theta)
        w.add_rope_dimension_count(m.d_model // m.n_heads)
        w.add_key_length(m.d_model // m.n_heads)
        w.add_value_length(m.d_model // m.n_heads)
    w.add_vocab_size(m.vocab_size)


def _add_tokenizer(w: Any, tok: Tokenizer, tokens: Any, types: Any, merges: Any) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # our byte-level BPE splits text with GPT-2's regex
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.eot_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_mask_token_id(tok.mask_id)
    w.add_add_bos_token(False)  # lmforge never prepends a BOS token
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def read_gguf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, in the (rows, columns) order of PyTorch."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = np.array(data, dtype=np.float32).reshape(shape)  # a writable copy
    return out


def state_from_gguf(path: str | Path, model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict from a GGUF file written by `export_gguf` for a model shaped like `model`.

    Quantised tensors come back dequantised, so loading the result into `model` gives
    the model llama.cpp actually runs (used to separate storage rounding from
    differences in arithmetic).
    """
    m = model.cfg
    arch, names = gguf_tensors(model)
    g = {k: torch.from_numpy(v) for k, v in read_gguf_tensors(path).items()}
    missing = set(names) - set(g)
    if missing:
        raise ExportError(f"{path}: tensors {sorted(missing)[:5]} missing")
    heads, kv = m.n_heads, m.n_kv_heads or m.n_heads
    out: dict[str, torch.Tensor] = {"tok_emb.weight": g["token_embd.weight"]}
    if arch == "gpt2":
        out["pos_emb.weight"] = g["position_embd.weight"]
    out["norm.weight"] = g["output_norm.weight"]
    norm_bias = m.bias and m.norm == "layernorm"  # RMSNorm has no bias
    if norm_bias:
        out["norm.bias"] = g["output_norm.bias"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = g["output.weight"]
    for i in range(m.n_layers):
        a, b = f"blocks.{i}.", f"blk.{i}."
        pairs = [
            ("attn_norm", "attn_norm"),
            ("mlp_norm", "ffn_norm"),
            ("attn.proj", "attn_output"),
            ("mlp.down", "ffn_down"),
        ]
        if arch == "gpt2":
            pairs += [("attn.qkv", "attn_qkv"), ("mlp.up", "ffn_up")]
        for ours, theirs in pairs:
            out[f"{a}{ours}.weight"] = g[f"{b}{theirs}.weight"]
            if norm_bias if ours.endswith("norm") else m.bias:
                out[f"{a}{ours}.bias"] = g[f"{b}{theirs}.bias"]
        if arch == "gpt2":
            continue
        for s in ["weight"] + (["bias"] if m.bias or m.qkv_bias else []):
            q, k, v = g[f"{b}attn_q.{s}"], g[f"{b}attn_k.{s}"], g[f"{b}attn_v.{s}"]
            if arch == "llama":
                q, k = halve_rope_rows(q, heads), halve_rope_rows(k, kv)
            out[f"{a}attn.qkv.{s}"] = torch.cat([q, k, v])
        for s in ["weight"] + (["bias"] if m.bias else []):
            out[f"{a}mlp.up.{s}"] = torch.cat([g[f"{b}ffn_gate.{s}"], g[f"{b}ffn_up.{s}"]])
        if m.qk_norm:
            out[a + "attn.q_norm.weight"] = g[b + "attn_q_norm.weight"]
            out[a + "attn.k_norm.weight"] = g[b + "attn_k_norm.weight"]
    return out


def open_llama_cpp(path: str | Path, n_ctx: int, n_threads: int = 1, f32_cache: bool = True) -> Any:
    """A `llama_cpp.Llama` for a GGUF file, with logits kept for every position.

    `f32_cache` keeps keys and values in float32 (llama.cpp defaults to f16), so a
    comparison with our model is about the stored weights only. "Extra buffer types"
    (weight repacking and AMX tile kernels) are switched off: a llama.cpp compiled with
    GGML_NATIVE on a CPU that reports AMX runs Q8_0 through AMX kernels, which fault
    (SIGILL) in virtual machines that advertise AMX without enabling it.
    """
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "llama-cpp-python is not installed: pip install -c constraints.txt llama-cpp-python "
            "(it compiles llama.cpp from source)"
        ) from None
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = default_params()
        p.use_extra_bufts = False
        return p

    cache: dict[str, Any] = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32
    llama_cpp.llama_cpp.llama_model_default_params = params  # read inside Llama.__init__
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=n_threads,
            verbose=False,
            **cache,
        )
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params
