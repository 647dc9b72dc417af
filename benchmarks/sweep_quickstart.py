"""A sweep of the quickstart's pre-training within three times the quickstart's wall time.

Searches `train.lr`, `train.warmup_steps` and one data-preparation choice
(`tokenizer.vocab_size`: the tokenizer and the token shards are rebuilt once per
value, then shared) with TPE and median pruning on the validation curve. Trial 0
is the quickstart's own configuration (`include_recipe`), so "at least as good as
the default" is measured in the same sweep, under the same conditions. The
objective is the quickstart's evaluation: bits per byte of the pre-trained model
on the held-out stdlib documents (`eval.ppl.bits_per_byte`). Trials run the
stages that decide it (tokenizer, tokenize, pretrain, eval); each pre-trains the
full 280 steps unless pruned, with the quickstart's time cap off so a slow moment
of the machine cannot shorten one trial and not another.

The budget is measured, not assumed: trial 0 (the default, every stage from
scratch) is run first and timed as Q, the quickstart's wall time for these
stages on this machine at this moment; the same sweep is then resumed with
`--sweep.wall_time_s` = `--window` × Q (default 1.0), so no trial starts after
Q + Q and the last one ends near 3 × Q. On a busy shared machine, `--set`
and `--steps` shrink the run for every trial (the space's warm-up range scales
with `--steps`); the figures say which they used.

    python benchmarks/sweep_quickstart.py --out runs/bench-sweep
    python benchmarks/sweep_quickstart.py --steps 24 --set train.tokens_per_step=2048 \\
        --set train.micro_batch_size=8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def space_yaml(steps: int) -> str:
    """The space, scaled to the pre-training length (the quickstart's: 280 steps,
    warm-up 40, so warm-up is searched over 0..80 in steps of 20)."""
    warmup = steps // 7
    return f"""\
params:
  train.lr: {{type: float, low: 5.0e-4, high: 8.0e-3, log: true}}
  train.warmup_steps: {{type: int, low: 0, high: {2 * warmup}, step: {max(warmup // 2, 1)}}}
  tokenizer.vocab_size: [2048, 4096]
objective: {{metric: eval.ppl.bits_per_byte, direction: minimize}}
sampler: tpe
pruner: median
prune_startup_trials: 2
include_recipe: true
seed: 0
"""


def scaled(steps: int) -> list[str]:
    """Overrides that shorten pre-training to `steps`, keeping the quickstart's proportions."""
    if steps == 280:
        return []
    every = max(steps // 4, 1)
    return [
        f"train.max_steps={steps}",
        f"train.warmup_steps={steps // 7}",
        f"train.eval_every={every}",
        f"train.log_every={every}",
        f"train.checkpoint_every={max(steps // 2, 1)}",
    ]


FIXED = [
    "run.stages=[tokenizer,tokenize,pretrain,eval]",
    "train.max_time_s=0",
    "eval.samples=0",
    "train.tensorboard=false",
]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), "")


def _ran(trial: dict, folder: str) -> bool:
    path = Path(trial["trial_dir"]) / folder
    return path.is_dir() and not path.is_symlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-sweep")
    ap.add_argument("--window", type=float, default=1.0, help="start window after trial 0, × Q")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=280, help="pre-training steps (quickstart: 280)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for every trial")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    space = out / "space.yaml"
    space.write_text(space_yaml(args.steps))
    cmd = [sys.executable, "-m", "lmforge", "sweep", "quickstart", "--space", str(space)]
    cmd += ["--out", str(out), *(f"--{o}" for o in [*FIXED, *scaled(args.steps), *args.set])]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--sweep.trials=1"], check=True)  # trial 0: the default
    quickstart_s = time.perf_counter() - t0
    window = args.window * quickstart_s
    subprocess.run(
        [*cmd, f"--sweep.trials={args.trials}", f"--sweep.wall_time_s={window}"], check=True
    )
    seconds = time.perf_counter() - t0
    data = json.loads((out / "sweep.json").read_text())
    trials = data["trials"]
    default = next(t for t in trials if t["number"] == 0)
    best = data["best"]
    result = {
        "cpu": cpu_model(),
        "command": " ".join(["python", *sys.argv]),
        "sweep_command": " ".join(cmd[2:]),
        "quickstart_s": round(quickstart_s, 1),
        "wall_s": round(seconds, 1),
        "wall_over_quickstart": round(seconds / quickstart_s, 2),
        "trials": len(trials),
        "pruned": sum(t["state"] == "PRUNED" for t in trials),
        # stages whose outputs a trial produced itself (a real folder, not a shared link)
        "pretrain_runs": sum(_ran(t, "pretrain") for t in trials),
        "tokenize_runs": sum(_ran(t, "tokens") for t in trials),
        "default": {"params": default["params"], "value": default["value"]},
        "best": {"number": best["number"], "params": best["params"], "value": best["value"]},
        "best_recipe": data["best_recipe"],
        "importances": data.get("importances"),
    }
    print(json.dumps(result, indent=1))
    (out / "benchmark.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
