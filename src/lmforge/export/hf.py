"""HF `transformers` folders, both ways.

Export writes a folder that ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` load with no custom code; import reads a
Llama, Mistral, Qwen2, Qwen3, OLMo 2, Gemma 2, Phi-3 or GPT-2 folder into an lmforge
model.

Which standard architecture expresses which lmforge model:

| lmforge model                                   | transformers architecture |
|-------------------------------------------------|---------------------------|
| layernorm + learned positions + GELU (tanh)     | GPT-2 (`gelu_new`)        |
| layernorm + learned positions + GELU (exact)    | GPT-2 (`gelu`)            |
| rmsnorm + RoPE + SwiGLU, no bias or bias on all | Llama (`attention_bias`,  |
|   linear layers                                 |   `mlp_bias`)             |
| rmsnorm + RoPE + SwiGLU + bias on q/k/v only    | Qwen2                     |
| rmsnorm + RoPE + SwiGLU + QK-norm, no bias      | Qwen3                     |
| ... + post-norms + QK-norm over the projection  | OLMo 2                    |
| ... + sandwich norms + GeGLU + scaled embedding | Gemma 2                   |
|   (+ attention and final logit soft-capping)    |                           |

Mistral and Phi-3 folders import as the Llama variant they are and export as Llama.

Anything else is refused with a message that says which fields to change.

Weight layouts (ours → HF):

- ``attn.qkv`` is [q; k; v] stacked by rows → ``q_proj``/``k_proj``/``v_proj``
  (Llama family) or GPT-2's fused ``c_attn``.
- ``mlp.up`` for SwiGLU is [gate; up] stacked, gate first → ``gate_proj``/``up_proj``.
- Phi-3 stores q/k/v and gate/up fused as we do (``qkv_proj``, ``gate_up_proj``).
- Gemma's RMSNorm multiplies by (1 + weight): its weights are ours minus one.
- GPT-2 stores its linear layers as ``Conv1D`` with the weight transposed
  relative to ``nn.Linear`` (in_features, out_features).
- Our RoPE uses the "rotate half" pairing, as HF Llama does, so q/k rows need no
  permutation between the two (GGUF does need one; see `gguf.py`).
- A GPT-2 export of a model without biases writes zero biases (exactly
  equivalent); an import whose biases are all exactly zero drops them again.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.components import MLPS
from lmforge.config import Config, ModelConfig, TokenizerConfig, config_from_dict, to_dict
from lmforge.model.transformer import Transformer, derived_d_ff
from lmforge.tokenizer import (
    CHAT_TEMPLATE,
    EOT,
    MASK,
    PAD,
    SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
)

State = dict[str, torch.Tensor]


class ExportError(ValueError):
    """The model or folder cannot be converted; the message says why and what to change."""


# ----------------------------------------------------------------------------- architecture


def hf_architecture(m: ModelConfig) -> str:
    """The standard transformers architecture ("gpt2", "llama", "qwen2", "qwen3") for a model.

    Raises `ExportError` naming the fields to change when none expresses it exactly.
    """
    if m.objective != "causal":
        raise ExportError(
            f"model.objective = {m.objective!r}: only causal language models export to "
            "AutoModelForCausalLM (train with model.objective=causal)"
        )
    if m.attention != "softmax":
        raise ExportError(
            f"model.attention = {m.attention!r}: the standard architectures compute softmax "
            "attention, so the exported model would compute different logits; train with "
            "model.attention=softmax to export"
        )
    gpt2_like = (m.norm, m.position) == ("layernorm", "learned") and m.mlp in (
        "gelu",
        "gelu_exact",
    )
    llama_like = (m.norm, m.position, m.mlp) == ("rmsnorm", "rope", "swiglu")
    if gpt2_like:
        _require(m, "gpt2", _PLAIN)
        if m.qk_norm:
            raise ExportError(
                "model.qk_norm = true: GPT-2 has no QK-norm. Train with model.qk_norm=false, "
                "or use the Llama-style family (norm=rmsnorm, position=rope, mlp=swiglu), "
                "which exports with QK-norm as Qwen3"
            )
        if (m.n_kv_heads or m.n_heads) != m.n_heads:
            raise ExportError(
                f"model.n_kv_heads = {m.n_kv_heads}: GPT-2 has no grouped-query attention; "
                "set model.n_kv_heads=0 (or use the Llama-style family, which has GQA)"
            )
        return "gpt2"  # any subset of biases is expressible: missing ones are written as zeros
    if llama_like and m.norm_placement == "post":
        _require(m, "olmo2", {**_PLAIN, "norm_placement": "post", "qk_norm": True,
                              "qk_norm_scope": "full", "bias": False, "qkv_bias": False})  # fmt: skip
        return "olmo2"
    if llama_like and m.norm_placement == "sandwich":
        _require(m, "gemma2", {"gate_act": "gelu_tanh", "embed_scale": True, "qk_norm": False,
                               "bias": False, "qkv_bias": False})  # fmt: skip
        return "gemma2"
    if llama_like:
        _require(m, "llama", _PLAIN)
        if m.qk_norm:
            if m.bias or m.qkv_bias:
                raise ExportError(
                    "model.qk_norm = true with biases: Qwen3 (the standard architecture with "
                    "QK-norm) has no MLP bias and no separate q/k/v bias; set model.bias=false "
                    "and model.qkv_bias=false"
                )
            return "qwen3"
        if m.qkv_bias and not m.bias:
            return "qwen2"
        return "llama"
    combo = f"norm={m.norm}, position={m.position}, mlp={m.mlp}"
    raise ExportError(
        f"no standard transformers architecture has {combo}. GPT-2 is "
        "norm=layernorm + position=learned + mlp=gelu; Llama is norm=rmsnorm + position=rope + "
        "mlp=swiglu. Change model.norm / model.position / model.mlp to one of these and retrain"
    )


# The variant fields as GPT-2, Llama, Qwen2 and Qwen3 have them.
_PLAIN: dict[str, Any] = {
    "norm_placement": "pre",
    "qk_norm_scope": "head",
    "gate_act": "silu",
    "embed_scale": False,
    "attn_scale": 0.0,
    "attn_softcap": 0.0,
    "logit_softcap": 0.0,
}


def _require(m: ModelConfig, arch: str, fields: dict[str, Any]) -> None:
    """Raise `ExportError` naming the first field whose value `arch` cannot express."""
    for name, value in fields.items():
        if getattr(m, name) != value:
            raise ExportError(
                f"model.{name} = {getattr(m, name)!r}: the closest standard architecture, "
                f"{arch}, needs {value!r}, so the exported model would compute different "
                f"logits; train with model.{name}={value} to export"
            )


def _rope_settings(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig's RoPE fields from a config of either generation (`rope_parameters` in
    transformers 5, `rope_theta` + `rope_scaling` before): plain RoPE or Llama 3's scaling."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return {"rope_theta": theta}
    if rope_type != "llama3":
        raise ExportError(
            f"{where}: RoPE scaling {rope_type!r} is not supported (lmforge implements plain "
            "RoPE and Llama 3's 'llama3' scaling)"
        )
    return {
        "rope_theta": theta,
        "rope_scaling": "llama3",
        "rope_factor": float(params["factor"]),
        "rope_low_freq_factor": float(params["low_freq_factor"]),
        "rope_high_freq_factor": float(params["high_freq_factor"]),
        "rope_original_context": int(params["original_max_position_embeddings"]),
    }


def _hf_rope(m: ModelConfig) -> dict[str, Any]:
    """The transformers config keys for our RoPE settings."""
    if m.rope_scaling != "llama3":
        return {"rope_theta": m.rope_theta}
    scaling = {
        "rope_type": "llama3",
        "factor": m.rope_factor,
        "low_freq_factor": m.rope_low_freq_factor,
        "high_freq_factor": m.rope_high_freq_factor,
        "original_max_position_embeddings": m.rope_original_context,
    }
    return {"rope_theta": m.rope_theta, "rope_scaling": scaling}


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a transformers config.json (GPT-2 or a `LLAMA_LIKE` family).

    The context is max_position_embeddings, or a shorter sliding window (Mistral v0.1,
    Gemma 2, Phi-3): lmforge attends to the whole context, which equals the window's
    attention only up to its length. RoPE tables are built lazily, so a long context
    costs no memory until it is used."""
    kind = hf.get("model_type", "")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ExportError(
                f"{where}: activation_function = {act!r}; lmforge implements GELU in the tanh "
                "form (gelu_new, gelu_pytorch_tanh) and the exact form (gelu)"
            )
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ExportError(f"{where}: non-standard GPT-2 attention scaling is not supported")
        d = int(hf["n_embd"])
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            context_length=int(hf["n_positions"]),
            n_layers=int(hf["n_layer"]),
            d_model=d,
            n_heads=int(hf["n_head"]),
            d_ff=int(hf.get("n_inner") or 4 * d),
            norm="layernorm",
            position="learned",
            mlp="gelu_exact" if act == "gelu" else "gelu",
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bias=True,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    if kind not in LLAMA_LIKE:
        raise ExportError(
            f"{where}: model_type = {kind!r}; import supports {', '.join(LLAMA_LIKE)}, gpt2"
        )
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or d // heads)
    context = int(hf.get("max_position_embeddings", 2048))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    sliding = hf.get("sliding_window")
    windowed = kind in ("mistral", "gemma2", "phi3") or hf.get("use_sliding_window")
    if sliding and windowed and sliding < context:
        # lmforge attends to the whole context; the two agree exactly up to the window.
        context = int(sliding)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        context_length=context,
        n_layers=int(hf["num_hidden_layers"]),
        d_model=d,
        n_heads=heads,
        n_kv_heads=kv_heads if kv_heads != heads else 0,  # 0 = as many as query heads
        head_dim=head_dim if head_dim * heads != d else 0,  # 0 = d / heads
        d_ff=int(hf["intermediate_size"]),
        norm="rmsnorm",
        position="rope",
        mlp="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", kind == "gemma2")),
        **_rope_settings(hf, where),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        **_family_fields(kind, hf, head_dim, where),
    )


