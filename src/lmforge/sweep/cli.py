"""`lmforge sweep`: the command."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.cli_args import add_command, add_recipe_arg
from lmforge.config import ConfigError


def split_sweep_settings(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`sweep.KEY=VALUE` settings apart from the recipe overrides every trial gets."""
    sweep = [o for o in overrides if o.startswith("sweep.")]
    return sweep, [o for o in overrides if not o.startswith("sweep.")]


def sweep(
    recipe: str,
    space: str | Path,
    overrides: list[str] | None = None,
    out: str | Path = "",
    command: str = "",
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns what sweep.json holds."""
    from lmforge.sweep.space import load_space
    from lmforge.sweep.trial import trial_config
    from lmforge.train.dist import print0

    settings, fixed = split_sweep_settings(list(overrides or []))
    spec = load_space(space, settings)
    if spec.ray_address:
        spec.engine = "ray"
    sweep_dir = Path(out or f"runs/sweep-{Path(recipe).stem}")
    # Every key of the space must be a key of the recipe: check before the first trial.
    for key, p in spec.params.items():
        first = p.choices[0] if p.type == "categorical" else p.low
        trial_config(recipe, fixed, {key: first}, sweep_dir / "check")
    command = command or shlex.join(["lmforge", "sweep", recipe, "--space", str(space)])
    print0(
        f"lmforge sweep {recipe} → {sweep_dir}/ ({spec.engine}, {spec.sampler}, "
        f"{spec.budget()} trials, objective {spec.metric} {spec.direction})"
    )
    t0 = time.perf_counter()
    if spec.engine == "ray":
        from lmforge.sweep.ray import optimize_ray

        rows = optimize_ray(spec, recipe, fixed, sweep_dir)
    else:
        from lmforge.sweep.engine import optimize
        from lmforge.sweep.report import rows_from_study

        rows = rows_from_study(optimize(spec, recipe, fixed, sweep_dir))
    from lmforge.sweep.report import write_report

    data = write_report(spec, rows, sweep_dir, recipe, fixed, command)
    best = data["best"]
    print0(f"sweep finished in {time.perf_counter() - t0:.1f}s: {len(rows)} trials")
    if best:
        print0(f"best: trial {best['number']} {spec.metric} = {best['value']:.6g} {best['params']}")
        print0(f"reproduce it: lmforge run {data['best_recipe']}")
    print0(f"report: {sweep_dir / 'report.html'}")
    return data


def cmd_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    """Search recipe keys (training, fine-tuning, data preparation) for the best evaluation.

    Trials share finished stages: a sweep over fine-tuning keys pre-trains once, a sweep
    over a data key re-tokenizes once per value. Hopeless trials stop early on their
    validation curve. The Optuna study lives in OUT/study.db: run the same command again
    to resume a killed sweep, or in several processes to share it. `--sweep.KEY=VALUE`
    sets a field of the space file (trials, wall_time_s, sampler, pruner, ray_address);
    other `--section.key=value` overrides apply to every trial.
    """
    command = shlex.join(["lmforge", "sweep", *sys.argv[2:]]) if sys.argv[1:2] == ["sweep"] else ""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("lmforge sweep needs Optuna: pip install 'lmforge[sweep]'") from None
    sweep(args.recipe, args.space, overrides, args.out, command)
    return 0


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "sweep", cmd_sweep, raw=True)
    add_recipe_arg(p, optional=False)
    p.add_argument("--space", required=True, help="search space YAML (params, objective, budget)")
    p.add_argument("--out", default="", help="sweep folder (default runs/sweep-RECIPE)")
