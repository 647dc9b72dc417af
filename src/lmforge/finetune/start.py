"""Where fine-tuning starts and what it leaves: the task's data files, the starting
model (an lmforge checkpoint or run, a transformers folder, or a new model), LoRA or
freezing, and the adapter + merged model after LoRA. Shared by supervised fine-tuning
(`finetune.finetune`) and preference tuning (`finetune.preference`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmforge.config import Config, ConfigError
from lmforge.finetune.lora import apply_lora, freeze, merge_lora, save_adapter, trainable_params
from lmforge.finetune.tasks import TaskFormat, record_texts
from lmforge.model.transformer import Transformer
from lmforge.paths import shared_data
from lmforge.tokenizer import Tokenizer, iter_limited, load_tokenizer, train_tokenizer
from lmforge.train.checkpoint import save_checkpoint


def resolve_spec(spec: str) -> str:
    """``shared:REL`` → a path inside the shared data folder; anything else unchanged."""
    if spec.startswith("shared:"):
        return str(shared_data() / spec[len("shared:") :])
    return spec


def task_files(cfg: Config, run_dir: Path) -> dict[str, list[str]]:
    """Train/val/test data specs of the task (code-docstring and creative build their own)."""
    fc = cfg.finetune
    if fc.task == "code-docstring" and not fc.train_files:
        from lmforge.finetune.code_docstring import build_code_docstring

        paths = build_code_docstring(run_dir / "task_data")
        return {s: [str(p)] for s, p in paths.items()}
    if fc.task == "creative" and not fc.train_files:
        from lmforge.finetune.creative import builtin_creative

        return builtin_creative(cfg, run_dir / "task_data")
    if not fc.train_files:
        raise ConfigError(f"finetune.train_files is empty (task '{fc.task}' needs data files)")
    return {
        "train": [resolve_spec(s) for s in fc.train_files],
        "val": [resolve_spec(s) for s in fc.val_files],
        "test": [resolve_spec(s) for s in fc.test_files],
    }


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").exists() and not (p / "trainer_state.json").exists()


def load_start(
    cfg: Config, run_dir: Path, train_specs: list[str], task: TaskFormat
) -> tuple[Transformer, Tokenizer, Config]:
    """The model and tokenizer to fine-tune, and `cfg` with the model's actual shape."""
    init = cfg.finetune.init
    if init and is_hf_folder(init):
        from lmforge.export.hf import load_hf_model

        model, tok, hf_cfg = load_hf_model(init)
        return model, tok, replace(cfg, model=model.cfg, tokenizer=hf_cfg.tokenizer)
    if init:
        from lmforge.model_source import load_model

        model, tok, base_cfg = load_model(init)
        return model, tok, replace(cfg, model=model.cfg, tokenizer=base_cfg.tokenizer)
    # From scratch: the recipe's tokenizer, or one trained on the task's own texts.
    tok_path = run_dir / "tokenizer.json"
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    elif tok_path.exists():
        tok = load_tokenizer(tok_path)
    else:
        texts = record_texts(task, train_specs, cfg.finetune.source_lang, cfg.finetune.target_lang)
        tok = train_tokenizer(
            iter_limited(texts, cfg.tokenizer.train_bytes),
            cfg.tokenizer.kind,
            cfg.tokenizer.vocab_size,
        )
        tok.save(tok_path)
    mcfg = replace(cfg.model, vocab_size=cfg.model.vocab_size or tok.vocab_size)
    torch.manual_seed(cfg.train.seed)
    return Transformer(mcfg), tok, replace(cfg, model=mcfg)


def finetuned_checkpoint(run_dir: str | Path) -> Path:
    """Where the fine-tuned model of a run loads from (`merged/` after LoRA)."""
    run_dir = Path(run_dir)
    return run_dir / "merged" if (run_dir / "merged").exists() else run_dir


def prepare_model(model: Transformer, cfg: Config) -> dict[str, Any]:
    """Apply LoRA or freezing; return what was done (for the summary)."""
    fc = cfg.finetune
    info: dict[str, Any] = {"method": fc.method, "total_params": model.num_params()}
    if fc.method == "lora":
        if not 0.0 <= fc.lora_dropout < 1.0:
            raise ConfigError(f"finetune.lora_dropout = {fc.lora_dropout} must be in [0, 1)")
        info["adapted"] = apply_lora(
            model, fc.lora_targets, fc.lora_rank, fc.lora_alpha, fc.lora_dropout
        )
    if fc.freeze:
        info["frozen"] = len(freeze(model, fc.freeze))
    info["trainable_params"] = trainable_params(model)
    return info


def save_lora_outputs(
    model: Transformer, trainer: Any, cfg: Config, tok: Tokenizer, run_dir: Path
) -> None:
    """After LoRA: the adapter (PEFT's format) and `merged/`, a plain checkpoint with it folded in."""
    save_adapter(model, run_dir / "adapter", base_model=cfg.finetune.init)
    merge_lora(model)
    save_checkpoint(
        run_dir / "merged",
        trainer.step,
        model,
        None,
        {**trainer.state(), "config": _config_dict(cfg)},
        keep_last=1,
        extra_files={"tokenizer.json": tok.to_json().encode("utf-8")},
    )


def _config_dict(cfg: Config) -> dict[str, Any]:
    from lmforge.config import to_dict

    data = to_dict(cfg)
    # The merged model is a plain one: no adapters left to apply when it is loaded.
    data["finetune"]["method"] = "full"
    return data