# model_type values read as the Llama family (RMSNorm, RoPE, gated MLP), each a variant.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma2", "phi3")


def _family_fields(kind: str, hf: dict[str, Any], head_dim: int, where: str) -> dict[str, Any]:
    """The ModelConfig fields by which a Llama-like family differs from Llama."""
    key = "hidden_activation" if kind == "gemma2" else "hidden_act"
    act = hf.get(key) or "silu"
    want = "gelu_pytorch_tanh" if kind == "gemma2" else "silu"
    if act != want:
        raise ExportError(f"{where}: {key} = {act!r}; lmforge's {kind} import needs {want!r}")
    attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    if kind == "qwen2":
        return {"qkv_bias": True}  # Qwen2 always has q/k/v biases and none elsewhere
    if kind in ("llama", "mistral"):
        if attn_bias != mlp_bias:
            raise ExportError(
                f"{where}: attention_bias = {attn_bias} but mlp_bias = {mlp_bias}; lmforge "
                "puts a bias on every linear layer or on none (or on q/k/v only, as Qwen2)"
            )
        return {"bias": attn_bias}
    if attn_bias:
        raise ExportError(f"{where}: {kind} with attention_bias=true is not supported")
    if kind == "qwen3":
        return {"qk_norm": True}
    if kind == "olmo2":
        return {"qk_norm": True, "qk_norm_scope": "full", "norm_placement": "post"}
    if kind == "phi3":
        partial = (hf.get("rope_parameters") or {}).get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)
        )
        if float(partial) != 1.0:
            raise ExportError(f"{where}: partial_rotary_factor = {partial}; lmforge rotates all")
        return {}
    # gemma2
    return {
        "norm_placement": "sandwich",
        "gate_act": "gelu_tanh",
        "embed_scale": True,
        "attn_scale": float(hf.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        "attn_softcap": float(hf.get("attn_logit_softcapping") or 0.0),
        "logit_softcap": float(hf.get("final_logit_softcapping") or 0.0),
    }


# ----------------------------------------------------------------------------- weights


def _qkv_sizes(m: ModelConfig) -> list[int]:
    head_dim = m.head_dim or m.d_model // m.n_heads
    kv = m.n_kv_heads or m.n_heads
    return [m.n_heads * head_dim, kv * head_dim, kv * head_dim]


def to_hf_state(model: Transformer, arch: str) -> State:
    """Our weights under the names and layouts of the transformers architecture `arch`."""
    m = model.cfg
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: State = {}
    if arch == "gpt2":
        hidden = derived_d_ff(m)

        def bias_or_zeros(key: str, n: int) -> torch.Tensor:
            return ours.get(key, torch.zeros(n))

        out["transformer.wte.weight"] = ours["tok_emb.weight"]
        out["transformer.wpe.weight"] = ours["pos_emb.weight"]
        for i in range(m.n_layers):
            a, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours_norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[h + hf_norm + ".weight"] = ours[a + ours_norm + ".weight"]
                out[h + hf_norm + ".bias"] = bias_or_zeros(a + ours_norm + ".bias", m.d_model)
            for ours_lin, hf_lin, n_out in (
                ("attn.qkv", "attn.c_attn", 3 * m.d_model),
                ("attn.proj", "attn.c_proj", m.d_model),
                ("mlp.up", "mlp.c_fc", hidden),
                ("mlp.down", "mlp.c_proj", m.d_model),
            ):
                # Conv1D keeps (in, out): the transpose of nn.Linear's (out, in).
                out[h + hf_lin + ".weight"] = ours[a + ours_lin + ".weight"].t().contiguous()
                out[h + hf_lin + ".bias"] = bias_or_zeros(a + ours_lin + ".bias", n_out)
        out["transformer.ln_f.weight"] = ours["norm.weight"]
        out["transformer.ln_f.bias"] = bias_or_zeros("norm.bias", m.d_model)
        if not m.tie_embeddings:
            out["lm_head.weight"] = ours["lm_head.weight"]
        return out

    shift = _norm_shift(arch)
    out["model.embed_tokens.weight"] = ours["tok_emb.weight"]
    for i in range(m.n_layers):
        a, h = f"blocks.{i}.", f"model.layers.{i}."
        for ours_norm, hf_norm in _block_norms(arch):
            out[h + hf_norm + ".weight"] = ours[a + ours_norm + ".weight"] - shift
        for suffix in ("weight", "bias"):
            key = a + "attn.qkv." + suffix
            if key in ours:
                q, k, v = ours[key].split(_qkv_sizes(m), dim=0)
                out[h + "self_attn.q_proj." + suffix] = q.contiguous()
                out[h + "self_attn.k_proj." + suffix] = k.contiguous()
                out[h + "self_attn.v_proj." + suffix] = v.contiguous()
            if a + "mlp.up." + suffix in ours:
                gate, up = ours[a + "mlp.up." + suffix].chunk(2, dim=0)
                out[h + "mlp.gate_proj." + suffix] = gate.contiguous()
                out[h + "mlp.up_proj." + suffix] = up.contiguous()
            for ours_lin, hf_lin in (
                ("attn.proj", "self_attn.o_proj"),
                ("mlp.down", "mlp.down_proj"),
            ):
                if f"{a}{ours_lin}.{suffix}" in ours:
                    out[f"{h}{hf_lin}.{suffix}"] = ours[f"{a}{ours_lin}.{suffix}"]
        if m.qk_norm:
            out[h + "self_attn.q_norm.weight"] = ours[a + "attn.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = ours[a + "attn.k_norm.weight"]
    out["model.norm.weight"] = ours["norm.weight"] - shift
    if not m.tie_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    return out


def _block_norms(arch: str) -> list[tuple[str, str]]:
    """(our block norm, the transformers layer's norm) pairs of a Llama-like architecture."""
    if arch == "olmo2":  # norms on the attention and MLP outputs only
        return [("attn_out_norm", "post_attention_layernorm"),
                ("mlp_out_norm", "post_feedforward_layernorm")]  # fmt: skip
    pre = [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]
    if arch == "gemma2":
        return [("attn_norm", "input_layernorm"), ("attn_out_norm", "post_attention_layernorm"),
                ("mlp_norm", "pre_feedforward_layernorm"),
                ("mlp_out_norm", "post_feedforward_layernorm")]  # fmt: skip
    return pre


def _norm_shift(arch: str) -> float:
    """What transformers' RMSNorm weights lack of ours: Gemma scales by (1 + weight)."""
    return 1.0 if arch == "gemma2" else 0.0


def _take(state: State, key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise ExportError(f"{where}: tensor {key!r} is missing")
    return state.pop(key)


def from_hf_state(hf: State, m: ModelConfig, kind: str, where: str) -> State:
    """transformers weights of a `kind` model → our state dict (names and layouts)."""
    hf = dict(hf)
    out: State = {}
    if kind == "gpt2":
        # GPT2Model (no head) saves without the "transformer." prefix.
        hf = {
            (k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
            for k, v in hf.items()
        }
        hf = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        out["tok_emb.weight"] = _take(hf, "transformer.wte.weight", where)
        out["pos_emb.weight"] = _take(hf, "transformer.wpe.weight", where)
        for i in range(m.n_layers):
            a, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours_norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                for s in ("weight", "bias"):
                    out[f"{a}{ours_norm}.{s}"] = _take(hf, f"{h}{hf_norm}.{s}", where)
            for ours_lin, hf_lin in (
                ("attn.qkv", "attn.c_attn"),
                ("attn.proj", "attn.c_proj"),
                ("mlp.up", "mlp.c_fc"),
                ("mlp.down", "mlp.c_proj"),
            ):
                out[f"{a}{ours_lin}.weight"] = (
                    _take(hf, f"{h}{hf_lin}.weight", where).t().contiguous()
                )
                out[f"{a}{ours_lin}.bias"] = _take(hf, f"{h}{hf_lin}.bias", where)
        out["norm.weight"] = _take(hf, "transformer.ln_f.weight", where)
        out["norm.bias"] = _take(hf, "transformer.ln_f.bias", where)
    else:
        shift = _norm_shift(kind)
        out["tok_emb.weight"] = _take(hf, "model.embed_tokens.weight", where)
        for i in range(m.n_layers):
            a, h = f"blocks.{i}.", f"model.layers.{i}."
            for ours_norm, hf_norm in _block_norms(kind):
                out[a + ours_norm + ".weight"] = _take(hf, h + hf_norm + ".weight", where) + shift
            _llama_linears_from_hf(hf, out, m, a, h, where)
            if m.qk_norm:
                out[a + "attn.q_norm.weight"] = _take(hf, h + "self_attn.q_norm.weight", where)
                out[a + "attn.k_norm.weight"] = _take(hf, h + "self_attn.k_norm.weight", where)
        out["norm.weight"] = _take(hf, "model.norm.weight", where) + shift
    if m.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some writers store the tied copy too
    else:
        out["lm_head.weight"] = _take(hf, "lm_head.weight", where)
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ExportError(f"{where}: unexpected tensors {sorted(leftover)[:5]} (not converted)")
    return out


def _load_safetensors(path: Path) -> State:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        why = " ".join(str(exc).split())[:200]
        raise ExportError(
            f"{path}: not a readable safetensors file ({why}); it may be truncated: "
            "copy or download it again"
        ) from None


def _refuse_pickle(path: Path) -> State:
    raise ExportError(
        f"{path}: pickled weights are not loaded (loading a pickle can run code); convert "
        "them to safetensors, e.g. with transformers: "
        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
    )


def _shard_names(index: Path, folder: Path) -> list[str]:
    """The shard files a ``*.index.json`` names, each checked to lie inside `folder`."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{index}: invalid JSON ({exc})") from None
    except (KeyError, TypeError, AttributeError):
        raise ExportError(
            f"{index}: no 'weight_map' mapping tensor names to shard files "
            "(not a transformers shard index)"
        ) from None
    for shard in shards:
        # The index comes with the (untrusted) folder: a shard name must stay inside
        # it. Checked on the name, not the resolved path: HF cache snapshots are
        # symlinks into ../../blobs by design.
        norm = os.path.normpath(str(shard))
        if (
            not isinstance(shard, str)
            or os.path.isabs(norm)
            or norm == ".."
            or norm.startswith(".." + os.sep)
        ):
            raise ExportError(f"{index}: shard {shard!r} lies outside {folder}")
    return shards


def _llama_linears_from_hf(hf: State, out: State, m: ModelConfig, a: str, h: str, where: str):
    """One layer's linear weights; q/k/v and gate/up are fused as ours (as Phi-3 stores them)."""

    def fused(s: str, fused_name: str, parts: list[str]) -> torch.Tensor:
        if f"{h}{fused_name}.{s}" in hf:
            return hf.pop(f"{h}{fused_name}.{s}")
        return torch.cat([_take(hf, f"{h}{p}.{s}", where) for p in parts], dim=0)

    for s in ["weight"] + (["bias"] if m.bias or m.qkv_bias else []):
        out[f"{a}attn.qkv.{s}"] = fused(
            s, "self_attn.qkv_proj", [f"self_attn.{p}_proj" for p in "qkv"]
        )
    for s in ["weight"] + (["bias"] if m.bias else []):
        out[f"{a}attn.proj.{s}"] = _take(hf, f"{h}self_attn.o_proj.{s}", where)
        out[f"{a}mlp.up.{s}"] = fused(s, "mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"])
        out[f"{a}mlp.down.{s}"] = _take(hf, f"{h}mlp.down_proj.{s}", where)


def _read_hf_weights(folder: Path) -> State:
    """All tensors of a transformers folder's safetensors (single or sharded). Pickled
    PyTorch ``.bin`` weights are refused, never unpickled."""
    for index_name, loader in (
        ("model.safetensors.index.json", _load_safetensors),
        ("pytorch_model.bin.index.json", _refuse_pickle),
    ):
        index = folder / index_name
        if index.exists():
            state: State = {}
            for shard in _shard_names(index, folder):
                state.update(loader(folder / shard))
            return state
    if (folder / "model.safetensors").exists():
        return _load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return _refuse_pickle(folder / "pytorch_model.bin")
    raise ExportError(f"{folder}: no model.safetensors (sharded or not)")


# ----------------------------------------------------------------------------- import


def _tokenizer_for_import(
    folder: Path, tokenizer: str | Path | None
) -> tuple[BPETokenizer, Path, list[str]]:
    """The folder's tokenizer.json with lmforge's special tokens added where missing."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(tokenizer) if tokenizer else folder / "tokenizer.json"
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise ExportError(
            f"{path}: no tokenizer.json (a fast tokenizer file is needed; pass one with --tokenizer)"
        )
    hf = HFTokenizer.from_file(str(path))
    missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
    if missing:
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return BPETokenizer(hf), path, missing


def _chat_settings(folder: Path) -> dict[str, str]:
    """The folder's chat template and bos/eos tokens (tokenizer_config.json, and
    chat_template.jinja where transformers 5 keeps the template), as TokenizerConfig fields."""
    path = folder / "tokenizer_config.json"
    try:
        tk = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: invalid JSON: {exc}") from None
    template = tk.get("chat_template") or ""
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template", "") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), "")
    if not template and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    def token(key: str) -> str:
        value = tk.get(key) or ""
        return str(value.get("content", "") if isinstance(value, dict) else value)

    return {"chat_template": str(template), "bos_token": token("bos_token"),
            "eos_token": token("eos_token")}  # fmt: skip


def _grow_vocab(state: State, m: ModelConfig, vocab: int) -> None:
    """Add embedding (and untied head) rows up to `vocab`, each the mean of the existing rows.

    Mean initialisation keeps the new tokens' logits ordinary instead of random
    (Hewitt 2021, "Initializing new word embeddings for pretrained language models").
    """
    for key in ("tok_emb.weight", "lm_head.weight"):
        if key in state:
            w = state[key]
            extra = w.mean(dim=0, keepdim=True).expand(vocab - w.size(0), -1)
            state[key] = torch.cat([w, extra], dim=0)


def _drop_zero_biases(state: State, m: ModelConfig) -> ModelConfig:
    """Drop the biases of a GPT-2 folder that are all exactly zero (as our exports write them).

    Zero biases change nothing, so this is exact: a bias-free model exported to GPT-2
    comes back bias-free, and one with only q/k/v biases comes back with `qkv_bias`.
    """
    biases = [k for k in state if k.endswith(".bias")]
    qkv = [k for k in biases if k.endswith("attn.qkv.bias")]
    others = [k for k in biases if k not in qkv]
    if not m.bias or not biases or any(bool(state[k].any()) for k in others):
        return m
    qkv_bias = any(bool(state[k].any()) for k in qkv)
    for k in others + ([] if qkv_bias else qkv):
        del state[k]
    return replace(m, bias=False, qkv_bias=qkv_bias)


def load_hf_model(
    path: str | Path, tokenizer: str | Path | None = None
) -> tuple[Transformer, Tokenizer, Config]:
    """An lmforge model, tokenizer and config from a transformers folder (no network).

    Supports Llama (3.x included), Mistral, Qwen2/2.5, Qwen3, OLMo 2, Gemma 2, Phi-3
    and GPT-2 folders with a fast `tokenizer.json` (or pass `tokenizer`, a tokenizer.json
    or folder). The chat template and bos/eos tokens of `tokenizer_config.json` are
    recorded in the config's tokenizer section. lmforge's special
    tokens (<|endoftext|>, <|pad|>, chat roles, ...) are added to the tokenizer when
    missing; if the embedding has no spare rows for them it grows, new rows set to the
    mean embedding, so logits of the original vocabulary are unchanged.
    The model is float32, in eval mode, on the CPU.
    """
    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ExportError(f"{folder}: no config.json (not a transformers model folder)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{cfg_path}: invalid JSON: {exc}") from None
    if not isinstance(hf_cfg, dict):
        raise ExportError(f"{cfg_path}: not a JSON object")
    try:
        m = model_config_from_hf(hf_cfg, str(cfg_path))
    except ExportError:
        raise
    except KeyError as exc:
        raise ExportError(f"{cfg_path}: key {exc} missing") from None
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{cfg_path}: a value has the wrong type ({exc})") from None
    state = from_hf_state(_read_hf_weights(folder), m, hf_cfg["model_type"], str(folder))
    if hf_cfg["model_type"] == "gpt2":
        m = _drop_zero_biases(state, m)
    tok, tok_path, added = _tokenizer_for_import(folder, tokenizer)
    if tok.vocab_size > m.vocab_size:
        _grow_vocab(state, m, tok.vocab_size)
        m = replace(m, vocab_size=tok.vocab_size)
    model = Transformer(m)
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if m.tie_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ExportError(
            f"{folder}: converted weights do not fit (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    cfg = Config(name=folder.name, model=m)
    cfg.tokenizer.kind = "bpe"
    cfg.tokenizer.vocab_size = tok.vocab_size
    for key, value in _chat_settings(folder).items():
        setattr(cfg.tokenizer, key, value)
    if not added:  # the file loads as it is; with added specials only `tok` has them
        cfg.tokenizer.path = str(tok_path)
    # The default batch (8192 tokens) need not be a multiple of this context; make it one.
    cfg.train.micro_batch_size = 1
    cfg.train.tokens_per_step = m.context_length * max(1, math.ceil(8192 / m.context_length))
    cfg = config_from_dict(to_dict(cfg), where=str(cfg_path))
    return model.eval(), tok, cfg


def import_hf(path: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Convert a transformers folder into an lmforge run folder with one checkpoint (step 0).

    The run folder gets ``config.yaml``, ``tokenizer.json`` and
    ``checkpoints/step_00000000/`` (loadable with `lmforge.pretrain.load_model`).
    """
    from lmforge.config import dump_yaml
    from lmforge.train.checkpoint import save_checkpoint

    model, tok, cfg = load_hf_model(path, tokenizer)
    out = Path(out)
    cfg.output.dir = str(out)
    cfg.tokenizer.path = str(out / "tokenizer.json")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    tok.save(out / "tokenizer.json")
    state = {"config": to_dict(cfg), "imported_from": str(Path(path).resolve()), "tokens_seen": 0}
    return save_checkpoint(
        out,
        0,
        model,
        None,
        state,
        keep_last=0,
        extra_files={"tokenizer.json": tok.to_json().encode("utf-8")},
    )


# ----------------------------------------------------------------------------- export


def hf_tokenizers_file(tok: Tokenizer) -> Any:
    """Our tokenizer as an HF `tokenizers.Tokenizer` (a character vocabulary is converted).

    A character tokenizer becomes a word-level model over single characters: the
    pre-tokenizer isolates every character and the decoder joins them without spaces,
    so ids and text round-trip exactly as in `CharTokenizer`.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(tok, BPETokenizer):
        return HFTokenizer.from_str(tok.hf.to_str())  # a copy: wrapping must not alter ours
    if isinstance(tok, CharTokenizer):
        vocab = {t: i for i, t in enumerate(tok.itos)}
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        )
        return hf
    raise ExportError(f"tokenizer kind {tok.kind!r} cannot be exported")


def _gpt2_config(m: ModelConfig, ids: dict[str, Any]) -> Any:
    import transformers

    return transformers.GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.context_length,
        n_embd=m.d_model,
        n_layer=m.n_layers,
        n_head=m.n_heads,
        n_inner=derived_d_ff(m),
        # The MLP component's HF name: "gelu" is the exact (erf) form, "gelu_new" the tanh.
        activation_function=MLPS[m.mlp].hf_activation,
        resid_pdrop=m.dropout,
        embd_pdrop=m.dropout,
        attn_pdrop=m.dropout,
        layer_norm_epsilon=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        architectures=["GPT2LMHeadModel"],
        **ids,
    )


def _gemma2_config(m: ModelConfig, common: dict[str, Any]) -> Any:
    import transformers

    common = {k: v for k, v in common.items() if k != "hidden_act"}
    scalar = (m.attn_scale or common["head_dim"] ** -0.5) ** -2  # transformers keeps an int
    if abs(scalar - round(scalar)) > 1e-6 * scalar:
        raise ExportError(
            f"model.attn_scale = {m.attn_scale}: Gemma 2 scales by n^-1/2 for a whole "
            "number n (query_pre_attn_scalar); use such a scale to export"
        )
    return transformers.Gemma2Config(
        **common,
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=False,
        query_pre_attn_scalar=round(scalar),
        # Gemma 2 slides every other layer's window; ours is the whole context.
        sliding_window=m.context_length,
        attn_logit_softcapping=m.attn_softcap or None,
        final_logit_softcapping=m.logit_softcap or None,
        architectures=["Gemma2ForCausalLM"],
    )


def _hf_config(m: ModelConfig, arch: str, ids: dict[str, Any]) -> Any:
    """The transformers config object for `arch` with our shape, norms, RoPE and special
    `ids` (bos_token_id, eos_token_id, pad_token_id)."""
    import transformers

    if arch == "gpt2":
        return _gpt2_config(m, ids)
    common: dict[str, Any] = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=derived_d_ff(m),
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads or m.n_heads,
        hidden_act="silu",
        max_position_embeddings=m.context_length,
        rms_norm_eps=m.norm_eps,
        **_hf_rope(m),
        attention_dropout=m.dropout,
        tie_word_embeddings=m.tie_embeddings,
        head_dim=m.head_dim or m.d_model // m.n_heads,
        **ids,
    )
    if arch == "gemma2":
        return _gemma2_config(m, common)
    extra: dict[str, dict[str, Any]] = {
        "llama": dict(attention_bias=m.bias, mlp_bias=m.bias),
        "qwen2": dict(use_sliding_window=False),
        "qwen3": dict(attention_bias=False, use_sliding_window=False),
        "olmo2": dict(attention_bias=False),
    }
    classes = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "olmo2": "Olmo2"}
    if arch not in classes:
        raise ExportError(f"unknown architecture {arch!r}")
    config_class = getattr(transformers, classes[arch] + "Config")
    return config_class(**common, **extra[arch], architectures=[classes[arch] + "ForCausalLM"])


TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export_hf(
    model: Transformer,
    tok: Tokenizer,
    out: str | Path,
    dtype: str = "f32",
    chat: TokenizerConfig | None = None,
) -> Path:
    """Write a transformers folder for `model` and `tok`; returns the folder.

    Files: ``config.json``, ``generation_config.json``, ``model.safetensors`` (in
    `dtype`: f32, f16 or bf16), ``tokenizer.json``, ``tokenizer_config.json`` (with the
    chat template) and ``chat_template.jinja``. The chat template and bos/eos tokens are
    lmforge's, or those `chat` (an imported model's tokenizer settings) records. Raises
    `ExportError` before writing anything when no standard architecture expresses the model.
    """
    try:
        import transformers
    except ImportError:
        raise ExportError("HF export needs transformers: pip install 'lmforge[hf]'") from None
    m = model.cfg
    arch = hf_architecture(m)
    if dtype not in TORCH_DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    hf_tok = hf_tokenizers_file(tok)
    if hf_tok.get_vocab_size() > m.vocab_size:
        raise ExportError(
            f"tokenizer has {hf_tok.get_vocab_size()} tokens but the model only {m.vocab_size}"
        )
    template, bos, eos = CHAT_TEMPLATE, EOT, EOT
    if chat is not None and chat.chat_template:
        template = chat.chat_template
        known = hf_tok.get_vocab()
        bos = chat.bos_token if chat.bos_token in known else EOT
        eos = chat.eos_token if chat.eos_token in known else EOT
    special = dict(
        bos_token_id=hf_tok.token_to_id(bos), eos_token_id=hf_tok.token_to_id(eos),
        pad_token_id=tok.pad_id,
    )  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = _hf_config(m, arch, special)
    config.dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    config.save_pretrained(out)
    transformers.GenerationConfig(**special).save_pretrained(out)
    state = {k: v.to(TORCH_DTYPES[dtype]).contiguous() for k, v in to_hf_state(model, arch).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf_tok,
        bos_token=bos,  # lmforge separates documents with <|endoftext|>, as GPT-2
        eos_token=eos,
        pad_token=PAD,
        mask_token=MASK,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOT, PAD, MASK)],
        model_max_length=m.context_length,
    )
    fast.chat_template = template
    fast.save_pretrained(out)
    # transformers 5 names its own backend class here; the generic fast class and an inline
    # chat template also load in transformers 4.
    tk_cfg_path = out / "tokenizer_config.json"
    tk_cfg = json.loads(tk_cfg_path.read_text())
    tk_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tk_cfg["chat_template"] = template
    tk_cfg_path.write_text(json.dumps(tk_cfg, indent=2, ensure_ascii=False) + "\n")
    return out
