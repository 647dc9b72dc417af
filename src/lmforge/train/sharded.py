"""Sharded checkpoints: every rank writes its own shards (`train.checkpoint_format = sharded`).

The gathered format (`checkpoint.py`) makes rank 0 hold the whole model and
optimizer state in CPU memory while it writes: ≈ 16 bytes per parameter with
AdamW, ≈ 100 GB for an 8B model. Here each rank writes only its FSDP shards with
`torch.distributed.checkpoint` (DCP), in parallel, so the memory of a save stays
that of one shard. The folder ``checkpoints/step_{step:08d}/`` holds

    .metadata               DCP's index: which file holds which chunk of which tensor
    __{rank}_{i}.distcp     tensors: ``model.{name}`` weights, ``optim.{name}.{key}``
                            optimizer state, each rank its own shards
    optimizer.json          the optimizer's param_groups (names, not indices)
    rng.safetensors/.json   rank 0's RNG states, as in the gathered format
    trainer_state.json      the same as in the gathered format
    checksums.json          sha256 of every file; each rank hashes the files it wrote

with the same discipline as the gathered format: written into a ``.tmp-step_*``
folder (named by rank 0), renamed by rank 0 once every rank has finished.

DCP reshards on load, so a run continues at any world size, and
`consolidate` turns such a folder into the single-file checkpoint that every
other stage reads (`lmforge checkpoint consolidate`). Only tensors go through
DCP: its `.metadata` index is a pickle, which we read with an unpickler that
admits DCP's own metadata classes and nothing else, and non-tensor values (the
param groups) travel in JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from lmforge.train import checkpoint as ck
from lmforge.train.checkpoint_read import INDEX, SHARDED_FILES
from lmforge.train.sharded_load import (  # noqa: F401  (re-exported: the reading half)
    _distributed,
    _MetadataUnpickler,
    _one_process_quietly,
    _rank,
    _reader,
    _state_dicts,
    _tied,
    is_sharded_checkpoint,
    load_sharded,
    read_full,
    read_index,
)

# ----------------------------------------------------------------------------- reading DCP's index


# ----------------------------------------------------------------------------- writing


def _tmp_name(step: int) -> str:
    """Rank 0's temporary folder name (its host and PID), shared with every rank."""
    name = [f".tmp-step_{step:08d}-{ck._writer_tag()}"]
    if _distributed():
        tdist.broadcast_object_list(name, src=0)
    return name[0]


def _hash_own_files(folder: Path) -> dict[str, str]:
    """sha256 of the shard files this rank wrote, gathered from every rank (to all)."""
    own = {p.name: ck.sha256_file(p) for p in folder.glob(f"__{_rank()}_*.distcp")}
    if not _distributed():
        return own
    everyone: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, own)
    return {k: v for part in everyone for k, v in part.items()}


def save_sharded(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep_last: int = 3,
    extra_files: dict[str, bytes] | None = None,
) -> Path | None:
    """Write a sharded checkpoint; collective (every rank calls it). Returns the folder on rank 0."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / _tmp_name(step)
    main = _rank() == 0
    try:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        if _distributed():
            tdist.barrier()
        tensors, groups = _state_dicts(model, optimizer)
        with _one_process_quietly():
            dcp.save(tensors, checkpoint_id=str(tmp))
        for p in tmp.glob(f"__{_rank()}_*.distcp"):
            ck._fsync_file(p)
        sums = _hash_own_files(tmp)
        if main:
            _finish(tmp, final, step, state, groups, sums, extra_files or {})
    except BaseException as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (OSError, RuntimeError)):
                raise ck.CheckpointError(ck._write_failure(final, root, exc)) from exc
        raise
    if main:
        for old in ck.list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            ck._remove(old)
    if _distributed():
        tdist.barrier()
    return final if main else None


def _finish(
    tmp: Path,
    final: Path,
    step: int,
    state: dict[str, Any],
    groups: dict[str, Any],
    sums: dict[str, str],
    extra_files: dict[str, bytes],
) -> None:
    """Rank 0: the small files, checksums.json last, then the rename into place."""
    from safetensors.torch import save_file

    rng_tensors, rng_meta = ck.rng_files()
    small: dict[str, ck.FileWriter] = {
        "optimizer.json": lambda p: p.write_text(json.dumps(ck._to_json(groups))),
        "rng.safetensors": lambda p: save_file(rng_tensors, str(p)),
        **ck.small_files(step, state, rng_meta, extra_files),
    }
    sums.update(ck.write_files(tmp, small))
    sums[INDEX] = ck.sha256_file(tmp / INDEX)
    ck.write_checksums(tmp, dict(sorted(sums.items())))
    if final.exists():
        ck._set_aside_or_remove(final)
    tmp.rename(final)
    ck._fsync_dir(final.parent)


# ----------------------------------------------------------------------------- loading


def consolidate(step_dir: Path | str, out: Path | str) -> Path:
    """Write the gathered single-file checkpoint of the sharded checkpoint `step_dir` to `out`."""
    step_dir, out = Path(step_dir), Path(out)
    if not is_sharded_checkpoint(step_dir):
        raise ck.CheckpointError(f"{step_dir}: not a sharded checkpoint (no {INDEX})")
    if out.exists():
        raise ck.CheckpointError(f"{out}: exists already; choose a new --out folder")
    state = ck.verify_checkpoint(step_dir)
    sums = ck._read_json(step_dir / "checksums.json")
    weights, optim = read_full(step_dir)
    extra = {
        name: (step_dir / name).read_bytes()
        for name in sums
        if name not in SHARDED_FILES and not name.endswith(".distcp")
    }
    rng = (
        (ck.read_safetensors(step_dir / "rng.safetensors")),
        ck._read_json(step_dir / "rng.json"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{ck._writer_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writers, rng_meta = ck.gathered_files(weights, optim, rng)
        writers.update(ck.small_files(int(state["step"]), state, rng_meta, extra))
        ck._write_checkpoint_files(tmp, writers)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
