"""Complete, atomic, verified checkpoints that never unpickle anything.

A checkpoint is a folder ``checkpoints/step_{step:08d}/`` holding

    model.safetensors       weights (a tied head is stored once, under tok_emb.weight)
    optimizer.safetensors   optimizer state tensors, named ``state.{param index}.{name}``
    optimizer.json          the rest of the optimizer state: param_groups, scalar state
    rng.safetensors         torch RNG states (CPU, and each CUDA device), numpy's key
    rng.json                the rest of the RNG states (numpy's position, Python's `random`)
    trainer_state.json      step, data position, counters, config, code version
    checksums.json          sha256 of every file above; written last

Loading reads only safetensors and JSON, so a checkpoint received from someone
else can never run code. Checkpoints written before this layout (``optimizer.pt``,
``rng.pt``) still load, with ``torch.load(weights_only=True)`` and a note, for one
release.

It is written into ``.tmp-step_...-{host}-{pid}``, every file fsynced, then renamed
into place and the parent folder fsynced: a folder named ``step_*`` is always
complete. A temporary folder left by a killed writer is removed when the next run
starts (`clean_stale_temporaries`). Every load verifies the checksums.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from lmforge import __version__
from lmforge.train.checkpoint_read import (  # noqa: F401  (re-exported: the reading half)
    CKPT_FILES,
    INDEX,
    LEGACY_FILES,
    SHARDED_FILES,
    STATE_KEYS,
    CheckpointError,
    _first_line,
    _from_json,
    _legacy_load,
    _optimizer_from_files,
    _read_json,
    _to_json,
    latest_checkpoint,
    list_checkpoints,
    read_optimizer_state,
    read_rng_state,
    read_safetensors,
    require_state_keys,
    resolve_checkpoint,
    set_rng_state,
    sha256_file,
    unwrap,
    verify_checkpoint,
)

FileWriter = Callable[[Path], Any]  # writes one file of a checkpoint folder at the path

# A temporary folder of another host whose writer cannot be asked is stale after this long.
STALE_AFTER_S = 24 * 3600


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights to save: contiguous CPU tensors, shared tensors stored once.

    `model` may also be a state dict already gathered (FSDP, see `parallel.full_state`).
    """
    state = model if isinstance(model, dict) else unwrap(model).state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue  # tied weight, e.g. lm_head.weight == tok_emb.weight
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_weights(
    model: nn.Module | dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    save_file(model_state(model), str(path), metadata=metadata or {})


def load_weights(model: nn.Module, path: Path | str, strict: bool = True) -> None:
    """Load safetensors weights into `model`; only tied duplicates may be missing.

    Shapes are compared before anything is copied: a mismatch leaves the model as it was.
    `path` may also be ``model.safetensors`` of a sharded checkpoint folder (which has
    none): its shards are then gathered in this process.
    """
    model = unwrap(model)
    path = Path(path)
    if not path.exists() and (path.parent / ".metadata").exists():
        from lmforge.train.sharded_load import read_full  # a sharded checkpoint: gathered on demand

        state = read_full(path.parent, weights_only=True)[0]
    else:
        state = read_safetensors(path)
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{path}: weights do not fit the model: {k} is {list(state[k].shape)} in the file, "
            f"{list(own[k].shape)} in the model{more}"
        )
    result = model.load_state_dict(state, strict=False)
    tied = (
        {"lm_head.weight"}
        if getattr(getattr(model, "cfg", None), "tie_embeddings", False)
        else set()
    )
    missing = set(result.missing_keys) - tied
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(
            f"{path}: weights do not match the model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]})"
        )


# ----------------------------------------------------------------------------- optimizer and RNG
# Pickle-free layouts: tensors in safetensors, everything else in JSON. Tuples are tagged,
# so that param_groups come back exactly as the optimizer wrote them (e.g. AdamW's betas).


