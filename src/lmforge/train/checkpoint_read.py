"""Reading checkpoints: the layout, verification against checksums.json, and the
optimizer and RNG state, from safetensors and JSON only (`lmforge.train.checkpoint`
writes them and loads them into a model; `lmforge.train.sharded` reads sharded ones)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

# A sharded checkpoint (`lmforge.train.sharded`): DCP's index, and the files that
# checksums.json must cover besides the shards.
INDEX = ".metadata"
SHARDED_FILES = (INDEX, "optimizer.json", "rng.safetensors", "rng.json", "trainer_state.json")

CKPT_FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "rng.safetensors",
    "rng.json",
    "trainer_state.json",
)


# The layout before optimizer and RNG state left pickle (read for one release).
LEGACY_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")


# Keys `Trainer.restore` needs from trainer_state.json.
STATE_KEYS = ("step", "tokens_seen", "bad_steps", "consecutive_bad", "elapsed_s")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or fails its checksum; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def read_safetensors(path: Path | str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or foreign file is a `CheckpointError`."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({_first_line(exc)})"
        ) from None


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _optimizer_from_files(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: Path
) -> dict[str, Any]:
    try:
        state = {int(i): _from_json(v) for i, v in meta["state"].items()}
        groups = [_from_json(g) for g in meta["param_groups"]]
        for key, tensor in tensors.items():
            kind, idx, name = key.split(".", 2)
            if kind == "state":
                state.setdefault(int(idx), {})[name] = tensor
            elif kind == "group":
                groups[int(idx)][name] = tensor
            else:
                raise ValueError(key)
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where}: not an lmforge optimizer state ({exc!r})") from None
    if not state and not groups:
        return {}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def _legacy_load(path: Path, log: Any) -> Any:
    """A ``.pt`` file of the old layout: tensors and plain values only, never code."""
    log(
        f"note: {path.name} in {path.parent} is the old checkpoint layout; it is read for one "
        "more release, and the next checkpoint is written without pickle"
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, EOFError, a zip error: all mean "refused"
        raise CheckpointError(
            f"{path}: refused by the safe loader (holds something other than tensors and plain "
            f"values: {_first_line(exc)[:160]})"
        ) from None


def read_optimizer_state(path: Path | str, log: Any = print) -> dict[str, Any]:
    """The optimizer state of a checkpoint folder, in `Optimizer.state_dict()` layout."""
    path = Path(path)
    if (path / "optimizer.json").exists() or not (path / "optimizer.pt").exists():
        meta = _read_json(path / "optimizer.json")
        tensors = read_safetensors(path / "optimizer.safetensors")
        return _optimizer_from_files(tensors, meta, path / "optimizer.json")
    sd = _legacy_load(path / "optimizer.pt", log)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path / 'optimizer.pt'}: not an optimizer state")
    return sd


def read_rng_state(path: Path | str, log: Any = print) -> dict[str, Any]:
    """RNG states of a checkpoint folder: ``cpu``, ``cuda`` (a list), ``numpy``, ``python``."""
    path = Path(path)
    if not (path / "rng.json").exists() and (path / "rng.pt").exists():
        rng = _legacy_load(path / "rng.pt", log)
        if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
            raise CheckpointError(f"{path / 'rng.pt'}: not an RNG state")
        return rng
    meta = _read_json(path / "rng.json")
    tensors = read_safetensors(path / "rng.safetensors")
    try:
        cuda = [
            tensors[f"torch.cuda.{i}"] for i in range(len(tensors)) if f"torch.cuda.{i}" in tensors
        ]
        npy, py = meta["numpy"], meta["python"]
        return {
            "cpu": tensors["torch.cpu"],
            "cuda": cuda,
            "numpy": (
                npy["kind"],
                tensors["numpy.keys"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached"],
            ),
            "python": (py["version"], tuple(py["state"]), py["gauss_next"]),
        }
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / 'rng.json'}: not an lmforge RNG state ({exc!r})") from None


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng.get("numpy") is not None:
        np.random.set_state(rng["numpy"])
    if rng.get("python") is not None:
        random.setstate(rng["python"])


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path | str) -> dict[str, Any]:
    """Check every file against checksums.json; return trainer_state. Raises CheckpointError."""
    path = Path(path)
    sums_path = path / "checksums.json"
    if not sums_path.exists():
        raise CheckpointError(f"{sums_path}: missing (checkpoint incomplete)")
    sums = _read_json(sums_path)
    if not isinstance(sums, dict):
        raise CheckpointError(f"{sums_path}: corrupt (not a mapping of file name to sha256)")
    expected: tuple[str, ...] = (
        LEGACY_FILES if "optimizer.pt" in sums or "rng.pt" in sums else CKPT_FILES
    )
    if ".metadata" in sums or (path / ".metadata").exists():  # sharded (`lmforge.train.sharded`)
        expected = SHARDED_FILES
    unlisted = [name for name in expected if name not in sums]
    if unlisted:  # every file that gets loaded must be covered by a checksum
        raise CheckpointError(f"{sums_path}: corrupt (no checksum for {', '.join(unlisted)})")
    for name, digest in sums.items():
        f = path / name
        # A checkpoint may come from someone else: its file list must not reach outside
        # the folder (``../x``, an absolute path, or a symlink to another file).
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{sums_path}: file name {name!r} is not a plain file name")
        if f.is_symlink():
            raise CheckpointError(f"{f}: is a symbolic link; checkpoint files must be plain files")
        if not f.exists():
            raise CheckpointError(f"{f}: missing from checkpoint")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (file corrupt or truncated)")
    state = _read_json(path / "trainer_state.json")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'trainer_state.json'}: not a JSON object")
    return state


def require_state_keys(state: dict[str, Any], path: Path | str, keys=STATE_KEYS) -> None:
    """Every key `keys` in trainer_state.json, each a number; else a `CheckpointError`."""
    where = Path(path) / "trainer_state.json"
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{where}: key {', '.join(missing)} missing")
    for k in keys:
        if isinstance(state[k], bool) or not isinstance(state[k], (int, float)):
            raise CheckpointError(f"{where}: key {k} is {state[k]!r}, not a number")


def latest_checkpoint(run_dir: Path | str, log=print) -> Path | None:
    """Newest checkpoint that verifies; a corrupt one is reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            log(f"skipping checkpoint: {exc}")
    return None


def resolve_checkpoint(path: Path | str) -> Path:
    """Accept a checkpoint folder, a run folder (newest valid checkpoint) or a checkpoints folder."""
    path = Path(path)
    if (path / "checksums.json").exists():
        return path
    for candidate in (path, path.parent):
        found = latest_checkpoint(candidate, log=lambda _msg: None)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no valid checkpoint found")
