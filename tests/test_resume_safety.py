"""Nothing lost, nothing half-done: resuming, checkpoint writes and errors as a user meets them.

Every test drives the `lmforge` command in a subprocess and checks what a user sees
(exit code, one line on stderr, no traceback) and what is on disk afterwards (a run
folder hashed before and after must be byte-identical when a command refuses).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import shakespeare_snippet, tiny_overrides
from reliability_helpers import rewrite_checksums, same_weights, to_legacy_layout
from safetensors.torch import load_file, save_file

from lmforge.train.checkpoint import list_checkpoints

HERE = Path(__file__).resolve().parent


def lmforge(*args: str, code: str = "", env: dict[str, str] | None = None, timeout: int = 300):
    """``python -m lmforge ARGS`` (or `code` run first, then lmforge's main with ARGS)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join([str(HERE), full_env.get("PYTHONPATH", "")])
    if code:
        script = f"{code}\nimport sys\nfrom lmforge.cli import main\nsys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", script, *args]
    else:
        cmd = [sys.executable, "-m", "lmforge", *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, code: int | set[int] = 1) -> str:
    """The single stderr line of a failed command (asserting there is exactly one)."""
    codes = code if isinstance(code, set) else {code}
    assert proc.returncode in codes, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("lmforge: "), lines[0]
    return lines[0]


