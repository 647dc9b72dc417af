"""The Optuna driver: a study in `<sweep>/study.db` (SQLite), asked for one trial at a time.

- Resume: the study is loaded if it exists, so a killed sweep goes on where it
  stopped: finished trials are kept, and a trial whose process died (a RUNNING
  trial of this machine whose process is gone) is marked FAIL and its values
  are tried again in a new trial.
- Several processes on one machine may run the same command: they share the
  study, the budget (finished + running trials) and the finished stages.
- Budget: `trials` finished trials (killed ones excluded), and no trial starts
  after `wall_time_s`.
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError
from lmforge.sweep.space import Param, SweepSpec, distribution  # noqa: F401
from lmforge.sweep.trial import SweepInterrupted, TrialPruned, run_trial
from lmforge.train.dist import print0

STUDY_NAME = "lmforge-sweep"


def _constraints(trial: Any) -> list[float]:
    return list(trial.user_attrs.get("violations", []))


def make_sampler(spec: SweepSpec) -> Any:
    import optuna

    constraints = _constraints if spec.constraints else None
    if spec.sampler in ("grid", "random"):  # grid: its points are enqueued (`optimize`)
        return optuna.samplers.RandomSampler(seed=spec.seed)
    # TPE models the results after a few random trials (Bergstra et al. 2011); Optuna's
    # default of 10 would leave a 12-trial sweep random, so a third of the budget.
    startup = max(2, min(10, spec.trials // 3))
    return optuna.samplers.TPESampler(
        seed=spec.seed, n_startup_trials=startup, constraints_func=constraints
    )


def make_pruner(spec: SweepSpec) -> Any:
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.prune_startup_trials)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(spec: SweepSpec, sweep_dir: Path) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=STUDY_NAME,
        storage=f"sqlite:///{sweep_dir / 'study.db'}",
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        direction=spec.direction,
        load_if_exists=True,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LOCKS: list[Any] = []  # each sweep process's shared lock on its folder, held until exit


def hold_sweep_lock(sweep_dir: Path) -> bool:
    """Take a shared lock on the sweep folder for this process's lifetime; True when no other
    sweep process held it (then no trial of the study can be running anywhere but here)."""
    import fcntl

    handle = open(sweep_dir / ".sweep.lock", "a+")  # noqa: SIM115 (kept open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except OSError:
        alone = False
    fcntl.flock(handle, fcntl.LOCK_SH)
    _LOCKS.append(handle)
    return alone


def _dead(t: Any, alone: bool) -> bool:
    host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
    if not pid:  # killed between asking for the trial and recording its owner
        return alone
    return host == socket.gethostname() and not _alive(int(pid))


def retry_dead_trials(study: Any, alone: bool = False) -> int:
    """Mark RUNNING trials whose process is gone as FAIL (and as died, so they do not count
    against the budget); enqueue their values again. A trial with no owner recorded is dead
    only when no other sweep process holds the folder (`hold_sweep_lock`)."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _dead(t, alone):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "died", True)
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        print0(f"[sweep] trial {t.number} died with its process; its values will run again")
        n += 1
    return n


def _used(study: Any) -> int:
    """Trials that count against the budget: finished and running, less those that died
    with their process (their values run again in a retry)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return sum(
        1
        for t in trials
        if t.state != TrialState.WAITING
        and t.number not in retried
        and not t.user_attrs.get("died")
    )


def _suggest(trial: Any, spec: SweepSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, p in spec.params.items():
        if p.type == "categorical":
            out[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            out[key] = trial.suggest_int(
                key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
            )
        else:
            out[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return out


def run_one(
    study: Any, spec: SweepSpec, recipe: str | None, overrides: list[str], sweep_dir: Path
) -> None:
    from optuna.trial import TrialState

    trial = study.ask()
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    params = _suggest(trial, spec)
    trial_dir = sweep_dir / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("trial_dir", str(trial_dir))
    print0(f"[sweep] trial {trial.number}: {params}")

    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    t0 = time.perf_counter()
    try:
        outcome = run_trial(spec, recipe, overrides, params, trial_dir, report)
    except TrialPruned:
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        study.tell(trial, state=TrialState.PRUNED)
        print0(f"[sweep] trial {trial.number} pruned")
        return
    except ConfigError:
        study.tell(trial, state=TrialState.FAIL)
        raise  # bad input: stop the sweep with its one line
    except SweepInterrupted:
        study.tell(trial, state=TrialState.FAIL)  # its values run again on resume
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
        raise
    except Exception as exc:  # a trial that breaks (diverged, ...) does not end the sweep
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        print0(f"[sweep] trial {trial.number} failed: {exc}")
        return
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
    trial.set_user_attr("violations", outcome.violations)
    trial.set_user_attr("constraint_values", outcome.constraint_values)
    trial.set_user_attr("executed", outcome.executed)
    study.tell(trial, outcome.value)
    print0(f"[sweep] trial {trial.number}: {spec.metric} = {outcome.value:.6g}")


def recipe_values(spec: SweepSpec, recipe: str | None, overrides: list[str]) -> dict[str, Any]:
    """The recipe's own value of every key of the space."""
    from lmforge.config import load_config, to_dict
    from lmforge.sweep.trial import _walk

    data = to_dict(load_config(recipe, overrides))
    return {k: _walk(data, k.split(".")) for k in spec.params}


def optimize(spec: SweepSpec, recipe: str | None, overrides: list[str], sweep_dir: Path) -> Any:
    """Run trials until the budget is used; returns the study."""
    from lmforge.sweep.report import rows_from_study, write_sweep_json

    study = open_study(spec, sweep_dir)
    retry_dead_trials(study, alone=hold_sweep_lock(sweep_dir))
    if spec.include_recipe:
        study.enqueue_trial(recipe_values(spec, recipe, overrides), skip_if_exists=True)
    if spec.sampler == "grid":
        # Every point of the grid as an enqueued trial (once, however often this runs), in
        # the order written, or shuffled by the seed when the budget covers only part of it.
        # (Optuna's GridSampler stops the study itself, which the ask/tell loop cannot use.)
        points = spec.grid()
        if spec.trials < len(points):
            random.Random(spec.seed).shuffle(points)
        for point in points:
            study.enqueue_trial(point, skip_if_exists=True)
    t0 = time.time()
    budget = spec.budget()
    while _used(study) < budget:
        if spec.wall_time_s and time.time() - t0 >= spec.wall_time_s:
            print0(f"[sweep] wall time {spec.wall_time_s:.0f}s used; no new trial")
            break
        run_one(study, spec, recipe, overrides, sweep_dir)
        # Finished work is on disk after every trial (the full report comes at the end).
        write_sweep_json(spec, rows_from_study(study), sweep_dir)
    return study
