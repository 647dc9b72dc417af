"""Reading a sharded checkpoint (`lmforge.train.sharded` writes them): its index, every
rank's shard through DCP, or the whole state gathered in one process."""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from lmforge.train import checkpoint_read as ck
from lmforge.train.checkpoint_read import INDEX


def is_sharded_checkpoint(path: Path | str) -> bool:
    return (Path(path) / INDEX).exists()


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _rank() -> int:
    return tdist.get_rank() if _distributed() else 0


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
