"""The Ray Tune driver (`--sweep.ray_address=...`): the same trial function, on a cluster.

Each Ray trial calls `run_trial` into `<sweep>/trials/<trial id>/`; the sweep
folder must be on storage every node sees, since trials link each other's
finished stages. Validation results go to Ray as `val` (lower is better), which
the scheduler prunes on (`median`: MedianStoppingRule, `halving`: ASHA); the
search (`tpe`: Ray's OptunaSearch; `random`, `grid`: Ray's own variants) learns
from `objective`, which intermediate results set to the worst value so that a
stopped trial never looks good. `Tuner.restore` resumes an interrupted sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.sweep.space import Param, SweepSpec
from lmforge.sweep.trial import run_trial

EXPERIMENT = "lmforge-sweep"


def _domain(param: Param, grid: bool, where: str) -> Any:
    from ray import tune

    if grid:
        return tune.grid_search(param.grid_values(where))
    if param.type == "categorical":
        return tune.choice(param.choices)
    if param.type == "int":
        if param.log:
            return tune.lograndint(int(param.low), int(param.high) + 1)
        return tune.qrandint(int(param.low), int(param.high), int(param.step or 1))
    if param.step:
        return tune.quniform(param.low, param.high, param.step)
    return (tune.loguniform if param.log else tune.uniform)(param.low, param.high)


def _searcher_and_scheduler(spec: SweepSpec) -> tuple[Any, Any]:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    searcher = None
    if spec.sampler == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        mode = "min" if spec.direction == "minimize" else "max"
        sampler = optuna.samplers.TPESampler(seed=spec.seed)
        searcher = OptunaSearch(metric="objective", mode=mode, sampler=sampler)
    if spec.pruner == "median":
        scheduler: Any = MedianStoppingRule(
            metric="val", mode="min", min_samples_required=max(spec.prune_startup_trials, 1)
        )
    elif spec.pruner == "halving":
        scheduler = ASHAScheduler(metric="val", mode="min", grace_period=1)
    else:
        scheduler = FIFOScheduler()
    return searcher, scheduler


def make_trainable(spec: SweepSpec, recipe: str | None, overrides: list[str], trials_dir: Path):
    names = {f"p{i}": key for i, key in enumerate(spec.params)}
    worst = 1e30 if spec.direction == "minimize" else -1e30
    sign = 1.0 if spec.direction == "minimize" else -1.0

    def trainable(config: dict[str, Any]) -> None:
        from ray import tune

        params = {key: config[name] for name, key in names.items()}
        trial_dir = trials_dir / tune.get_context().get_trial_id()

        def report(step: int, value: float) -> bool:
            tune.report({"val": sign * value, "objective": worst, "step": step})
            return False  # Ray stops the trial itself when its scheduler says so

        outcome = run_trial(spec, recipe, overrides, params, trial_dir, report)
        tune.report(
            {
                "objective": outcome.value,
                "val": worst,
                "final": True,
                "violations": outcome.violations,
                "executed": outcome.executed,
                "trial_dir": str(trial_dir),
            }
        )

    return trainable, names


def optimize_ray(
    spec: SweepSpec, recipe: str | None, overrides: list[str], sweep_dir: Path
) -> list[dict[str, Any]]:
    """Run the sweep as a Ray Tune experiment; returns the report's trial rows."""
    try:
        import ray
        from ray import tune
    except ImportError:
        from lmforge.config import ConfigError

        raise ConfigError("--sweep.ray_address needs Ray: pip install 'lmforge[ray]'") from None
    sweep_dir = sweep_dir.resolve()
    trials_dir = sweep_dir / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        local = spec.ray_address in ("", "local")
        ray.init(address=None if local else spec.ray_address, include_dashboard=False)
    trainable, names = make_trainable(spec, recipe, overrides, trials_dir)
    trainable = tune.with_resources(trainable, {"cpu": spec.ray_cpus_per_trial})
    path = sweep_dir / "ray"
    if tune.Tuner.can_restore(str(path / EXPERIMENT)):
        tuner = tune.Tuner.restore(str(path / EXPERIMENT), trainable, resume_errored=True)
    else:
        grid = spec.sampler == "grid"
        searcher, scheduler = _searcher_and_scheduler(spec)
        tuner = tune.Tuner(
            trainable,
            param_space={n: _domain(spec.params[k], grid, spec.source) for n, k in names.items()},
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=1 if grid else spec.trials,
                time_budget_s=spec.wall_time_s or None,
            ),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(path), verbose=1),
        )
    results = tuner.fit()
    return _rows(results, names, trials_dir)


def _rows(results: Any, names: dict[str, str], trials_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for number, result in enumerate(results):
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id", "")
        final = bool(metrics.get("final"))
        state = "COMPLETE" if final else ("FAIL" if result.error else "PRUNED")
        rows.append(
            {
                "number": number,
                "state": state,
                "params": {k: result.config.get(n) for n, k in names.items()},
                "value": metrics.get("objective") if final else None,
                "seconds": metrics.get("time_total_s"),
                "trial_dir": str(trials_dir / trial_id) if trial_id else "",
                "executed": metrics.get("executed", []),
                "violations": metrics.get("violations", []),
                "constraint_values": {},
                "error": str(result.error or "")[:500],
                "retry_of": None,
                "pruned_at": metrics.get("step") if state == "PRUNED" else None,
            }
        )
    return rows
