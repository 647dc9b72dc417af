"""Fault injection for the reliability tests: SIGKILL at the k-th file operation.

Run as a script, this wraps an lmforge command::

    python tests/reliability_helpers.py K COUNT_FILE -- pretrain --train.max_steps=8 ...

and counts the file-system operations that decide what is on disk (rename and
replace, fsync, unlink, rmtree, mkdir, whole-file writes, ``torch.save`` and
safetensors saves). Just before operation number K (1-based) the process sends
itself SIGKILL: no handler, no ``finally``, no flush, as with the OOM killer or a
preempted node. K = 0 kills nothing and writes the number of operations seen to
COUNT_FILE at exit, so a test can draw kill points uniformly over a real run.

Killing by operation count rather than by wall time puts the seeded kill points
into the narrow windows that matter (between writing a file and renaming it,
between two shards, inside a checkpoint save) on a machine of any speed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
_ops = {"n": 0, "kill_at": 0}


def _counted(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _ops["n"] += 1
        if _ops["n"] == _ops["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapper


def install(kill_at: int) -> None:
    """Count (and at `kill_at`, die in) the file operations of this process."""
    import safetensors.torch
    import torch

    _ops["kill_at"] = kill_at
    for name in ("replace", "rename", "fsync", "unlink", "mkdir"):
        setattr(os, name, _counted(getattr(os, name)))
    shutil.rmtree = _counted(shutil.rmtree)  # type: ignore[assignment]
    Path.write_text = _counted(Path.write_text)  # type: ignore[method-assign]
    Path.write_bytes = _counted(Path.write_bytes)  # type: ignore[method-assign]
    torch.save = _counted(torch.save)
    safetensors.torch.save_file = _counted(safetensors.torch.save_file)
    # modules that imported the name before we patched it
    import lmforge.train.checkpoint as ckpt

    ckpt.save_file = safetensors.torch.save_file


@dataclass
class Finished:
    returncode: int
    stderr: str


def run_killed(args: list[str], kill_at: int, count_file: Path | None = None, timeout: int = 600):
    """Run ``lmforge ARGS`` with a kill at operation `kill_at`; return its exit status.

    Runs are forked from a clean fork server that has imported torch and lmforge
    but never trained (forking the test process itself after it trained can
    deadlock, and would make the operation count depend on its history). That
    equals a fresh interpreter for lmforge, which seeds everything it uses, and
    saves seconds per kill point. Without fork, a subprocess.
    """
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return _run_subprocess(args, kill_at, count_file, timeout)
    import tempfile

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lmforge.cli", "reliability_helpers"])
    log_fd, log_name = tempfile.mkstemp(prefix="lmforge-killed-", suffix=".log")
    os.close(log_fd)
    proc = ctx.Process(target=_child, args=(args, kill_at, count_file, log_name))
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise TimeoutError(f"lmforge {args[0]} ran over {timeout} s")
    text = Path(log_name).read_text(errors="replace")
    os.unlink(log_name)
    return Finished(int(proc.exitcode), text)


def _child(args: list[str], kill_at: int, count_file: Path | None, log_name: str) -> None:
    code = 1
    try:
        log_fd = os.open(log_name, os.O_WRONLY)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # A first import writes .pyc files (os.replace): keep them out of the count.
        sys.dont_write_bytecode = True
        import torch

        torch.set_num_threads(1)
        install(kill_at)
        from lmforge.cli import main

        code = main(args)
        if count_file is not None:
            Path(count_file).write_text(json.dumps({"ops": _ops["n"]}))
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_subprocess(args: list[str], kill_at: int, count_file: Path | None, timeout: int):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(HERE / "reliability_helpers.py"), str(kill_at)]
    cmd += [str(count_file or os.devnull), "--", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def count_ops(args: list[str], tmp: Path) -> int:
    """Operations in an uninterrupted run of ``lmforge ARGS`` (which must succeed)."""
    count_file = tmp / "ops.json"
    done = run_killed(args, 0, count_file)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(json.loads(count_file.read_text())["ops"])


def kill_points(n_ops: int, n: int, seed: int) -> list[int]:
    """`n` distinct seeded kill points in 1..n_ops (all of them if fewer)."""
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, n_ops + 1), min(n, n_ops)))


def tree_bytes(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    """Relative path → bytes of every file under `folder` matching `pattern`."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob(pattern))
        if p.is_file()
    }


def newest_weights(run_dir: Path) -> dict[str, Any]:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return load_file(str(ckpts[-1] / "model.safetensors"))


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def to_legacy_layout(ckpt: Path, optimizer: Any = None) -> None:
    """Rewrite a checkpoint in the layout of earlier releases (``optimizer.pt`` and
    ``rng.pt``, pickled by torch.save), checksums included. `optimizer` replaces the
    optimizer state (e.g. a payload that must never run)."""
    import torch

    from lmforge.train.checkpoint import read_optimizer_state, read_rng_state, sha256_file

    opt = read_optimizer_state(ckpt) if optimizer is None else optimizer
    rng = read_rng_state(ckpt)
    torch.save(opt, ckpt / "optimizer.pt")
    torch.save({"cpu": rng["cpu"]}, ckpt / "rng.pt")
    sums = json.loads((ckpt / "checksums.json").read_text())
    for name in ("optimizer.safetensors", "optimizer.json", "rng.safetensors", "rng.json"):
        (ckpt / name).unlink()
        del sums[name]
    for name in ("optimizer.pt", "rng.pt"):
        sums[name] = sha256_file(ckpt / name)
    (ckpt / "checksums.json").write_text(json.dumps(sums))


def rewrite_checksums(ckpt: Path) -> None:
    """Recompute checksums.json after a deliberate edit (as an attacker or a typo would)."""
    from lmforge.train.checkpoint import sha256_file

    sums = json.loads((ckpt / "checksums.json").read_text())
    (ckpt / "checksums.json").write_text(
        json.dumps({name: sha256_file(ckpt / name) for name in sums})
    )


def metrics_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


if __name__ == "__main__":
    kill_at, count_file = int(sys.argv[1]), sys.argv[2]
    assert sys.argv[3] == "--"
    install(kill_at)
    import torch

    torch.set_num_threads(1)
    from lmforge.cli import main

    try:
        code = main(sys.argv[4:])
    finally:
        if count_file != os.devnull:
            Path(count_file).write_text(json.dumps({"ops": _ops["n"]}))
    sys.exit(code)
