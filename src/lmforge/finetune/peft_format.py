"""LoRA adapters in PEFT's format, both ways.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` as
`peft` writes them, so ``PeftModel.from_pretrained(base, folder)`` loads an lmforge
adapter onto the transformers model that ``lmforge export --format hf`` writes, and
lmforge loads an adapter that `peft` trained elsewhere.

Module names. When the model has a standard transformers architecture
(`lmforge.export.hf.hf_architecture`), tensors are named after the exported model's
modules (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``);
otherwise after lmforge's own (``base_model.model.blocks.0.attn.qkv.lora_A.weight``),
which `peft` applies to a `Transformer` directly.

Fused layers. lmforge computes q, k and v in one linear (``attn.qkv``, rows
[q; k; v]) and SwiGLU's gate and up in another (``mlp.up``, rows [gate; up]).
An update ``ΔW = s·B·A`` of the fused weight splits by rows of B:
``ΔW_q = s·B_q·A``, so each part gets the same A and its rows of B, rank r each,
exactly. The other way, parts with their own A_p and B_p (rank r_p, scale s_p)
fuse exactly into rank Σr_p: ``A = [A_q; A_k; A_v]`` and a block-diagonal B with
``s_p·B_p`` in part p's rows and columns (zero rows for parts without an
adapter). When every part carries the same A and scale (an adapter written by
lmforge), the shared A is kept: rank r, ``B = [B_q; B_k; B_v]``.

Refused with a message: DoRA, trained biases, `modules_to_save`, and layers that
are not one of lmforge's linears.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.finetune.lora_layers import LoRALinear, _set_module, untie_head

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


Lora = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # A (r, in), B (out, r), scale


class AdapterError(ValueError):
    """An adapter folder that cannot be read or applied; the message says why."""


# ----------------------------------------------------------------------------- naming


@dataclass(frozen=True)
class Part:
    """One module of the target naming that covers rows [start, stop) of an lmforge linear."""

    name: str
    start: int
    stop: int


def _architecture(model: nn.Module) -> str | None:
    from lmforge.export.hf import ExportError, hf_architecture

    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None
    try:
        return hf_architecture(cfg)
    except ExportError:
        return None


def module_parts(model: nn.Module, name: str, arch: str | None) -> list[Part]:
    """The modules of `arch`'s naming that lmforge's linear `name` maps to, by output rows."""
    layer = model.get_submodule(name)
    assert isinstance(layer, nn.Linear)
    n_out = layer.out_features
    if arch is None or name == "lm_head":
        return [Part(name, 0, n_out)]
    block, _, rest = name.removeprefix("blocks.").partition(".")
    if arch == "gpt2":
        hf = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj"}
        hf |= {"mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
        return [Part(f"transformer.h.{block}.{hf[rest]}", 0, n_out)]
    h = f"model.layers.{block}."
    if rest == "attn.qkv":
        from lmforge.export.hf import _qkv_sizes

        sizes = _qkv_sizes(model.cfg)  # type: ignore[arg-type]
        bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
        return [
            Part(f"{h}self_attn.{p}_proj", bounds[i], bounds[i + 1]) for i, p in enumerate("qkv")
        ]
    if rest == "mlp.up":
        half = n_out // 2
        return [Part(f"{h}mlp.gate_proj", 0, half), Part(f"{h}mlp.up_proj", half, n_out)]
    hf = {"attn.proj": "self_attn.o_proj", "mlp.down": "mlp.down_proj"}
    return [Part(h + hf[rest], 0, n_out)]


def _adapted(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------- writing


def save_peft_adapter(
    model: nn.Module, folder: str | Path, base_model: str = "", dropout: float = 0.0
) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder; returns the folder."""
    adapted = _adapted(model)
    if not adapted:
        raise AdapterError("the model has no LoRA layers to save")
    ranks = {m.rank for m in adapted.values()}
    alphas = {m.alpha for m in adapted.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise AdapterError(f"LoRA layers with several ranks or alphas ({ranks}, {alphas})")
    arch = _architecture(model)
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, layer in adapted.items():
        a = layer.lora_A.detach().float().cpu().contiguous()
        b = layer.lora_B.detach().float().cpu()
        for part in module_parts(model, name, arch):
            tensors[f"{PREFIX}{part.name}.lora_A.weight"] = a.clone()
            tensors[f"{PREFIX}{part.name}.lora_B.weight"] = b[part.start : part.stop].contiguous()
            targets.add(part.name.rsplit(".", 1)[-1])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "lora_dropout": dropout,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": arch == "gpt2",  # GPT-2's Conv1D stores (in, out)
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return folder


# ----------------------------------------------------------------------------- reading


def is_peft_adapter(folder: str | Path) -> bool:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("peft_type") == "LORA"
    except (json.JSONDecodeError, AttributeError):
        return False


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not a readable adapter config ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA loads")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: adapters that train biases (bias={config['bias']!r})")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save {config['modules_to_save']} (full weights)")
    return config


