"""LoRA (Hu et al. 2021, arXiv:2106.09685): the layers (`lmforge.finetune.lora_layers`,
re-exported here) and the adapter files, in PEFT's format (`lmforge.finetune.peft_format`).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from lmforge.finetune.lora_layers import (  # noqa: F401  (the layers, re-exported)
    LORA_TARGETS,
    LoRALinear,
    _hit,
    _matches,
    _set_module,
    apply_lora,
    freeze,
    lora_state,
    merge_lora,
    trainable_params,
    untie_head,
)
from lmforge.finetune.peft_format import is_peft_adapter, load_peft_adapter, save_peft_adapter


def save_adapter(model: nn.Module, folder: str | Path, base_model: str = "") -> Path:
    """Write the adapter in PEFT's format (`lmforge.finetune.peft_format`): only A and B."""
    dropouts = [
        getattr(m.lora_dropout, "p", 0.0) for m in model.modules() if isinstance(m, LoRALinear)
    ]
    return save_peft_adapter(model, folder, base_model, max(dropouts, default=0.0))


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply the adapter saved in `folder` to a base model (un-merged).

    Reads PEFT's format (lmforge's own adapters, or one `peft` trained elsewhere) and,
    for one release, the earlier lmforge format (``adapter.safetensors``)."""
    folder = Path(folder)
    if is_peft_adapter(folder):
        load_peft_adapter(model, folder)
        return model
    config = json.loads((folder / "adapter_config.json").read_text())
    apply_lora(model, config["targets"], config["rank"], config["alpha"])
    state = load_file(str(folder / "adapter.safetensors"))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"{folder}: adapter has tensors the model lacks: {result.unexpected_keys[:5]}"
        )
    return model
