"""`lmforge quickstart`: `lmforge run quickstart` plus a short account of what was made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.config import load_config
from lmforge.run import run_recipe
from lmforge.train.dist import print0

# How long the quickstart takes, quoted the same wherever it appears (README, docs,
# `lmforge quickstart --help`, the recipe); tests/test_quickstart_duration.py checks.
# Measured: 7 min 53 s for `lmforge run quickstart` on a quiet 2-core machine
# (BENCHMARKS.md, "Quickstart").
DURATION = "about 7–8 minutes on two CPU cores"


def quickstart(overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config("quickstart", overrides)
    state = run_recipe(None, cfg=cfg)
    run_dir = Path(cfg.output.dir)
    pre = json.loads((run_dir / "pretrain" / "summary.json").read_text())
    ratio = pre["val_bpb"] / pre["unigram_bpb"]
    samples = (
        json.loads((run_dir / "eval" / "samples.json").read_text())
        if (run_dir / "eval" / "samples.json").exists()
        else {}
    )
    sep = "\n" + "-" * 60 + "\n"
    for label, texts in samples.items():
        print0(f"\nsamples from the {label} model:" + sep + sep.join(texts) + sep)
    print0(
        f"validation: {pre['val_bpb']:.3f} bits/byte; unigram baseline {pre['unigram_bpb']:.3f} "
        f"bits/byte ({100 * ratio:.0f}% of the baseline)"
    )
    ft = (state.get("finetune") or {}).get("summary") or {}
    if ft.get("test"):
        print0(
            "fine-tuned (code → docstring), test: "
            + ", ".join(f"{k} {v:.2f}" for k, v in ft["test"].items() if k != "seconds")
        )
    print0(f"made in {run_dir}/:")
    rows = [
        ("tokenizer/", "BPE tokenizer (tokenizer.json)"),
        ("tokens/", "train/val token shards"),
        ("pretrain/", "checkpoints, metrics.jsonl, summary.json"),
        ("finetune/", "the fine-tuned model (code → docstring) and its test outputs"),
        ("eval/", "eval.json and samples.json"),
        ("bias/", "bias audit (bias.json)"),
        ("export/hf/", "a transformers folder (AutoModelForCausalLM.from_pretrained)"),
        ("report.html", "the report card (also report.md)"),
    ]
    for name, what in rows:
        if (run_dir / name.rstrip("/")).exists():
            print0(f"  {name:<14} {what}")
    print0(
        f"next: open {run_dir / 'report.html'}, or lmforge generate --checkpoint {run_dir / 'pretrain'} --prompt 'def '"
    )
    return state
