"""A stand-in for nanoGPT's CPU "baby GPT" run, for side-by-side timing.

nanoGPT itself is not a dependency of lmforge, so this file re-implements, from
its published description, what its `train.py` does for

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False \\
        --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 \\
        --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 \\
        --dropout=0.0

- model: GPT-2 blocks (pre-LayerNorm without biases, fused q/k/v projection,
  `scaled_dot_product_attention(is_causal=True)`, exact GELU MLP of width 4C),
  learned positions, tied input/output embeddings, N(0, 0.02) init with the
  residual projections scaled by 1/sqrt(2·n_layer);
- data: the uint16 character ids of tinyshakespeare split 90/10 by position,
  read through a fresh `np.memmap` per batch, 12 random windows of 64 per step,
  the next batch fetched while the current one is in flight;
- optimiser: AdamW (torch's default multi-tensor path on CPU; the fused kernel
  is used only on CUDA), betas (0.9, 0.99), weight decay 0.1 on matrices only,
  lr 1e-3 with 100 warm-up iterations and cosine decay to 1e-4, clip 1.0,
  `zero_grad(set_to_none=True)`, `loss.item()` every iteration (log_interval=1);
- evaluation: every 250 iterations (and at 0), 20 batches of each split.

It prints one JSON line: the median over windows of 25 iterations of ms/iteration
(evaluation excluded, the first window skipped), tokens/s, the final 20-batch validation loss and the wall
time. Used by `benchmarks/baby_gpt_ab.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.gelu = nn.GELU()
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], dtype=torch.long)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class RefRun:
    """nanoGPT's baby-GPT training state: data, model, AdamW, schedule.

    `step(it)` is one timed iteration of nanoGPT's loop (learning rate, forward, next
    batch, backward, clip, update, `loss.item()`); `val_loss()` its 20-batch estimate.
    `benchmarks/baby_gpt_inproc.py` interleaves `step` with lmforge's in one process.
    """

    block, batch = 64, 12

    def __init__(self, data: Path, seed: int = 1337, max_iters: int = 2000):
        torch.manual_seed(seed)
        text = data.read_text(encoding="utf-8")
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        ids = np.array([stoi[c] for c in text], dtype=np.uint16)
        n = int(0.9 * len(ids))
        self.tmp = Path(f"/tmp/nanogpt_ref_{len(ids)}")
        self.tmp.mkdir(exist_ok=True)
        ids[:n].tofile(self.tmp / "train.bin")
        ids[n:].tofile(self.tmp / "val.bin")
        self.max_iters = max_iters
        self.model = GPT(len(chars), self.block, 4, 4, 128)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-3,
            betas=(0.9, 0.99),
        )
        self.X, self.Y = self.get_batch("train")

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.block
        data = np.memmap(self.tmp / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block, (self.batch,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix]
        )
        return x, y

    def lr_at(self, it: int) -> float:
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = (it - 100) / (self.max_iters - 100)
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (1e-3 - 1e-4)

    def set_lr(self, it: int) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(it)

    def step(self) -> None:
        """One iteration at the learning rate `set_lr` gave (nanoGPT sets it first)."""
        loss = self.model(self.X, self.Y)
        self.X, self.Y = self.get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()

    @torch.no_grad()
    def val_loss(self) -> float:
        self.model.eval()
        losses = [self.model(*self.get_batch("val")).item() for _ in range(20)]
        self.model.train()
        return sum(losses) / len(losses)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="tinyshakespeare input.txt")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--eval-interval", type=int, default=250)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    run = RefRun(args.data, args.seed)
    step_ms: list[float] = []
    final_val = float("nan")
    for it in range(args.iters + 1):
        run.set_lr(it)
        if it % args.eval_interval == 0 or it == args.iters:
            final_val = run.val_loss()
            if it == args.iters:
                break
        t0 = time.perf_counter()
        run.step()
        step_ms.append((time.perf_counter() - t0) * 1000)
    # Median over windows of 25 iterations (after the first 25), as lmforge logs them.
    windows = [sum(step_ms[i : i + 25]) / 25 for i in range(25, len(step_ms) - 24, 25)]
    ms = statistics.median(windows or step_ms)
    print(
        json.dumps(
            {
                "trainer": "nanogpt-ref",
                "iters": args.iters,
                "ms_per_iter": ms,
                "mean_ms_per_iter": statistics.fmean(step_ms),
                "tokens_per_s": run.batch * run.block / ms * 1000,
                "val_loss": final_val,
                "wall_s": time.perf_counter() - t_start,
                "threads": torch.get_num_threads(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
