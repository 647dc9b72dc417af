"""How much of a training step the token loader takes, in real `lmforge pretrain` runs.

    python benchmarks/loader_overhead.py [--steps 400] [--quick-steps 40] [--workdir /tmp/...]

The Trainer logs ``data_ms`` (time in ``train_data.batch`` plus the copy to the device,
per optimizer step) and ``data_frac`` (that time over the wall time of the logging
interval, evaluation excluded) in ``metrics.jsonl``. This script runs two shapes:

- ``shakespeare-char``: nanoGPT's baby GPT (batch 12 × context 64, char level);
- ``quickstart``: the quickstart recipe's model (batch 16 × context 256, BPE 4096,
  2 micro-batches per step), on its own corpus;

and reports the median over log lines (the first line, with warm-up, left out). It also
times ``TokenLoader.batch`` against the row-by-row gather it replaced, interleaved, on
the baby-GPT shape's shards (µs per micro-batch, median of rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.shards import TokenLoader, first_sample


def run(recipe: str, out: Path, steps: int, log_every: int, extra: list[str]) -> list[dict]:
    cmd = [
        sys.executable, "-m", "lmforge", "pretrain", recipe, f"--output.dir={out}",
        f"--train.max_steps={steps}", f"--train.log_every={log_every}",
        f"--train.eval_every={steps}", f"--train.checkpoint_every={steps}",
        "--train.max_time_s=0", *extra,
    ]  # fmt: skip
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "data_frac" in r]


def row_by_row(loader: TokenLoader, step: int, micro: int, b: int, accum: int):
    """The gather `TokenLoader.batch` used before: one `sample` per row, then a stack."""
    first = first_sample(step, micro, b, accum)
    data = torch.from_numpy(np.stack([loader.sample(first + i) for i in range(b)]))
    return data[:, :-1], data[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--quick-steps", type=int, default=40)
    ap.add_argument("--workdir", default="/tmp/lmforge-loader-overhead")
    args = ap.parse_args()
    work = Path(args.workdir)
    shapes = {
        "shakespeare-char": ("shakespeare-char", args.steps, 50, []),
        "quickstart": ("quickstart", args.quick_steps, 5, ["--train.tensorboard=false"]),
    }
    results = {}
    for name, (recipe, steps, every, extra) in shapes.items():
        recs = run(recipe, work / name, steps, every, extra)[1:]
        frac = statistics.median(r["data_frac"] for r in recs)
        ms = statistics.median(r["data_ms"] for r in recs)
        tok_s = statistics.median(r["tokens_per_s"] for r in recs)
        step_ms = statistics.median(r["data_ms"] / max(r["data_frac"], 1e-12) for r in recs)
        print(
            f"{name}: loader {ms:.3f} ms/step of {step_ms:.1f} ms/step = {100 * frac:.2f}% "
            f"({tok_s / 1000:.1f}k tokens/s, {len(recs)} log lines)"
        )
        results[name] = {"data_frac": frac, "data_ms": ms, "step_ms": step_ms}

    loader = TokenLoader(work / "shakespeare-char" / "tokens", "train", 64, 1337)
    times: dict[str, list[float]] = {"vectorised": [], "row-by-row": []}
    fns = {"vectorised": loader.batch, "row-by-row": lambda *a: row_by_row(loader, *a)}
    for r in range(7):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for s in range(500):
                fn(r * 500 + s, 0, 12, 1)
            times[k].append((time.perf_counter() - t0) / 500 * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"TokenLoader.batch (12 × 65): vectorised {med['vectorised']:.1f} µs, "
        f"row-by-row {med['row-by-row']:.1f} µs "
        f"({med['row-by-row'] / med['vectorised']:.1f}× faster)"
    )
    results["batch_us"] = med
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