def optimizer_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An `Optimizer.state_dict()` as (tensors named ``state.{index}.{name}``, JSON rest)."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for idx, entry in sd.get("state", {}).items():
        plain = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                plain[name] = _to_json(value)
        state[str(idx)] = plain
    groups = []
    for i, group in enumerate(sd.get("param_groups", [])):
        plain = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):  # e.g. a tensor learning rate
                tensors[f"group.{i}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                plain[key] = _to_json(value)
        groups.append(plain)
    return tensors, {"format": 1, "state": state, "param_groups": groups}


def rng_files() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: torch's (CPU, CUDA) and numpy's as tensors, the rest JSON."""
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "format": 1,
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


# ----------------------------------------------------------------------------- writing


def _writer_tag() -> str:
    """Who writes a temporary folder: host and PID, so that a later run can tell a dead
    writer's leftovers from a live one's work."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


_TEMPORARY = re.compile(r"^\.(?:tmp|trash)-step_\d+-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def _writer_alive(host: str | None, pid: int, folder: Path) -> bool:
    if host is None or host == _writer_tag().rsplit("-", 1)[0]:
        if pid == os.getpid():
            return False  # this process has not started writing yet: a namesake's leftover
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, another user's
        return True
    # Another host on a shared file system: it cannot be asked, so go by age.
    return time.time() - folder.stat().st_mtime < STALE_AFTER_S


def clean_stale_temporaries(run_dir: Path | str) -> list[str]:
    """Remove temporary checkpoint folders whose writer is dead; return their names.

    A writer on this host is asked (its PID); one on another host is dead after
    `STALE_AFTER_S` without a change. Finished ``step_*`` folders are never touched.
    """
    root = Path(run_dir) / "checkpoints"
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for folder in sorted(root.iterdir()):
        match = _TEMPORARY.match(folder.name)
        if match is None or not folder.is_dir():
            continue
        if not _writer_alive(match["host"], int(match["pid"]), folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


_WRITE_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file reached the file-size limit (see `ulimit -f`)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
}


def _write_failure(what: Path, root: Path, exc: BaseException) -> str:
    """One line: which file, why (disk full, size limit, permission), and what to do."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:  # safetensors and torch report the OS error inside their message
        found = re.search(r"(?:code: |errno |\[Errno |os error )(\d+)", str(exc))
        code = int(found[1]) if found else None
    reason = _WRITE_REASONS.get(code or -1)
    if reason is None:
        reason = _first_line(exc)[:200]
        if shutil.disk_usage(root).free < 1 << 26:
            reason += "; the disk is full"
    kept = list_checkpoints(root.parent)
    intact = (
        f"the previous checkpoints in {root} are intact (newest {kept[-1].name})"
        if kept
        else "no earlier checkpoint exists"
    )
    return (
        f"{what}: could not write the checkpoint: {reason}; the unfinished folder was removed "
        f"and {intact}. Free space or raise the limit, then rerun with --resume auto"
    )


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    state: dict[str, Any],
    keep_last: int = 3,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a checkpoint atomically and prune all but the newest `keep_last`.

    `extra_files` (e.g. ``tokenizer.json``) travel inside the checkpoint and are checksummed.
    `model` and `optimizer` may be state dicts gathered beforehand (FSDP). Any failure to
    write is a `CheckpointError` saying why; the temporary folder is removed.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{_writer_tag()}"
    current = [tmp]  # the file being written, for the message
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        writers, rng_meta = gathered_files(model, optimizer)
        writers.update(small_files(step, state, rng_meta, extra_files or {}))
        _write_checkpoint_files(tmp, writers, current)
        if final.exists():  # a re-save of the same step: replace it whole, if it is valid
            _set_aside_or_remove(final)
        tmp.rename(final)
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError, SafetensorError)):
            failed = final / current[-1].name if current[-1] != tmp else final
            raise CheckpointError(_write_failure(failed, root, exc)) from exc
        raise
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        _remove(old)
    for trash in root.glob(".trash-*"):  # left by a kill during an earlier removal
        shutil.rmtree(trash, ignore_errors=True)
    return final


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted ``step_*``:
    rename it out of the ``step_*`` namespace first (atomic), then delete it."""
    trash = folder.with_name(f".trash-{folder.name}-{_writer_tag()}")
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def set_aside(folder: Path) -> Path:
    """Move a checkpoint that failed to load to ``checkpoints/unloadable/`` (never deleted:
    a user may want to repair it), out of the way of new checkpoints of the same step."""
    shelf = folder.parent / "unloadable"
    shelf.mkdir(exist_ok=True)
    target = shelf / folder.name
    n = 1
    while target.exists():
        n += 1
        target = shelf / f"{folder.name}.{n}"
    folder.rename(target)
    return target


def _set_aside_or_remove(folder: Path) -> None:
    try:
        verify_checkpoint(folder)
    except CheckpointError:
        set_aside(folder)
    else:
        _remove(folder)


def gathered_files(
    model: nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> tuple[dict[str, FileWriter], dict[str, Any]]:
    """Writers of the gathered format's own files (weights, optimizer state, RNG tensors),
    and rng.json's content for `small_files`. `rng`: RNG states to store (a consolidated
    checkpoint's); default this process's."""
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.state_dict()
    opt_tensors, opt_meta = optimizer_files(optimizer or {})
    rng_tensors, rng_meta = rng if rng is not None else rng_files()
    meta = {"format": "pt", "lmforge": __version__}
    writers: dict[str, FileWriter] = {
        "model.safetensors": lambda p: save_weights(model, p, meta),
        "optimizer.safetensors": lambda p: save_file(opt_tensors, str(p), metadata=meta),
        "optimizer.json": lambda p: p.write_text(json.dumps(opt_meta)),
        "rng.safetensors": lambda p: save_file(rng_tensors, str(p), metadata=meta),
    }
    return writers, rng_meta


def _write_checkpoint_files(
    tmp: Path, writers: dict[str, FileWriter], current: list[Path] | None = None
) -> None:
    """Create `tmp` and write its files, checksums.json last."""
    tmp.mkdir()
    write_checksums(tmp, write_files(tmp, writers, current), current)


def small_files(
    step: int, state: dict[str, Any], rng_meta: dict[str, Any], extra_files: dict[str, bytes]
) -> dict[str, FileWriter]:
    """Writers of the files both checkpoint formats share: rng.json, trainer_state.json
    (`state` with the step and the versions that wrote it) and the extra files."""
    full_state = dict(
        state, step=step, lmforge_version=__version__, torch_version=torch.__version__
    )
    writers: dict[str, FileWriter] = {
        "rng.json": lambda p: p.write_text(json.dumps(rng_meta)),
        "trainer_state.json": lambda p: p.write_text(json.dumps(full_state, indent=1, default=str)),
    }
    for name, data in extra_files.items():
        writers[name] = partial(_write_bytes, data=data)
    return writers


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def write_files(
    folder: Path, writers: dict[str, FileWriter], current: list[Path] | None = None
) -> dict[str, str]:
    """Write each file of a checkpoint folder and fsync it; their sha256 by name.
    `current` is told each path before it is written (for a failure's message)."""
    sums = {}
    for name, write in writers.items():
        if current is not None:
            current.append(folder / name)
        write(folder / name)
        _fsync_file(folder / name)
        sums[name] = sha256_file(folder / name)
    return sums


def write_checksums(folder: Path, sums: dict[str, str], current: list[Path] | None = None) -> None:
    """checksums.json, written last: a folder holding it is complete."""
    if current is not None:
        current.append(folder / "checksums.json")
    (folder / "checksums.json").write_text(json.dumps(sums, indent=1))
    _fsync_file(folder / "checksums.json")
    _fsync_dir(folder)


# ----------------------------------------------------------------------------- reading


def load_checkpoint(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    check: Any = None,
    log: Any = print,
) -> dict[str, Any]:
    """Verify, then load weights (and optimizer and RNG state); return trainer_state.

    `check(state)` runs after verification and before anything is loaded (it may raise).
    Every file is read before the model, optimizer or RNG changes, so a file that fails
    leaves them as they were (weights are shape-checked before copying).
    """
    path = Path(path)
    state = verify_checkpoint(path)
    if check is not None:
        check(state)
    from lmforge.train.parallel import is_sharded, load_full_state
    from lmforge.train.sharded_load import is_sharded_checkpoint, load_sharded

    if is_sharded_checkpoint(path):  # written by every rank; DCP reshards to this world size
        load_sharded(path, model, optimizer, restore_rng)
        return state

    optim_state = read_optimizer_state(path, log) if optimizer is not None else None
    rng = read_rng_state(path, log) if restore_rng else None
    if is_sharded(model):  # FSDP: every rank takes its shard of the full tensors
        load_full_state(model, optimizer, path)
    else:
        load_weights(model, path / "model.safetensors")
        if optimizer is not None:
            try:
                optimizer.load_state_dict(optim_state)  # type: ignore[arg-type]
            except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                raise CheckpointError(
                    f"{path}: optimizer state does not fit this optimizer ({_first_line(exc)})"
                ) from None
    if rng is not None:
        set_rng_state(rng)
    return state