def tree_hashes(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file, and every folder (as "dir"), under `folder`."""
    return {
        p.relative_to(folder).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        )
        for p in sorted(folder.rglob("*"))
    }


def pretrain_args(run: Path, *extra: str) -> list[str]:
    overrides = tiny_overrides(run.parent, run.parent / "corpus")
    overrides = [o for o in overrides if not o.startswith("output.dir=")]
    return ["pretrain", *(f"--{o}" for o in overrides), f"--output.dir={run}", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 8-step CLI run with checkpoints at steps 4 and 8."""
    root = tmp_path_factory.mktemp("finished")
    shakespeare_snippet(root)
    run = root / "run"
    proc = lmforge(*pretrain_args(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000008"]
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run (same corpus path layout)."""
    shutil.copytree(finished.parent / "corpus", tmp_path / "corpus")
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- resume


def test_resume_auto_with_every_checkpoint_corrupt_refuses_and_writes_nothing(run):
    for ckpt in list_checkpoints(run):
        flip_a_byte(ckpt / "model.safetensors")
    before = tree_hashes(run)
    line = one_line_error(lmforge(*pretrain_args(run, "--train.max_steps=12", "--resume", "auto")))
    assert "step_00000004: model.safetensors: checksum mismatch" in line
    assert "step_00000008: model.safetensors: checksum mismatch" in line
    assert "nothing was written" in line
    assert tree_hashes(run) == before


def test_resume_with_another_model_shape_names_the_keys_and_writes_nothing(run):
    before = tree_hashes(run)
    proc = lmforge(*pretrain_args(run, "--model.d_model=64", "--resume", "auto"))
    line = one_line_error(proc)
    assert "model.d_model: checkpoint 32, requested 64" in line
    assert "new output.dir" in line and len(line) < 600
    assert tree_hashes(run) == before


def test_resume_may_extend_the_run_and_notes_changed_settings(run):
    proc = lmforge(
        *pretrain_args(run, "--train.max_steps=10", "--train.lr=5e-4", "--resume", "auto")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"train\.lr: checkpoint [0-9.e-]+, requested 0\.0005", proc.stdout)
    assert list_checkpoints(run)[-1].name == "step_00000010"
    assert "max_steps: 10" in (run / "config.yaml").read_text()


def test_fallback_sets_the_unloadable_checkpoint_aside_and_never_overwrites_it(run, finished):
    bad = run / "checkpoints" / "step_00000008"
    flip_a_byte(bad / "model.safetensors")
    bad_bytes = {p.name: p.read_bytes() for p in bad.iterdir()}
    proc = lmforge(*pretrain_args(run, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping checkpoint" in proc.stdout and "resumed from" in proc.stdout
    kept = run / "checkpoints" / "unloadable" / "step_00000008"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == bad_bytes
    # the redone step 8 is the uninterrupted run's
    assert same_weights(
        load_file(str(run / "checkpoints" / "step_00000008" / "model.safetensors")),
        load_file(str(finished / "checkpoints" / "step_00000008" / "model.safetensors")),
    )


def test_a_fresh_run_never_trains_over_existing_checkpoints(run):
    before = tree_hashes(run)
    line = one_line_error(lmforge(*pretrain_args(run)))
    assert "holds checkpoints of an earlier run" in line and "--resume auto" in line
    assert tree_hashes(run) == before


@pytest.mark.parametrize("broken", ["missing key", "invalid JSON"])
def test_trainer_state_errors_name_the_file_and_key(run, broken):
    ckpt = run / "checkpoints" / "step_00000008"
    path = ckpt / "trainer_state.json"
    if broken == "missing key":
        state = json.loads(path.read_text())
        del state["tokens_seen"]
        path.write_text(json.dumps(state))
    else:
        path.write_text('{"step": 8,')
    rewrite_checksums(ckpt)
    before = tree_hashes(run)
    line = one_line_error(
        lmforge(*pretrain_args(run, "--train.max_steps=12", "--resume", str(ckpt)))
    )
    assert str(path) in line
    assert ("key tokens_seen missing" if broken == "missing key" else "invalid JSON") in line
    assert tree_hashes(run) == before


# ----------------------------------------------------------------------------- formats


def test_new_checkpoints_hold_no_pickle_and_load_without_it(run, monkeypatch):
    ckpt = list_checkpoints(run)[-1]
    assert not list(ckpt.glob("*.pt"))
    for f in ckpt.iterdir():
        assert not f.read_bytes().startswith(b"PK"), f"{f.name} is a zip (torch.save) file"

    def no_unpickling(*_a, **_kw):
        raise AssertionError("a checkpoint load unpickled something")

    from lmforge.pretrain import build_model
    from lmforge.train.checkpoint import load_checkpoint, verify_checkpoint
    from lmforge.train.loop import make_optimizer

    cfg_state = verify_checkpoint(ckpt)["config"]
    from lmforge.config import config_from_dict

    cfg = config_from_dict(cfg_state)
    model = build_model(cfg.model, 0)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    load_checkpoint(ckpt, model, opt, log=lambda _m: None)
    assert same_weights(
        {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
        load_file(str(ckpt / "model.safetensors")),
    )
    assert len(opt.state) == len(list(model.parameters()))


def test_old_layout_still_resumes_bit_exactly(run, finished):
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    to_legacy_layout(run / "checkpoints" / "step_00000004")
    proc = lmforge(*pretrain_args(run, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "old checkpoint layout" in proc.stdout
    assert same_weights(
        load_file(str(run / "checkpoints" / "step_00000008" / "model.safetensors")),
        load_file(str(finished / "checkpoints" / "step_00000008" / "model.safetensors")),
    )
    assert not list((run / "checkpoints" / "step_00000008").glob("*.pt"))


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_old_layout_pickle_falls_back_in_one_line_and_never_runs(run):
    marker = run.parent / "pwned"
    to_legacy_layout(run / "checkpoints" / "step_00000008", optimizer={"state": Payload(marker)})
    # alone, it is refused in one line, and nothing changes
    older = run / "checkpoints" / "step_00000004"
    older.rename(run.parent / "step_00000004")
    before = tree_hashes(run)
    line = one_line_error(lmforge(*pretrain_args(run, "--train.max_steps=9", "--resume", "auto")))
    assert "step_00000008: optimizer.pt: refused by the safe loader" in line
    assert tree_hashes(run) == before
    (run.parent / "step_00000004").rename(older)
    # with an older checkpoint, resuming falls back to it
    proc = lmforge(*pretrain_args(run, "--train.max_steps=9", "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 1 and "optimizer.pt: refused by the safe loader" in skipped[0]
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    assert not marker.exists()


# ----------------------------------------------------------------------------- writes


SET_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
"""

NO_SPACE = """
import errno, os
import lmforge.train.checkpoint as ckpt
def full(path):
    if path.name == "optimizer.json":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    ckpt._fsync_file_real(path)
ckpt._fsync_file_real = ckpt._fsync_file
ckpt._fsync_file = full
"""


@pytest.mark.parametrize(
    ("code", "failed", "reason"),
    [
        (SET_LIMIT, "model.safetensors", "file-size limit"),
        (NO_SPACE, "optimizer.json", "the disk is full"),
    ],
    ids=["file-size-limit", "disk-full"],
)
def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_temporary(run, code, failed, reason):
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    # a model whose weights (≈ 120 kB) exceed the 40 kB limit; token shards exist already
    proc = lmforge(*pretrain_args(run, "--model.d_model=48"), code=code)
    line = one_line_error(proc)
    assert f"step_00000004/{failed}: could not write the checkpoint: " in line, line
    assert reason in line, line
    assert "unfinished folder was removed" in line and "--resume auto" in line
    assert not list((run / "checkpoints").iterdir())


def test_stale_temporaries_of_dead_writers_are_removed_at_start(run):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    root = run / "checkpoints"
    stale = [
        root / f".tmp-step_00000009-{host}-{dead.pid}",
        root / f".tmp-step_00000010-{dead.pid}",
    ]
    live = root / f".tmp-step_00000011-{host}-{os.getpid()}"  # this test process: alive
    for folder in [*stale, live]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    proc = lmforge(*pretrain_args(run, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(f.exists() for f in stale)
    assert live.exists()


# ----------------------------------------------------------------------------- errors


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    boom = (
        "import lmforge.cli as c\ndef boom(*a):\n    raise KeyError('vocab')\nc.cmd_recipes = boom"
    )
    line = one_line_error(lmforge("recipes", code=boom))
    assert "KeyError: 'vocab'" in line and "run with --debug for the traceback" in line
    for proc in (
        lmforge("recipes", "--debug", code=boom),
        lmforge("recipes", code=boom, env={"LMFORGE_DEBUG": "1"}),
    ):
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError" in proc.stderr
    interrupt = boom.replace("KeyError('vocab')", "KeyboardInterrupt")
    assert one_line_error(lmforge("recipes", code=interrupt), code=130) == "lmforge: interrupted"


def hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_positions": 32}
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 1, "n_head": 2}))
    return folder


@pytest.mark.parametrize("broken", ["index without weight_map", "truncated", "pickled bin"])
def test_import_of_a_broken_folder_is_one_line(tmp_path, broken):
    folder = hf_folder(tmp_path)
    marker = tmp_path / "pwned"
    if broken == "index without weight_map":
        (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
        expect = "model.safetensors.index.json: no 'weight_map'"
    elif broken == "truncated":
        save_file({"wte.weight": torch.zeros(50, 16)}, str(folder / "model.safetensors"))
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        expect = "model.safetensors: not a readable safetensors file"
    else:
        with (folder / "pytorch_model.bin").open("wb") as fh:
            pickle.dump({"w": Payload(marker)}, fh)
        expect = "pytorch_model.bin: pickled weights are not loaded"
    line = one_line_error(lmforge("import", str(folder), "--out", str(tmp_path / "out")))
    assert expect in line, line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- non-finite


def test_nan_weight_decay_stops_with_a_true_message_and_no_checkpoint(tmp_path):
    shakespeare_snippet(tmp_path)
    run = tmp_path / "run"
    args = pretrain_args(run, "--train.weight_decay=nan", "--train.checkpoint_every=1")
    line = one_line_error(lmforge(*args), code={1, 2})
    # Refused up front (a config range) or stopped by the loop: either way the message
    # names the key, never blames the learning rate, and no checkpoint holds NaN weights.
    assert "train.weight_decay" in line and "lower train.lr" not in line
    for ckpt in list_checkpoints(run):
        assert all(
            torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values()
        )
