"""lmforge against nanoGPT on the baby-GPT shape, side by side: tokens/s ratio.

Runs `benchmarks/nanogpt_ref.py` (a re-implementation of nanoGPT's CPU baby-GPT
training loop) and `lmforge pretrain shakespeare-char` (exactly that model, batch
and schedule, the recipe's defaults) in turn, A B A B ...,
each in a fresh process, and reports each side's median ms/iteration over
25-iteration windows (the first left out) and the ratio pair by pair, so that a
drifting machine speed cancels out of the comparison.

    python benchmarks/baby_gpt_ab.py                       # 5 pairs of 300 iterations, 2 threads
    python benchmarks/baby_gpt_ab.py --lmforge-arg=--train.cpu_processes=2   # 2 processes of 1 thread
    python benchmarks/baby_gpt_ab.py --also compiled=--train.compile=true   # a third arm

`--also NAME=FLAGS` (repeatable; FLAGS split at spaces) adds lmforge runs with those
extra flags to every round, A B C ..., so that two lmforge settings are compared
with each other side by side too, not only each with nanoGPT in separate runs.

On a shared machine whose speed changes within a second, rounds of whole processes
swing widely (1.1–2.2× on one run); `baby_gpt_inproc.py` interleaves the two
trainers every few iterations inside one process, for effects of a few percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.paths import shared_data

HERE = Path(__file__).resolve().parent


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    # Both scripts print their result as the last JSON object of their output.
    start = out.rfind("\n{") + 1 if out.rstrip().endswith("}") else -1
    if start < 0:
        raise RuntimeError(f"no JSON result from {' '.join(cmd)}:\n{out[-2000:]}")
    return json.loads(out[start:])


def run_lmforge(iters: int, threads: int, extra: list[str]) -> float:
    """Median ms/iteration of `lmforge pretrain shakespeare-char` for `iters` iterations."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lmforge", "pretrain", "shakespeare-char"]
        cmd += [f"--output.dir={tmp}/run", f"--train.max_steps={iters}", "--train.log_every=25"]
        cmd += [f"--train.eval_every={iters}", f"--train.checkpoint_every={iters}"]
        cmd += ["--train.peak_flops=1e11", *extra]
        if threads and not any(a.startswith("--train.threads") for a in extra):
            cmd.append(f"--train.threads={threads}")
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        records = [
            json.loads(line)
            for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return 1000 * 768 / statistics.median(rates)  # 768 tokens per iteration


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--lmforge-arg",
        action="append",
        default=[],
        help="extra `lmforge pretrain` flag, e.g. --train.cpu_processes=1",
    )
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="another lmforge arm in every round, e.g. compiled=--train.compile=true",
    )
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    arms: dict[str, list[str]] = {}
    for spec in args.also:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            ap.error(f"--also {spec!r}: expected NAME=FLAGS")
        arms[name] = [*args.lmforge_arg, *flags.split()]
    data = shared_data() / "tinyshakespeare" / "input.txt"
    ref_cmd = [sys.executable, str(HERE / "nanogpt_ref.py"), "--data", str(data)]
    ref_cmd += ["--iters", str(args.iters), "--threads", str(args.threads)]
    pairs = []
    extra: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(args.pairs):
        ref = run_json(ref_cmd)
        ours = run_lmforge(args.iters, args.threads, args.lmforge_arg)
        pairs.append((ref["ms_per_iter"], ours))
        line = (
            f"pair {i + 1}: nanoGPT-ref {pairs[-1][0]:.1f} ms/iter, lmforge {pairs[-1][1]:.1f} "
            f"ms/iter, speed-up {pairs[-1][0] / pairs[-1][1]:.2f}×"
        )
        for name, flags in arms.items():
            extra[name].append(run_lmforge(args.iters, args.threads, flags))
            line += (
                f"; {name} {extra[name][-1]:.1f} ms/iter ({pairs[-1][0] / extra[name][-1]:.2f}×)"
            )
        print(line, flush=True)
    result = {
        "iters": args.iters,
        "threads": args.threads,
        "lmforge_args": args.lmforge_arg,
        "nanogpt_ref_ms_per_iter": [round(a, 2) for a, _ in pairs],
        "lmforge_ms_per_iter": [round(b, 2) for _, b in pairs],
        "median_nanogpt_ref_ms": statistics.median(a for a, _ in pairs),
        "median_lmforge_ms": statistics.median(b for _, b in pairs),
        "median_speedup": statistics.median(a / b for a, b in pairs),
        "min_speedup": min(a / b for a, b in pairs),
        "max_speedup": max(a / b for a, b in pairs),
    }
    for name, times in extra.items():
        ref_times = [a for a, _ in pairs]
        result[name] = {
            "flags": arms[name],
            "ms_per_iter": [round(x, 2) for x in times],
            "median_speedup": statistics.median(
                a / x for a, x in zip(ref_times, times, strict=True)
            ),
            # > 1: this arm is faster than the default lmforge arm, round by round
            "median_vs_lmforge": statistics.median(
                b / x for (_, b), x in zip(pairs, times, strict=True)
            ),
        }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
