"""Time to quality on tinyshakespeare: wall time to validation 2.72 bits per character.

nanoGPT's CPU baby GPT reaches validation loss 1.886 nats/char (2.72 bits/char)
after 2,000 iterations. This script times whole processes, from the interpreter's
start to its exit, evaluation included:

- lmforge: `lmforge pretrain RECIPE` (default `shakespeare-fast`) in a fresh output
  folder: tokenizer, tokenization, training, the final evaluation over the whole
  validation split (the last 10% of the file, as nanoGPT splits it) and the final
  checkpoint. Bits per character = validation bits per byte (the file is ASCII).
- the anchor (`--anchor`): `benchmarks/nanogpt_ref.py` for its 2,000 iterations,
  evaluation every 250 as nanoGPT does.

Runs alternate (lmforge, anchor, lmforge, ...) so a drifting machine speed
affects both; medians and the per-pair ratio are reported.

    python benchmarks/time_to_quality.py                    # lmforge only, 3 runs
    python benchmarks/time_to_quality.py --anchor --runs 3  # side by side with the anchor
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.paths import shared_data

HERE = Path(__file__).resolve().parent
TARGET_BITS_PER_CHAR = 2.72


def run_lmforge(recipe: str, threads: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lmforge", "pretrain", recipe, f"--output.dir={tmp}/run"]
        cmd += [f"--train.threads={threads}", *(f"--{o}" for o in overrides)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        records = [
            json.loads(line)
            for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    evals = [r for r in records if "val_bpb" in r]
    train = [r for r in records if "tokens_per_s" in r]
    return {
        "wall_s": wall,
        "steps": evals[-1]["step"],
        "bits_per_char": evals[-1]["val_bpb"],
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:] or train),
        "curve": [(r["step"], round(r["val_bpb"], 4)) for r in evals],
    }


def run_anchor(threads: int) -> dict:
    data = shared_data() / "tinyshakespeare" / "input.txt"
    cmd = [sys.executable, str(HERE / "nanogpt_ref.py"), "--data", str(data), "--iters", "2000"]
    cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    res = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": wall, "val_loss_nats": res["val_loss"], "ms_per_iter": res["ms_per_iter"]}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="shakespeare-fast")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--anchor", action="store_true", help="also time the nanoGPT reference")
    ap.add_argument("--override", action="append", default=[], help="config override, a.b=c")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    ours, anchors = [], []
    for i in range(args.runs):
        ours.append(run_lmforge(args.recipe, args.threads, args.override))
        line = (
            f"run {i + 1}: lmforge {ours[-1]['wall_s']:.1f} s, "
            f"{ours[-1]['bits_per_char']:.4f} bits/char at step {ours[-1]['steps']}"
        )
        if args.anchor:
            anchors.append(run_anchor(args.threads))
            line += (
                f"; nanoGPT-ref {anchors[-1]['wall_s']:.1f} s, "
                f"{anchors[-1]['val_loss_nats']:.4f} nats/char"
            )
        print(line, flush=True)
    result: dict = {
        "recipe": args.recipe,
        "overrides": args.override,
        "threads": args.threads,
        "target_bits_per_char": TARGET_BITS_PER_CHAR,
        "lmforge_wall_s": [round(r["wall_s"], 1) for r in ours],
        "lmforge_bits_per_char": [round(r["bits_per_char"], 4) for r in ours],
        "median_lmforge_wall_s": statistics.median(r["wall_s"] for r in ours),
        "all_reach_target": all(r["bits_per_char"] <= TARGET_BITS_PER_CHAR for r in ours),
        "median_tokens_per_s": statistics.median(r["median_tokens_per_s"] for r in ours),
        "curve_last_run": ours[-1]["curve"],
    }
    if anchors:
        result.update(
            anchor_wall_s=[round(a["wall_s"], 1) for a in anchors],
            anchor_val_loss_nats=[round(a["val_loss_nats"], 4) for a in anchors],
            median_anchor_wall_s=statistics.median(a["wall_s"] for a in anchors),
            median_time_ratio=statistics.median(
                o["wall_s"] / a["wall_s"] for o, a in zip(ours, anchors, strict=True)
            ),
        )
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
