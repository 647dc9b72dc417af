"""Training MFU of a ~30M-parameter model on this CPU, against a peak measured in the same run.

The model: GPT-2 style, 8 layers, width 512, 8 heads, context 256, vocabulary
8,192 (29.4M parameters, tied embeddings), trained by lmforge's `Trainer` (the
loop every recipe uses; checkpoint files switched off) on synthetic Markov-chain
tokens (`gpu_bench.MarkovTokens`, so nothing is read from disk). The matmul
peak of the precision used is measured (2048³, median) just before and just
after training; MFU is reported against the higher of the two, the conservative
choice. Training FLOPs per token = 6N + attention (PaLM convention,
`lmforge.model.transformer.flops_per_token`).

    python benchmarks/mfu_cpu.py                  # fp32, 2 threads
    python benchmarks/mfu_cpu.py --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import MarkovTokens, NoCheckpointTrainer

from lmforge.config import load_config
from lmforge.hardware import measure_matmul_peak
from lmforge.model.transformer import Transformer, count_params, flops_per_token


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--override", action="append", default=[], help="extra config override")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    context = 256
    overrides = [
        "model.vocab_size=8192",
        f"model.context_length={context}",
        "model.n_layers=8",
        "model.d_model=512",
        "model.n_heads=8",
        f"train.dtype={args.dtype}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.tokens_per_step={args.micro_batch * args.accum * context}",
        f"train.max_steps={args.steps}",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
        "train.peak_flops=1e11",  # placeholder: MFU is computed here from measured peaks
        *args.override,
    ]
    peak_before = measure_matmul_peak(dtype, 2048, 3.0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*overrides, f"output.dir={tmp}/run"])
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        data = MarkovTokens(64, context, seed=0)
        trainer = NoCheckpointTrainer(cfg, model, Path(tmp) / "run", data, log=lambda *_: None)
        trainer.fit()
        records = [
            json.loads(line)
            for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    peak_after = measure_matmul_peak(dtype, 2048, 3.0)
    peak = max(peak_before, peak_after)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]  # skip warm-up
    tok_s = statistics.median(rates)
    fpt = flops_per_token(cfg.model, context)
    result = {
        "params": count_params(cfg.model)["total"],
        "dtype": args.dtype,
        "threads": args.threads,
        "tokens_per_step": cfg.train.tokens_per_step,
        "steps_measured": len(rates),
        "median_tokens_per_s": tok_s,
        "achieved_gflops": tok_s * fpt / 1e9,
        "peak_gflops_before": peak_before / 1e9,
        "peak_gflops_after": peak_after / 1e9,
        "mfu": tok_s * fpt / peak,
        "mfu_range": [min(rates) * fpt / peak, max(rates) * fpt / peak],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
