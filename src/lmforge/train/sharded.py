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

import io
import json
import pickle
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from lmforge.train import checkpoint as ck

INDEX = ".metadata"
# Files of a sharded checkpoint that must be covered by checksums.json (besides the shards).
SHARDED_FILES = (INDEX, "optimizer.json", "rng.safetensors", "rng.json", "trainer_state.json")


def is_sharded_checkpoint(path: Path | str) -> bool:
    return (Path(path) / INDEX).exists()


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _rank() -> int:
    return tdist.get_rank() if _distributed() else 0


# ----------------------------------------------------------------------------- reading DCP's index


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, torch dtypes/sizes/layouts and plain containers."""

    _BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "OrderedDict"})

    def find_class(self, module: str, name: str) -> Any:
        value = getattr(torch, name, None) if module == "torch" else None
        if (
            module.startswith("torch.distributed.checkpoint.")
            or (module == "torch" and name == "Size")
            # torch.layout pickles as a call of this lookup by name (no other effect)
            or (module == "torch.serialization" and name == "_get_layout")
            or isinstance(value, (torch.dtype, torch.memory_format, torch.layout))
            or (module in ("builtins", "collections") and name in self._BUILTINS)
            or (
                module == "pathlib" and name in ("PosixPath", "PurePosixPath")
            )  # the path written to
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def _reader(path: Path) -> Any:
    """A DCP `FileSystemReader` whose index is read without running foreign code."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self) -> Any:
            data = (Path(self.path) / INDEX).read_bytes()
            try:
                metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
                raise ck.CheckpointError(
                    f"{Path(self.path) / INDEX}: not a checkpoint index ({ck._first_line(exc)})"
                ) from None
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if metadata.planner_data is None:
                metadata.planner_data = {}
            return metadata

    return SafeReader(str(path))


def read_index(path: Path) -> Any:
    """DCP's metadata of a sharded checkpoint; refuses one with non-tensor entries."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _reader(path).read_metadata()
    other = [
        k
        for k, v in metadata.state_dict_metadata.items()
        if not isinstance(v, TensorStorageMetadata)
    ]
    if other:  # DCP would unpickle them with no restriction
        raise ck.CheckpointError(
            f"{path / INDEX}: holds non-tensor entries ({', '.join(other[:3])}); "
            "lmforge writes only tensors there"
        )
    return metadata


# ----------------------------------------------------------------------------- writing


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """(DCP state dict of tensors, param_groups) for `model` and `optimizer`, sharded as they are."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model = ck.unwrap(model) if not hasattr(model, "set_requires_gradient_sync") else model
    optim: dict[str, Any] = {"state": {}, "param_groups": []}
    if optimizer is None:
        weights = get_model_state_dict(model)
    else:
        weights, optim = get_state_dict(model, optimizer)  # type: ignore[assignment]
    if _tied(model):
        weights.pop("lm_head.weight", None)  # stored once, under tok_emb.weight
    tensors = {"model": weights, "optim": optim["state"]} if optimizer else {"model": weights}
    return tensors, {"param_groups": optim["param_groups"]}


def _tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(ck.unwrap(model), "cfg", None), "tie_embeddings", False))


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


def load_sharded(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, restore_rng: bool
) -> None:
    """Load a sharded checkpoint into `model` (FSDP at any world size, or plain) and `optimizer`.

    Collective when a process group exists. The small files are read first; DCP then
    checks every key and shape against the index before it reads a byte of the shards,
    so a checkpoint of another model leaves this one as it was.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    read_index(path)
    groups = ck._from_json(ck._read_json(path / "optimizer.json")) if optimizer else None
    rng = ck.read_rng_state(path) if restore_rng else None
    tensors, _ = _state_dicts(model, optimizer)
    try:
        with _one_process_quietly():
            dcp.load(tensors, storage_reader=_reader(path))
    except (CheckpointException, RuntimeError, ValueError) as exc:  # missing key, other shape
        raise ck.CheckpointError(
            f"{path}: does not fit this model ({ck._first_line(exc)})"
        ) from None
    if _tied(model):
        tensors["model"]["lm_head.weight"] = tensors["model"]["tok_emb.weight"]
    target = model if hasattr(model, "set_requires_gradient_sync") else ck.unwrap(model)
    if optimizer is None or groups is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(target, tensors["model"])
    else:
        optim_sd = {"state": tensors["optim"], "param_groups": groups["param_groups"]}
        set_state_dict(
            target, optimizer, model_state_dict=tensors["model"], optim_state_dict=optim_sd
        )
    if rng is not None:
        ck.set_rng_state(rng)


@contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns on every save or load without a process group, which is what we mean there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_full(
    path: Path, weights_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole checkpoint in this process, without a process group: (weights by name,
    optimizer state in the index-keyed layout of `Optimizer.state_dict()`, or {} when
    `weights_only`)."""
    import torch.distributed.checkpoint as dcp

    from lmforge.train.parallel import _index_keyed

    metadata = read_index(path)
    flat = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") or not weights_only
    }
    with _one_process_quietly():
        dcp.load(flat, storage_reader=_reader(path), no_dist=True)
    weights = {k[len("model.") :]: v for k, v in flat.items() if k.startswith("model.")}
    if weights_only:
        return weights, {}
    groups = ck._from_json(ck._read_json(path / "optimizer.json"))
    fqns = {fqn for g in groups["param_groups"] for fqn in g["params"]}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        if key.startswith("optim."):
            fqn, name = key[len("optim.") :].rsplit(".", 1)
            if fqn not in fqns:
                raise ck.CheckpointError(f"{path / INDEX}: optimizer state for unknown {fqn}")
            state.setdefault(fqn, {})[name] = tensor
    optim = (
        _index_keyed({"state": state, "param_groups": groups["param_groups"]})
        if groups["param_groups"]
        else {}
    )
    return weights, optim


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
