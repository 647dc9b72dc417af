"""Training throughput and quality on nanoGPT's CPU "baby GPT" shape.

Shape (nanoGPT `config/train_shakespeare_char.py` with its CPU command line):
char-level tinyshakespeare split 90/10 by position, 4 layers, 4 heads, width 128,
context 64, batch 12, dropout 0, lr 1e-3 → 1e-4 cosine over 2,000 iterations,
warm-up 100, beta2 0.99, weight decay 0.1, clip 1.0.

In one run it measures this machine's matmul peak (fp32 and bf16, 2048³,
median) and then trains, reporting the median ms/iteration over log intervals,
tokens/s, MFU against the peak of the precision used, and the validation loss
(nats/char) over the whole validation split at the end.

    python benchmarks/train_throughput.py                  # fp32, 2,000 iterations
    python benchmarks/train_throughput.py --dtype bf16
    python benchmarks/train_throughput.py --iters 300      # throughput only

It reports no speed-up: a speed-up is only meaningful against the anchor run
side by side on the same machine, which `benchmarks/baby_gpt_ab.py` (process
against process) and `benchmarks/baby_gpt_inproc.py` (interleaved in one process)
do. nanoGPT's published validation loss at 2,000 iterations (1.886) is printed
beside ours because a loss, unlike a time, does not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.hardware import measure_matmul_peak
from lmforge.model.transformer import flops_per_token
from lmforge.paths import shared_data
from lmforge.pretrain import pretrain

NANOGPT_VAL_LOSS = 1.886


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul peaks (no MFU)")
    ap.add_argument("--override", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.no_peak:
        peaks = {"fp32": float("nan"), "bf16": float("nan")}
    else:
        peaks = {
            "fp32": measure_matmul_peak(torch.float32, 2048, 2.0),
            "bf16": measure_matmul_peak(torch.bfloat16, 2048, 2.0),
        }
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            "shakespeare-char",
            [
                f"data.sources=[{shared_data() / 'tinyshakespeare' / 'input.txt'}]",
                f"train.max_steps={args.iters}",
                f"train.dtype={args.dtype}",
                f"train.compile={str(args.compile).lower()}",
                "train.log_every=25",
                f"train.eval_every={args.iters}",
                "train.eval_tokens=200000",  # the whole validation split
                f"train.checkpoint_every={args.iters}",
                f"train.peak_flops={peaks[args.dtype] if not args.no_peak else 1e11}",
                f"output.dir={tmp}/run",
                *args.override,
            ],
        )
        t0 = time.perf_counter()
        summary = pretrain(cfg)
        wall = time.perf_counter() - t0
        records = [
            json.loads(line)
            for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][
        1:
    ]  # skip the warm-up interval
    tok_s = statistics.median(rates)
    tokens_per_iter = cfg.train.tokens_per_step
    ms_per_iter = 1000 * tokens_per_iter / tok_s
    mcfg = load_config("shakespeare-char").model
    mcfg.vocab_size = 72  # tinyshakespeare's 65 characters + 7 reserved specials
    fpt = flops_per_token(mcfg, mcfg.context_length)
    result = {
        "dtype": args.dtype,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "peak_gflops_fp32": peaks["fp32"] / 1e9,
        "peak_gflops_bf16": peaks["bf16"] / 1e9,
        "median_ms_per_iter": ms_per_iter,
        "median_tokens_per_s": tok_s,
        "mfu_vs_own_peak": tok_s * fpt / peaks[args.dtype],
        "mfu_vs_fp32_peak": tok_s * fpt / peaks["fp32"],
        "val_loss": summary.get("val_loss"),
        "nanogpt_val_loss_2000": NANOGPT_VAL_LOSS,
        "wall_s": wall,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
