"""Parallel settings side by side on CPU: loss agreement with one process, and speed.

Runs the jobs of tests/test_distributed.py (tiny char-level model on
tinyshakespeare, 20 steps, 256 tokens per step, 1 thread per process): one
process in fp32 as the reference; activation checkpointing and bf16 in one
process; DDP, FSDP2, FSDP2 + bf16, FSDP2 + selective checkpointing and tensor
parallelism (TP = 2) on two processes, FSDP2 + TP (2 × 2 mesh) on four, under
torchrun (gloo). Prints a Markdown table: largest per-step loss difference from
the reference, final loss, median tokens/s (steps 6-20).

    python benchmarks/dist_cpu.py [--steps 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import dist_worker as worker

from lmforge.paths import shared_data

ONE = {
    "1 process, fp32 (reference)": [],
    "1 process, activation checkpointing full": ["train.activation_checkpointing=full"],
    "1 process, activation checkpointing selective": ["train.activation_checkpointing=selective"],
    "1 process, bf16 autocast": ["train.dtype=bf16"],
}
TWO = {
    "2 processes, DDP": [],
    "2 processes, FSDP2": ["train.parallel=fsdp"],
    "2 processes, FSDP2 + bf16 mixed precision": ["train.parallel=fsdp", "train.dtype=bf16"],
    "2 processes, FSDP2 + selective checkpointing": [
        "train.parallel=fsdp",
        "train.activation_checkpointing=selective",
    ],
    "2 processes, TP = 2": ["train.parallel=tp"],
}
FOUR = {
    "4 processes, FSDP2 + TP (mesh dp × tp = 2 × 2)": ["train.parallel=fsdp+tp", "train.tp=2"],
}


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def tokens_per_s(run_dir: Path, skip: int = 5) -> float:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in recs if r["step"] > skip)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--keep", default="", help="keep the runs in this folder")
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="lmforge-dist-"))
    tmp.mkdir(parents=True, exist_ok=True)
    text = (shared_data() / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    tokens = worker.make_tokens(tmp / "tokens", text)
    steps = [f"train.max_steps={args.steps}", "train.checkpoint_every=1000"]

    def job(i: int, overrides: list[str]) -> dict:
        run_dir = tmp / f"run{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        return {"run_dir": str(run_dir), "tokens_dir": str(tokens), "overrides": steps + overrides}

    jobs = {name: job(i, o) for i, (name, o) in enumerate({**ONE, **TWO, **FOUR}.items())}
    t0 = time.perf_counter()
    for name in ONE:
        worker.run_job(jobs[name])
    for nproc, group in ((2, TWO), (4, FOUR)):
        spec = tmp / f"jobs{nproc}.json"
        spec.write_text(json.dumps([jobs[name] for name in group]))
        subprocess.run(
            [*TORCHRUN, f"--nproc_per_node={nproc}", str(worker.__file__), str(spec)],
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            check=True,
            capture_output=True,
        )
    ref = worker.losses(next(iter(jobs.values()))["run_dir"])
    lines = [
        f"| setting | max abs loss difference vs reference ({args.steps} steps) | "
        "final loss | tokens/s (median) |",
        "|---|---:|---:|---:|",
    ]
    for name, j in jobs.items():
        got = worker.losses(j["run_dir"])
        diff = max(abs(got[s] - ref[s]) for s in ref)
        lines.append(
            f"| {name} | {diff:.1e} | {got[args.steps]:.4f} | {tokens_per_s(Path(j['run_dir'])):,.0f} |"
        )
    print("\n".join(lines))
    print(f"\n{torch.__version__}, {time.perf_counter() - t0:.0f} s in all; runs in {tmp}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
