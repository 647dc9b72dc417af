"""One GPU benchmark run for `benchmarks/gpu.sh`: throughput/MFU or a loss curve.

Launched by torchrun with one process, so the run goes through exactly the code
a user's `torchrun -m lmforge pretrain` does: `Trainer` → `parallelize` (FSDP2,
bf16 mixed-precision policy, optional per-block compile) → AdamW → clipping.
Only checkpoint writing is switched off (a 1B model's 15 GB of weights and
optimizer state would cost more time than the measurement).

Data are synthetic, so nothing is downloaded: sequences from a fixed random
first-order Markov chain over 4,096 token ids (4 successors per token), drawn
once into a pool and indexed like `TokenLoader` (step, micro-batch, rank), so
every run, bf16 or fp32, sees the same batches. Unlike uniform random tokens
the chain is learnable (entropy floor ln 4 ≈ 1.39 nats), so the loss curves say
something about the numerics.

    python -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/gpu_bench.py \
        throughput --name llama-1b-compile --preset llama-1b --compile --out OUT
    python benchmarks/gpu_bench.py table --out OUT      # Markdown table from OUT/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig, load_config
from lmforge.model.presets import PRESETS
from lmforge.model.transformer import Transformer, count_params
from lmforge.train.dist import dist_info, init_distributed
from lmforge.train.loop import Trainer

CHAIN_VOCAB = 4096  # token ids the chain uses (a prefix of every model's vocabulary)
CHAIN_BRANCHING = 4


class MarkovTokens:
    """A pool of Markov-chain sequences served with `TokenLoader.batch`'s indexing."""

    def __init__(self, n_sequences: int, seq_len: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        successors = rng.integers(0, CHAIN_VOCAB, size=(CHAIN_VOCAB, CHAIN_BRANCHING))
        pool = np.empty((n_sequences, seq_len + 1), dtype=np.int64)
        pool[:, 0] = rng.integers(0, CHAIN_VOCAB, size=n_sequences)
        choice = rng.integers(0, CHAIN_BRANCHING, size=(n_sequences, seq_len))
        for t in range(seq_len):
            pool[:, t + 1] = successors[pool[:, t], choice[:, t]]
        self.pool = torch.from_numpy(pool)
        if torch.cuda.is_available():
            self.pool = self.pool.pin_memory()

    def batch(self, step, micro, micro_batch_size, accum_steps, rank=0, world_size=1):
        global_batch = micro_batch_size * accum_steps * world_size
        first = step * global_batch + (rank * accum_steps + micro) * micro_batch_size
        rows = torch.arange(first, first + micro_batch_size) % len(self.pool)
        data = self.pool[rows]
        return data[:, :-1], data[:, 1:]


class NoCheckpointTrainer(Trainer):
    """The real loop without checkpoint files: the benchmark measures training only."""

    def save(self) -> None:  # type: ignore[override]
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    run_dir = out / "runs" / args.name
    if dist_info().is_main:
        shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends; start clean
    overrides = [
        f"model.preset={args.preset}",
        f"train.dtype={args.dtype}",
        f"train.compile={str(args.compile).lower()}",
        f"train.parallel={args.parallel}",
        f"train.activation_checkpointing={args.ac}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.max_steps={args.steps}",
        f"train.log_every={args.log_every}",
        "train.eval_every=1000000",
        "train.checkpoint_every=1000000",
        f"train.warmup_steps={min(20, args.steps // 10)}",
        f"train.lr={args.lr}",
        f"train.device={args.device}",
        f"output.dir={run_dir}",
        *args.override,
    ]
    if args.context:
        overrides.append(f"model.context_length={args.context}")
    # The context length comes from the preset (or --context); tokens per step follow from it.
    T = args.context or PRESETS[args.preset].get("context_length", ModelConfig.context_length)
    tokens_per_step = args.micro_batch * T * args.accum * dist_info().world_size
    cfg = load_config(None, [*overrides, f"train.tokens_per_step={tokens_per_step}"])
    device = torch.device(args.device if args.device != "auto" else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    init_distributed(device, cfg.train.dist_timeout_s)

    torch.manual_seed(cfg.train.seed)
    # Build on the GPU: initialising a 1B model on the CPU would take longer than the run.
    with device if device.type == "cuda" else torch.device("cpu"):
        model = Transformer(cfg.model)
    n_sequences = max(64, args.steps * tokens_per_step // T) if args.mode == "losses" else 64
    data = MarkovTokens(n_sequences, T, seed=cfg.train.seed)
    trainer = NoCheckpointTrainer(cfg, model, run_dir, data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - t0

    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    train = [r for r in records if "tokens_per_s" in r]
    # Skip the windows that include warm-up (first steps, compilation, allocator growth).
    steady = [r for r in train if r["step"] > args.warmup_steps] or train[-1:]
    row: dict[str, Any] = {
        "name": args.name,
        "mode": args.mode,
        "preset": args.preset,
        "params": count_params(cfg.model)["total"],
        "dtype": args.dtype,
        "compile": bool(args.compile),
        "parallel": args.parallel,
        "activation_checkpointing": args.ac,
        "context": T,
        "micro_batch": args.micro_batch,
        "tokens_per_step": tokens_per_step,
        "steps": summary["step"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "peak_flops": summary["peak_flops"],
        "wall_s": wall,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.mode == "losses":
        row["losses"] = [r["loss"] for r in train]
    if dist_info().is_main:
        with (out / "results.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return row


# ----------------------------------------------------------------------------- table


def table(out: Path) -> str:
    rows = [
        json.loads(line)
        for line in (out / "results.jsonl").read_text().splitlines()
        if line.strip()
    ]
    lines = ["# lmforge GPU benchmark", ""]
    first = next((r for r in rows if "device" in r), {})
    lines += [
        f"Device: {first.get('device', '?')}, torch {first.get('torch', '?')}. "
        "MFU = tokens/s × training FLOPs per token (6N + attention, PaLM convention) / "
        f"peak ({first.get('peak_flops', 0) / 1e12:.4g} TFLOP/s dense bf16). "
        "Medians over the steady-state logging windows.",
        "",
        "## Throughput (bf16, FSDP2 on one device)",
        "",
        "| run | params | compile | context × micro-batch | tokens/s | MFU | peak memory | wall |",
        "|---|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("mode") != "throughput":
            if "error" in r and not r["name"].startswith("loss"):
                lines.append(f"| {r['name']} | — | — | — | failed: {r['error']} | — | — | — |")
            continue
        mem = f"{r['max_memory_gib']:.1f} GiB" if "max_memory_gib" in r else "—"
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.0f}M | {'yes' if r['compile'] else 'no'} | "
            f"{r['context']} × {r['micro_batch']} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.1f}% | {mem} | {r['wall_s']:.0f} s |"
        )
    losses = {r["dtype"]: r for r in rows if r.get("mode") == "losses"}
    lines += ["", "## Loss, bf16 vs fp32 on the same batches", ""]
    if {"bf16", "fp32"} <= losses.keys():
        a, b = losses["bf16"]["losses"], losses["fp32"]["losses"]
        n = min(len(a), len(b))
        diffs = [abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)]
        tail = max(1, n // 4)
        lines += [
            f"{losses['bf16']['preset']}, {n} steps, {losses['bf16']['tokens_per_step']:,} tokens "
            "per step (Markov-chain tokens; entropy floor 1.39 nats).",
            "",
            "| step | bf16 loss | fp32 loss | difference |",
            "|---:|---:|---:|---:|",
        ]
        for s in sorted({1, n // 4, n // 2, 3 * n // 4, n} - {0}):
            lines.append(f"| {s} | {a[s - 1]:.4f} | {b[s - 1]:.4f} | {a[s - 1] - b[s - 1]:+.4f} |")
        mean_a = sum(a[n - tail : n]) / tail
        mean_b = sum(b[n - tail : n]) / tail
        lines += [
            "",
            f"Mean loss over the last {tail} steps: bf16 {mean_a:.4f}, fp32 {mean_b:.4f} "
            f"(ratio {mean_a / mean_b:.4f}); largest per-step difference {max(diffs):.4f}. "
            f"Speed: bf16 {losses['bf16']['tokens_per_s']:,.0f} tokens/s, "
            f"fp32 {losses['fp32']['tokens_per_s']:,.0f} tokens/s.",
        ]
    else:
        failed = [r for r in rows if r["name"].startswith("loss") and "error" in r]
        lines.append(
            "Missing: " + (", ".join(f"{r['name']} ({r['error']})" for r in failed) or "not run")
        )
    text = "\n".join(lines) + "\n"
    (out / "gpu.md").write_text(text)
    return text


# The dry run: the same runs, tiny, on CPU, in one process (each process start costs
# ~15 s of `import torch` on a shared CPU machine). Compilation is left out: inductor's
# C++ compile takes minutes there; tests/test_distributed.py checks compile separately.
_TINY = [
    "--device",
    "cpu",
    "--override",
    "model.vocab_size=4096",
    "--override",
    "train.peak_flops=1e11",
    "--context",
    "64",
]
DRY_RUN = {
    "gpt2-eager": [
        "throughput",
        "--preset",
        "cpu-tiny",
        "--micro-batch",
        "2",
        "--steps",
        "8",
        "--warmup-steps",
        "4",
        "--log-every",
        "2",
    ],
    "llama-1b-eager": [
        "throughput",
        "--preset",
        "cpu-llama-small",
        "--micro-batch",
        "2",
        "--accum",
        "2",
        "--steps",
        "8",
        "--warmup-steps",
        "4",
        "--log-every",
        "2",
    ],
    "loss-bf16": [
        "losses",
        "--dtype",
        "bf16",
        "--preset",
        "cpu-tiny",
        "--micro-batch",
        "4",
        "--steps",
        "20",
    ],
    "loss-fp32": [
        "losses",
        "--dtype",
        "fp32",
        "--preset",
        "cpu-tiny",
        "--micro-batch",
        "4",
        "--steps",
        "20",
    ],
}


def dry_run(out: str) -> int:
    (Path(out) / "results.jsonl").unlink(missing_ok=True)
    for name, argv in DRY_RUN.items():
        main([*argv, *_TINY, "--name", name, "--out", out])
    print(table(Path(out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["throughput", "losses", "table", "dry-run"])
    p.add_argument("--out", required=True, help="folder for results.jsonl, runs/ and gpu.md")
    p.add_argument("--name", default="run")
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--parallel", default="fsdp", choices=["ddp", "fsdp"])
    p.add_argument("--ac", default="none", choices=["none", "full", "selective"])
    p.add_argument("--context", type=int, default=0, help="0 = the preset's context length")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=10, help="left out of the medians")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--device", default="auto", help="auto (= cuda) or cpu (dry run)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (dry run)")
    p.add_argument("--override", action="append", default=[], help="extra config overrides")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "dry-run":
        return dry_run(args.out)
    if args.mode == "table":
        print(table(out))
        return 0
    if args.mode == "losses":
        args.log_every, args.warmup_steps = 1, 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
