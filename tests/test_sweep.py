"""`lmforge sweep`: shared stages, resume after SIGKILL, pruning, data keys, the best recipe."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import shakespeare_snippet, tiny_run_overrides

from lmforge.config import ConfigError

pytest.importorskip("optuna")

from lmforge.sweep.cli import sweep
from lmforge.sweep.space import load_space

STAGES = "run.stages=[tokenizer,tokenize,pretrain,finetune,eval]"


def docstring_task(tmp: Path) -> list[str]:
    """A dozen code → docstring pairs, so fine-tuning does not read the whole stdlib."""
    path = tmp / "task.jsonl"
    rows = [
        {"code": f"def add_{i}(x):\n    return x + {i}\n", "docstring": f"Add {i} to x."}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"finetune.{s}_files=[{path}]" for s in ("train", "val", "test")]


def tiny(tmp: Path, *extra: str) -> list[str]:
    corpus = shakespeare_snippet(tmp, 40_000)
    base = tiny_run_overrides(tmp, corpus, tmp / "unused", *docstring_task(tmp), STAGES, *extra)
    return [o for o in base if not o.startswith("output.dir")]


def space(tmp: Path, text: str) -> Path:
    path = tmp / "space.yaml"
    path.write_text(text)
    return path


def trials_of(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in (sweep_dir / "trials").iterdir() if p.is_dir())


def ran_here(trial: Path, stage: str) -> bool:
    """The stage's outputs were produced in this trial's folder (a real folder, not a link)."""
    folder = trial / ("tokens" if stage == "tokenize" else stage)
    return folder.is_dir() and not folder.is_symlink()


def test_space_errors_name_the_key(tmp_path):
    bad = space(tmp_path, "params:\n  train.lr: {type: float, low: 0, high: 1, log: true}\n")
    with pytest.raises(ConfigError, match=r"params.train.lr: log scale needs low > 0"):
        load_space(bad)
    grid = space(tmp_path, "params:\n  train.lr: {type: float, low: 0.1, high: 1}\nsampler: grid\n")
    with pytest.raises(ConfigError, match="sampler grid needs discrete values"):
        load_space(grid)
    ok = space(tmp_path, "params:\n  train.warmup_steps: {type: int, low: 0, high: 40, step: 20}\n")
    spec = load_space(ok, ["sweep.trials=3", "sweep.sampler=grid"])
    assert spec.trials == 3 and spec.grid() == [{"train.warmup_steps": v} for v in (0, 20, 40)]
    unknown = space(tmp_path, "params:\n  train.nope: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"params\.train\.nope: 'train\.nope' is not a key"):
        sweep("quickstart", unknown, tiny(tmp_path), tmp_path / "sw")


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory):
    """4 trials: train.lr × finetune.lr, a grid."""
    tmp = tmp_path_factory.mktemp("sweep")
    overrides = tiny(tmp)
    path = space(
        tmp,
        "params:\n  train.lr: [1.0e-3, 3.0e-3]\n  finetune.lr: [2.0e-4, 1.0e-3]\n"
        "sampler: grid\npruner: none\n",
    )
    data = sweep("quickstart", path, overrides, tmp / "sw")
    return tmp / "sw", data, overrides


def test_trials_share_stages_pretraining_once_per_train_lr(lr_sweep):
    sweep_dir, data, _ = lr_sweep
    trials = trials_of(sweep_dir)
    assert len(trials) == 4 and [r["state"] for r in data["trials"]] == ["COMPLETE"] * 4
    count = {s: sum(ran_here(t, s) for t in trials) for s in ("tokenize", "pretrain", "finetune")}
    # tokenize does not read train.*: once; pretrain reads train.lr: once per value (2 of 4)
    assert count == {"tokenize": 1, "pretrain": 2, "finetune": 4}
    by_lr: dict[float, set[str]] = {}
    for row in data["trials"]:
        real = os.path.realpath(Path(row["trial_dir"]) / "pretrain")
        by_lr.setdefault(row["params"]["train.lr"], set()).add(real)
    assert all(len(v) == 1 for v in by_lr.values()) and len(by_lr) == 2
    # the record of what each trial ran itself agrees with the folders
    assert sum("pretrain" in r["executed"] for r in data["trials"]) == 2


def test_report_and_best_recipe_reproduce_the_best_trial(lr_sweep, tmp_path):
    from lmforge.run import run_recipe
    from lmforge.sweep.trial import metric_value

    sweep_dir, data, _ = lr_sweep
    best = data["best"]
    values = [r["value"] for r in data["trials"]]
    assert best["value"] == min(values)
    for name in ("objective", "parallel_coordinates", "validation_curves"):
        assert (sweep_dir / "report" / f"{name}.png").stat().st_size > 5_000
    assert "Best trial" in (sweep_dir / "report.md").read_text()
    assert json.loads((sweep_dir / "sweep.json").read_text())["best"]["number"] == best["number"]
    from lmforge.report import write_report

    trial = Path(best["trial_dir"])
    write_report(trial)  # a trial's own report card names its sweep
    assert f"Trial {trial.name} of the sweep" in (trial / "report.md").read_text()
    # `lmforge run best.yaml` in a fresh folder, every stage from scratch: the same number.
    run_dir = tmp_path / "again"
    run_recipe(str(sweep_dir / "best.yaml"), [f"output.dir={run_dir}"])
    assert metric_value(run_dir, "eval.ppl.bits_per_byte") == best["value"]


def test_web_app_run_page_shows_the_sweep(lr_sweep, tmp_path):
    pytest.importorskip("fastapi", reason="the web app is in the `serve` extra")
    from fastapi.testclient import TestClient
    from serve_helpers import ORGANISER_TOKEN, csrf_of

    from lmforge.serve import create_app
    from lmforge.serve.security import SecuritySettings

    sweep_dir, data, _ = lr_sweep
    app = create_app(
        sweep_dir.parent,
        db_path=tmp_path / "s.db",
        organiser_token=ORGANISER_TOKEN,
        security=SecuritySettings(allowed_hosts=["testserver"]),  # TestClient's Host
    )
    with TestClient(app) as client:
        csrf = csrf_of(client.get("/login").text)
        client.post("/login", data={"token": ORGANISER_TOKEN, "csrf": csrf})
        assert 'href="/runs/sw"' in client.get("/runs").text
        page = client.get("/runs/sw").text
        assert 'id="sweep-trials"' in page and page.count("COMPLETE") == 4
        assert f"trial {data['best']['number']}" in page
        png = client.get("/files/sw/report/parallel_coordinates.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert 'src="/files/sw/report/validation_curves.png"' in page


def _finished(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_sweep_resumes_without_repeating_finished_trials(tmp_path):
    import optuna

    overrides = tiny(tmp_path)
    path = space(
        tmp_path,
        "params:\n  finetune.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}\n"
        "sampler: random\npruner: none\nbudget: {trials: 4}\n",
    )
    sweep_dir = tmp_path / "sw"
    cmd = [sys.executable, "-m", "lmforge", "sweep", "quickstart", "--space", str(path)]
    cmd += ["--out", str(sweep_dir), *(f"--{o}" for o in overrides)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and _finished(sweep_dir / "study.db") < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    storage = f"sqlite:///{sweep_dir / 'study.db'}"
    before = optuna.load_study(study_name="lmforge-sweep", storage=storage).trials
    done_before = {t.number: (t.params, t.value) for t in before if t.state.name == "COMPLETE"}
    assert 2 <= len(done_before) < 4, "the sweep was not killed midway"
    stamps = {
        n: (sweep_dir / "trials" / f"{n:04d}" / "eval" / "eval.json").stat().st_mtime_ns
        for n in done_before
    }

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = optuna.load_study(study_name="lmforge-sweep", storage=storage).trials
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert len(complete) == 4  # the budget, counted once
    for n, (params, value) in done_before.items():
        assert (after[n].params, after[n].value) == (params, value)
        mtime = (sweep_dir / "trials" / f"{n:04d}" / "eval" / "eval.json").stat().st_mtime_ns
        assert mtime == stamps[n], f"trial {n} ran again"
    # The kill lands while the next trial starts: a trial killed after drawing its values
    # runs them again (`retry_of`); one killed before it drew any has none to retry, and
    # the budget still counts four finished trials.
    killed = [t for t in after if t.state.name == "FAIL"]
    assert all(t.user_attrs.get("died") for t in killed)
    retries = [t for t in after if "retry_of" in t.user_attrs]
    assert [t.user_attrs["retry_of"] for t in retries] == [t.number for t in killed if t.params]
    assert all(r.params == after[r.user_attrs["retry_of"]].params for r in retries)
    assert sum(ran_here(t, "pretrain") for t in trials_of(sweep_dir)) == 1


def test_absurd_learning_rate_is_pruned_early(tmp_path):
    import optuna

    overrides = tiny(
        tmp_path,
        "train.max_steps=12",
        "train.eval_every=2",
        "run.stages=[tokenizer,tokenize,pretrain,eval]",
    )
    path = space(
        tmp_path,
        "params:\n  train.lr: [2.0e-3, 4.0e-3, 10.0]\nsampler: grid\npruner: median\n"
        "prune_startup_trials: 2\n",
    )
    sweep_dir = tmp_path / "sw"
    data = sweep("quickstart", path, overrides, sweep_dir)
    states = {r["params"]["train.lr"]: r["state"] for r in data["trials"]}
    assert states == {2e-3: "COMPLETE", 4e-3: "COMPLETE", 10.0: "PRUNED"}
    study = optuna.load_study(study_name="lmforge-sweep", storage=f"sqlite:///{sweep_dir}/study.db")
    pruned = next(t for t in study.trials if t.state.name == "PRUNED")
    steps = [
        json.loads(line)["step"]
        for line in (Path(pruned.user_attrs["trial_dir"]) / "pretrain" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert max(steps) < 12 and pruned.last_step < 12
    assert data["best"]["params"]["train.lr"] != 10.0


def test_a_data_key_reprepares_and_retokenizes_only_per_value(tmp_path):
    corpus = shakespeare_snippet(tmp_path, 40_000)
    overrides = tiny(
        tmp_path,
        f"prepare.sources=[{{path: {corpus}, kind: text}}]",
        "prepare.dedup_minhash=false",
        "prepare.languages=[]",
        "prepare.quality=false",
        "prepare.repetition=false",
        "run.stages=[prepare,tokenizer,tokenize,pretrain,eval]",
    )
    # A recipe that prepares its own data trains on what it prepared: no data.sources.
    overrides = [o for o in overrides if not o.startswith("data.sources=")]
    path = space(
        tmp_path,
        "params:\n  prepare.min_chars: [100, 1990]\n  train.lr: [1.0e-3, 3.0e-3]\n"
        "sampler: grid\npruner: none\n",
    )
    sweep_dir = tmp_path / "sw"
    data = sweep("quickstart", path, overrides, sweep_dir)
    assert [r["state"] for r in data["trials"]] == ["COMPLETE"] * 4
    trials = trials_of(sweep_dir)
    count = {s: sum(ran_here(t, s) for t in trials) for s in ("prepared", "tokenize", "pretrain")}
    assert count == {"prepared": 2, "tokenize": 2, "pretrain": 4}


def test_ray_space_and_pruners_follow_the_space_file(tmp_path):
    """The default suite's check of the Ray driver's mapping (the run itself is `slow`)."""
    pytest.importorskip("ray", reason="Ray is in the `ray` extra")
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    from lmforge.sweep.ray import _domain, _searcher_and_scheduler

    path = space(
        tmp_path,
        "params:\n  train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "  train.warmup_steps: {type: int, low: 0, high: 80, step: 20}\n"
        "  finetune.lr: [2.0e-4, 1.0e-3]\n",
    )
    spec = load_space(path)
    lr = [_domain(spec.params["train.lr"], False, "").sample() for _ in range(400)]
    assert all(1e-4 <= x <= 1e-2 for x in lr)
    # log-uniform: about half the draws below the geometric mean 1e-3 (±5 sigma of 400 draws)
    assert abs(sum(x < 1e-3 for x in lr) - 200) < 5 * 10
    warmup = {_domain(spec.params["train.warmup_steps"], False, "").sample() for _ in range(200)}
    assert warmup == {0, 20, 40, 60, 80}
    assert _domain(spec.params["finetune.lr"], True, "") == {"grid_search": [2e-4, 1e-3]}
    _, median = _searcher_and_scheduler(spec)
    spec.pruner = "halving"
    _, halving = _searcher_and_scheduler(spec)
    assert isinstance(median, MedianStoppingRule) and isinstance(halving, ASHAScheduler)


@pytest.mark.slow
def test_ray_tune_runs_the_same_trial_function(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is in the `ray` extra")
    overrides = tiny(tmp_path)
    path = space(
        tmp_path,
        "params:\n  finetune.lr: [2.0e-4, 1.0e-3]\nsampler: grid\npruner: none\n"
        "ray_address: local\nray_cpus_per_trial: 2\n",
    )
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        data = sweep("quickstart", path, overrides, tmp_path / "sw")
    finally:
        ray.shutdown()
    rows = data["trials"]
    assert [r["state"] for r in rows] == ["COMPLETE"] * 2
    assert sorted(r["params"]["finetune.lr"] for r in rows) == [2e-4, 1e-3]
    trials = trials_of(tmp_path / "sw")
    assert sum(ran_here(t, "pretrain") for t in trials) == 1  # one trial at a time: shared
    assert (tmp_path / "sw" / "best.yaml").exists()


def test_sigterm_stops_the_sweep_and_its_trial_runs_again_on_resume(tmp_path):
    import optuna

    from lmforge.sweep.trial import SweepInterrupted
    from lmforge.train.loop import VALIDATION_LISTENERS

    overrides = tiny(tmp_path, "run.stages=[tokenizer,tokenize,pretrain,eval]")
    path = space(tmp_path, "params:\n  train.lr: [2.0e-3]\nsampler: grid\npruner: none\n")
    sweep_dir = tmp_path / "sw"

    def terminate_once(run_dir, step, metrics):  # as if the user pressed Ctrl-C mid-training
        VALIDATION_LISTENERS.remove(terminate_once)
        os.kill(os.getpid(), signal.SIGTERM)
        return False

    VALIDATION_LISTENERS.append(terminate_once)
    with pytest.raises(SweepInterrupted, match="run the same command again"):
        sweep("quickstart", path, overrides, sweep_dir)
    data = sweep("quickstart", path, overrides, sweep_dir)
    study = optuna.load_study(study_name="lmforge-sweep", storage=f"sqlite:///{sweep_dir}/study.db")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["retry_of"] == 0
    assert data["best"]["number"] == 1
