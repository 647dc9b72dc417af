"""Complete, atomic, verified checkpoints.

A checkpoint is a folder ``checkpoints/step_{step:08d}/`` holding

    model.safetensors     weights (a tied head is stored once, under tok_emb.weight)
    optimizer.pt          optimizer state (tensors and plain values only)
    rng.pt                torch RNG states (CPU and CUDA)
    trainer_state.json    step, data position, counters, config, code version
    checksums.json        sha256 of every file above; written last

It is written into ``.tmp-step_...``, every file fsynced, then renamed into place
and the parent folder fsynced: a folder named ``step_*`` is always complete.
Every load verifies the checksums; ``.pt`` files are read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge import __version__

CKPT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or fails its checksum; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


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
    """Load safetensors weights into `model`; only tied duplicates may be missing."""
    model = unwrap(model)
    state = load_file(str(path))
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
    `model` and `optimizer` may be state dicts gathered beforehand (FSDP).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_checkpoint_files(tmp, step, model, optimizer, state, extra_files or {})
    except (OSError, RuntimeError) as exc:
        # Disk full or quota (torch.save reports it as a RuntimeError from its zip writer):
        # free what we wrote, keep every finished checkpoint, and say so.
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        free = shutil.disk_usage(root).free
        full = f"; {free:,} bytes free: the disk is full" if free < 1 << 26 else ""
        raise CheckpointError(
            f"{final}: could not write the checkpoint ({reason}{full}); "
            f"the previous checkpoints in {root} are intact"
        ) from exc
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
        _remove(final)
    tmp.rename(final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        _remove(old)
    for trash in root.glob(".trash-*"):  # left by a kill during an earlier removal
        shutil.rmtree(trash, ignore_errors=True)
    return final


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted ``step_*``:
    rename it out of the ``step_*`` namespace first (atomic), then delete it."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _write_checkpoint_files(
    tmp: Path,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    state: dict[str, Any],
    extra_files: dict[str, bytes],
) -> None:
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors", {"format": "pt", "lmforge": __version__})
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.state_dict()
    torch.save(optimizer or {}, tmp / "optimizer.pt")
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    full_state = dict(
        state, step=step, lmforge_version=__version__, torch_version=torch.__version__
    )
    (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=1, default=str))
    for name, data in extra_files.items():
        (tmp / name).write_bytes(data)
    sums = {}
    for name in (*CKPT_FILES, *extra_files):
        _fsync_file(tmp / name)
        sums[name] = sha256_file(tmp / name)
    (tmp / "checksums.json").write_text(json.dumps(sums, indent=1))
    _fsync_file(tmp / "checksums.json")
    _fsync_dir(tmp)


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
    try:
        sums = json.loads(sums_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{sums_path}: corrupt") from None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{sums_path}: corrupt (not a mapping of file name to sha256)")
    unlisted = [name for name in CKPT_FILES if name not in sums]
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
    return json.loads((path / "trainer_state.json").read_text())


def latest_checkpoint(run_dir: Path | str, log=print) -> Path | None:
    """Newest checkpoint that verifies; a corrupt one is reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            log(f"skipping checkpoint: {exc}")
    return None


def load_checkpoint(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Verify, then load weights (and optimizer and RNG state); return trainer_state."""
    path = Path(path)
    state = verify_checkpoint(path)
    from lmforge.train.parallel import is_sharded, load_full_state

    if is_sharded(model):  # FSDP: every rank takes its shard of the full tensors
        load_full_state(model, optimizer, path)
    else:
        load_weights(model, path / "model.safetensors")
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if restore_rng:
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


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
