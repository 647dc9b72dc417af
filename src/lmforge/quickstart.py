"""`lmforge quickstart`: the whole core slice on the built-in corpus, offline, on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.config import load_config
from lmforge.model.generate import generate
from lmforge.pretrain import load_model, pretrain, run_dir_of
from lmforge.train.dist import print0


def write_samples(
    checkpoint: Path, prompts: list[str], n: int, max_tokens: int, temperature: float, top_k: int
) -> list[str]:
    model, tok, _cfg = load_model(checkpoint)
    samples = []
    for i in range(n):
        prompt = prompts[i % len(prompts)] if prompts else ""
        ids = tok.encode(prompt) if prompt else [tok.eot_id]
        out = generate(
            model,
            ids,
            max_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=i,
            stop_ids=[tok.eot_id],
        )
        text = tok.decode([t for t in out[0].tolist()[len(ids) :] if t != tok.eot_id])
        samples.append(prompt + text)
    return samples


def quickstart(overrides: list[str] | None = None, resume: str = "auto") -> dict[str, Any]:
    cfg = load_config("quickstart", overrides)
    run_dir = run_dir_of(cfg)
    print0(f"lmforge quickstart → {run_dir}/")
    summary = pretrain(cfg, resume=resume)
    ckpt = run_dir / "checkpoints"
    samples = write_samples(
        run_dir,
        cfg.eval.prompts,
        cfg.eval.samples,
        cfg.eval.sample_tokens,
        cfg.eval.temperature,
        cfg.eval.top_k,
    )
    sep = "\n" + "=" * 60 + "\n"
    (run_dir / "samples.txt").write_text(sep.join(samples) + "\n")
    summary["samples"] = samples
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))

    ratio = summary["val_bpb"] / summary["unigram_bpb"]
    print0(sep.join(["", *samples, ""]))
    print0(
        f"validation: {summary['val_bpb']:.3f} bits/byte; unigram baseline {summary['unigram_bpb']:.3f} "
        f"bits/byte ({100 * ratio:.0f}% of the baseline)"
    )
    print0(f"made in {run_dir}/:")
    print0(f"  tokenizer.json       BPE tokenizer ({cfg.tokenizer.vocab_size} tokens)")
    print0("  tokens/              train/val token shards")
    print0(
        f"  checkpoints/         {len(list(ckpt.glob('step_*')))} checkpoint(s), newest at step {summary['step']}"
    )
    print0("  metrics.jsonl        loss, learning rate, tokens/s, MFU, validation bits/byte")
    print0("  samples.txt          generated samples")
    print0(f"next: lmforge generate --checkpoint {run_dir} --prompt 'def '")
    return summary
