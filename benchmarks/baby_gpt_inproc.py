"""lmforge against nanoGPT on the baby-GPT shape, interleaved inside one process.

`baby_gpt_ab.py` alternates whole processes of ≈ 10 s each. On these shared machines
the speed changes within a second or two (one 400-step lmforge run logged 25-step
windows from 24 to 35 ms), so a pair of processes seldom sees the same machine and
its ratio swings from 1.05 to 1.85. Here both trainers live in one process and take
turns in windows of `--window` iterations, in random order each round: each round's
ratio compares two windows a second apart.

- lmforge: the `shakespeare-char` recipe as `lmforge pretrain` builds it
  (`setup_pretrain`: tokenizer, shards, model, loaders, `Trainer`), driven by
  `Trainer.train_step` — the loop body `fit` runs, without its logs, evaluations
  and checkpoints (none of which fall inside the timed windows of a real run either).
- nanoGPT: `nanogpt_ref.RefRun.step`, the loop body of `nanogpt_ref.py`.

Both get lmforge's allocator settings (`tune_malloc`, which the `lmforge` command
applies and a plain nanoGPT process does not have): that makes nanoGPT faster
than in its own process (fewer page faults), so the ratio here understates the
process-against-process one and measures the training code alone.

    python benchmarks/baby_gpt_inproc.py --rounds 200 --window 5
    python benchmarks/baby_gpt_inproc.py --override train.compile=true
    python benchmarks/baby_gpt_inproc.py --also compiled=train.compile=true   # a third arm
    python benchmarks/baby_gpt_inproc.py --torch-attention-arm   # the C kernel's worth

`--also NAME=KEY=VALUE[,KEY=VALUE...]` (repeatable) adds another lmforge trainer with
those overrides to every round, so two lmforge settings meet the same machine too.
`--torch-attention-arm` adds one more, the recipe with `lmforge.kernels` switched
off during its turns (what ``LMFORGE_KERNELS=0`` gives: attention as torch ops).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--window", type=int, default=25, help="iterations per turn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=30, help="iterations of each, untimed")
    ap.add_argument("--seed", type=int, default=0, help="order of the turns")
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for lmforge, e.g. train.dtype=bf16",
    )
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="another lmforge arm, overrides comma-separated, e.g. compiled=train.compile=true",
    )
    ap.add_argument(
        "--torch-attention-arm",
        action="store_true",
        help="add an arm without lmforge's C kernels (attention as torch operators)",
    )
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    extra_arms: dict[str, list[str]] = {}
    for spec in args.also:
        name, sep, overrides = spec.partition("=")
        if not sep or not name or name in ("nanogpt_ref", "lmforge"):
            ap.error(f"--also {spec!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
        extra_arms[name] = [o for o in overrides.split(",") if o]
    if args.torch_attention_arm:
        extra_arms["torch_attention"] = []

    from lmforge.malloc import tune_malloc

    tune_malloc()
    import torch
    from nanogpt_ref import RefRun

    from lmforge.config import load_config
    from lmforge.paths import shared_data
    from lmforge.pretrain import setup_pretrain

    torch.set_num_threads(args.threads)
    iters = args.warmup + args.rounds * args.window
    ref = RefRun(shared_data() / "tinyshakespeare" / "input.txt", max_iters=max(iters, 2000))
    with tempfile.TemporaryDirectory() as tmp:

        def trainer_for(name: str, extra: list[str]):
            overrides = [
                f"output.dir={tmp}/{name}",
                f"train.threads={args.threads}",
                f"train.max_steps={max(iters, 2000)}",
                *args.override,
                *extra,
            ]
            trainer = setup_pretrain(load_config("shakespeare-char", overrides)).trainer
            trainer.train_model.train()
            return trainer

        trainers = {"lmforge": trainer_for("lmforge", [])}
        for name, extra in extra_arms.items():
            trainers[name] = trainer_for(name, extra)
        ref_it = 0

        def run_ref(n: int) -> None:
            nonlocal ref_it
            for _ in range(n):
                ref.set_lr(ref_it)
                ref.step()
                ref_it += 1

        from lmforge import kernels

        def runner(trainer, without_kernels: bool = False):
            def run(n: int) -> None:
                saved = kernels._kernels, kernels._tried
                if without_kernels:  # as if LMFORGE_KERNELS=0 (they are looked up per call)
                    kernels._kernels, kernels._tried = None, True
                try:
                    for _ in range(n):
                        trainer.train_step()
                finally:
                    kernels._kernels, kernels._tried = saved

            return run

        arms = {
            "nanogpt_ref": run_ref,
            **{name: runner(t, name == "torch_attention") for name, t in trainers.items()},
        }
        for run in arms.values():
            run(args.warmup)
        ms: dict[str, list[float]] = {name: [] for name in arms}
        order_rng = random.Random(args.seed)
        for r in range(args.rounds):
            order = list(arms)
            order_rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                arms[name](args.window)
                ms[name].append((time.perf_counter() - t0) * 1000 / args.window)
            line = f"round {r + 1}: nanoGPT-ref {ms['nanogpt_ref'][-1]:.1f} ms/iter"
            for name in trainers:
                line += f", {name} {ms[name][-1]:.1f} ({ms['nanogpt_ref'][-1] / ms[name][-1]:.2f}×)"
            print(line, flush=True)
        dtype = trainers["lmforge"].cfg.train.dtype
    ratios = sorted(a / b for a, b in zip(ms["nanogpt_ref"], ms["lmforge"], strict=True))
    q = statistics.quantiles(ratios, n=4)
    result = {
        "rounds": args.rounds,
        "window": args.window,
        "threads": args.threads,
        "lmforge_dtype": dtype,
        "overrides": args.override,
        "median_nanogpt_ref_ms": statistics.median(ms["nanogpt_ref"]),
        "median_lmforge_ms": statistics.median(ms["lmforge"]),
        "median_speedup": statistics.median(ratios),
        "quartiles_speedup": [q[0], q[2]],
        "min_speedup": ratios[0],
        "max_speedup": ratios[-1],
        "rounds_at_or_above_1.5": sum(r >= 1.5 for r in ratios),
        "nanogpt_ref_ms": [round(x, 2) for x in ms["nanogpt_ref"]],
        "lmforge_ms": [round(x, 2) for x in ms["lmforge"]],
    }
    for name, extra in extra_arms.items():
        arm = sorted(a / b for a, b in zip(ms["nanogpt_ref"], ms[name], strict=True))
        result[name] = {
            "overrides": extra,
            "median_ms": statistics.median(ms[name]),
            "median_speedup": statistics.median(arm),
            "quartiles_speedup": [statistics.quantiles(arm, n=4)[i] for i in (0, 2)],
            "rounds_at_or_above_1.5": sum(r >= 1.5 for r in arm),
            # > 1: this arm is faster than the default lmforge arm, round by round
            "median_vs_lmforge": statistics.median(
                b / x for b, x in zip(ms["lmforge"], ms[name], strict=True)
            ),
            "ms": [round(x, 2) for x in ms[name]],
        }
    shown = {k: v for k, v in result.items() if not k.endswith("_ms")}
    for name in extra_arms:
        shown[name] = {k: v for k, v in result[name].items() if k != "ms"}  # type: ignore[attr-defined]
    print(json.dumps(shown, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