def _scale(config: dict[str, Any], part: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha / r, or alpha / √r with rsLoRA."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if part == pattern or part.endswith("." + pattern):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_parts(
    folder: Path, config: dict[str, Any]
) -> tuple[dict[str, Lora], dict[str, torch.Tensor]]:
    """({module: (A, B, scale)}, {module: saved base weight}) from the weights file, names
    without PEFT's prefix. peft saves the base weight of an adapted head or embedding
    (``lm_head.base_layer.weight``) beside its adapter; on loading it replaces the model's."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE} (pickled adapter_model.bin is not read)")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for a broken file
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    bases: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        body = key.removeprefix(PREFIX)
        if body.endswith(".base_layer.weight"):
            bases[body.removesuffix(".base_layer.weight")] = tensor.float()
            continue
        for kind in ("lora_A", "lora_B"):
            # PEFT names tensors "<module>.lora_A.weight", in memory "<module>.lora_A.<adapter>.weight"
            if f".{kind}." in body:
                module = body.split(f".{kind}.")[0]
                parts.setdefault(module, {})[kind] = tensor.float()
                break
        else:
            raise AdapterError(f"{path}: tensor {key!r} is not a LoRA A or B matrix")
    out = {}
    for module, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{path}: module {module!r} lacks its lora_A or lora_B")
        rank = ab["lora_A"].shape[0]
        scale = torch.tensor(_scale(config, module, rank))
        out[module] = (ab["lora_A"], ab["lora_B"], scale)
    other = sorted(set(bases) - {"lm_head"})
    if other:
        raise AdapterError(f"{path}: full weights of {other[:3]} (only the head's are read)")
    return out, bases


def _fuse(
    parts: list[Part], found: dict[str, Lora], n_in: int, n_out: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) of one lmforge linear from the adapters of its parts (see the docstring)."""
    present = [p for p in parts if p.name in found]
    a0, _, s0 = found[present[0].name]
    shared = len(present) == len(parts) and all(
        torch.equal(found[p.name][0], a0) and float(found[p.name][2]) == float(s0) for p in present
    )
    if shared:
        return a0, torch.cat([found[p.name][1] for p in parts]), float(s0)
    rank = sum(found[p.name][0].shape[0] for p in present)
    a = torch.zeros(rank, n_in)
    b = torch.zeros(n_out, rank)
    col = 0
    for p in present:
        pa, pb, ps = found[p.name]
        r = pa.shape[0]
        a[col : col + r] = pa
        b[p.start : p.stop, col : col + r] = float(ps) * pb
        col += r
    return a, b, 1.0


def load_peft_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Apply the PEFT LoRA adapter in `folder` to `model` (un-merged, trainable).

    Returns the names of the adapted lmforge layers. Every tensor of the adapter must
    land on a layer: an adapter for another architecture or size is refused.
    """
    folder = Path(folder)
    config = _read_config(folder)
    found, bases = _read_parts(folder, config)
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    used: set[str] = set()
    adapted = []
    for arch in dict.fromkeys([_architecture(model), None]):
        for name in candidates:
            layer = model.get_submodule(name)
            if isinstance(layer, LoRALinear) or not isinstance(layer, nn.Linear):
                continue
            parts = module_parts(model, name, arch)
            if not any(p.name in found for p in parts):
                continue
            a, b, scale = _fuse(parts, found, layer.in_features, layer.out_features)
            if name == "lm_head" and b.shape[0] < layer.out_features:
                # rows the import added for lmforge's special tokens: no update
                b = torch.cat([b, b.new_zeros(layer.out_features - b.shape[0], b.shape[1])])
            _check_shapes(folder, name, layer, a, b)
            if name == "lm_head":
                layer = untie_head(model)
                if "lm_head" in bases:
                    _copy_rows(folder, layer.weight, bases["lm_head"])
            new = LoRALinear(layer, a.shape[0], scale * a.shape[0], config.get("lora_dropout", 0))
            with torch.no_grad():
                new.lora_A.copy_(a)
                new.lora_B.copy_(b)
            _set_module(model, name, new)
            used.update(p.name for p in parts if p.name in found)
            adapted.append(name)
        if used:
            break
    unused = sorted(set(found) - used)
    if unused:
        raise AdapterError(
            f"{folder}: the adapter has layers this model lacks ({', '.join(unused[:3])}"
            f"{', …' if len(unused) > 3 else ''}); was it trained for another architecture?"
        )
    return adapted


def _copy_rows(folder: Path, weight: torch.Tensor, saved: torch.Tensor) -> None:
    """The saved head weight into the model's; rows the import added (lmforge's special
    tokens) keep their values."""
    if saved.shape[1] != weight.shape[1] or saved.shape[0] > weight.shape[0]:
        raise AdapterError(
            f"{folder}: the saved head is {tuple(saved.shape)}, the model's "
            f"{tuple(weight.shape)}: another model size"
        )
    with torch.no_grad():
        weight[: saved.shape[0]].copy_(saved)


def _check_shapes(folder: Path, name: str, layer: nn.Linear, a: torch.Tensor, b: torch.Tensor):
    if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
        raise AdapterError(
            f"{folder}: the adapter of {name} maps {a.shape[1]} → {b.shape[0]} features, "
            f"the model's layer {layer.in_features} → {layer.out_features}: another model size"
        )
