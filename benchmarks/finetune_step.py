"""Tokens/s of a LoRA step and of a DPO step against a plain training step of the same model.

All three are `Trainer.train_step` of the real training loop on the same model shape
(the quickstart's, by default), the same optimizer and precision, and the same rows per
micro-batch, so each step processes the same number of tokens:

- plain: every weight trains on (B, T) next-token rows;
- LoRA: `finetune.method=lora` on the default targets, base weights frozen (not copied);
- DPO: `finetune.objective=dpo`, B/2 pairs (chosen and rejected rows) a micro-batch,
  with the reference log-probabilities computed once beforehand and cached in the
  batches, as `lmforge finetune` does.

Steps are interleaved in rounds (plain, LoRA, DPO, plain, ...) in one process, so a
drift of the machine's speed touches the three alike; the figure is the median step
time and the ratio to plain (1.0 = as fast as a plain step).

    python benchmarks/finetune_step.py --rounds 7 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.finetune.preference import (
    PairSource,
    PreferenceLM,
    PreferenceLoss,
    PreferenceTrainer,
    reference_logps,
)
from lmforge.finetune.start import prepare_model
from lmforge.finetune.tasks import Example
from lmforge.model.transformer import Transformer
from lmforge.shards import SampleBatches
from lmforge.train.loop import Trainer


class RandomRows(SampleBatches):
    """Next-token rows of random ids, the same for the same sample numbers."""

    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len

    def samples(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(first)
        rows = torch.randint(0, self.vocab, (n, self.seq_len + 1), generator=g)
        return rows[:, :-1], rows[:, 1:]


def random_pairs(vocab: int, seq_len: int, n: int, prompt: int) -> list[tuple[Example, Example]]:
    """`n` pairs of full-length rows: a shared prompt, then two different answers."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(n):
        head = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        rows = []
        for _ in range(2):
            ids = head + torch.randint(0, vocab, (seq_len + 1 - prompt,), generator=g).tolist()
            rows.append(Example(ids, [False] * prompt + [True] * (seq_len + 1 - prompt), prompt))
        pairs.append((rows[0], rows[1]))
    return pairs


def trainers(cfg, work: Path) -> dict[str, Trainer]:
    vocab, seq = cfg.model.vocab_size, cfg.model.context_length
    torch.manual_seed(cfg.train.seed)
    base = Transformer(cfg.model)
    out: dict[str, Trainer] = {}
    out["plain"] = Trainer(cfg, copy.deepcopy(base), work / "plain", RandomRows(vocab, seq))

    lora_cfg = replace(cfg, finetune=replace(cfg.finetune, method="lora"))
    lora = copy.deepcopy(base)
    prepare_model(lora, lora_cfg)
    out["lora"] = Trainer(
        replace(lora_cfg, model=lora.cfg), lora, work / "lora", RandomRows(vocab, seq)
    )

    dpo_cfg = replace(cfg, finetune=replace(cfg.finetune, objective="dpo"))
    source = PairSource(random_pairs(vocab, seq, 64, seq // 4), seq, 0, cfg.train.seed)
    dpo = copy.deepcopy(base)
    source.ref[:] = reference_logps(dpo, source, cfg.train.micro_batch_size // 2)
    lm = PreferenceLM(dpo, PreferenceLoss.from_config(dpo_cfg))
    out["dpo"] = PreferenceTrainer(dpo_cfg, lm, work / "dpo", source)
    return out


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps of each kind per round")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    args = ap.parse_args()
    cfg = load_config(args.recipe, ["model.vocab_size=4096", *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        runs = trainers(cfg, Path(tmp))
        for trainer in runs.values():  # warm-up: first-step allocations and kernel choice
            trainer.train_model.train()
            trainer.train_step()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, trainer in runs.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                times[name].append((time.perf_counter() - t0) / args.steps)
    tokens = cfg.train.tokens_per_step
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "shape": {
            "n_layers": cfg.model.n_layers,
            "d_model": cfg.model.d_model,
            "context": cfg.model.context_length,
            "tokens_per_step": tokens,
            "dtype": cfg.train.dtype,
            "optimizer": cfg.train.optimizer,
        },
        "step_ms": {name: round(1000 * m, 1) for name, m in med.items()},
        "tokens_per_s": {name: round(tokens / m) for name, m in med.items()},
        "time_over_plain": {name: round(m / med["plain"], 3) for name, m in med.items()},
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
