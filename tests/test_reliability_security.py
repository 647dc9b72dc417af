"""Security: no dangerous calls in the source tree; untrusted folders cannot reach outside.

The scan walks the syntax tree of every module under ``src/`` (not a regex over the
text, so ``model.eval()`` is not mistaken for the builtin) and names file:line of
each finding. See SECURITY.md for the threat model these tests defend.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmforge.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

SRC = Path(__file__).resolve().parents[1] / "src"


UNPICKLERS = {
    f"{module}.{fn}"
    for module in ("pickle", "marshal", "dill", "cloudpickle")
    for fn in ("load", "loads")
}


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def dangerous_calls(source: str, filename: str) -> list[str]:
    """Each dangerous call in `source` as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        why = ""
        if name in ("eval", "exec", "compile"):
            why = f"builtin {name}() runs arbitrary code"
        elif name == "__import__" and not (node.args and isinstance(node.args[0], ast.Constant)):
            why = f"{name}() of a computed name imports arbitrary modules"
        elif name in UNPICKLERS:
            why = f"{name}() runs code from the file"
        elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            why = "torch.load() without weights_only=True unpickles code"
        elif name == "yaml.load":
            loader = _dotted(_kw(node, "Loader") or ast.Constant(None))
            if loader.split(".")[-1] not in ("SafeLoader", "CSafeLoader"):
                why = "yaml.load() without SafeLoader builds arbitrary objects"
        elif name in ("yaml.unsafe_load", "yaml.full_load", "os.system", "os.popen"):
            why = f"{name}() is unsafe"
        elif _is_true(_kw(node, "shell")):
            why = f"{name}(shell=True) hands a string to the shell"
        elif name.endswith("extractall") and _kw(node, "filter") is None:
            why = "archive extractall() without a filter can write outside the folder"
        if why:
            found.append(f"{filename}:{node.lineno}: {why}")
    return found


def test_scanner_finds_each_dangerous_call():
    """The scanner itself must be able to fail: every pattern is caught, safe forms are not."""
    bad = "\n".join(
        [
            "eval('1')",
            "exec('x=1')",
            "pickle.loads(b'')",
            "torch.load(p)",
            "torch.load(p, weights_only=False)",
            "yaml.load(s)",
            "yaml.load(s, Loader=yaml.Loader)",
            "subprocess.run('ls', shell=True)",
            "os.system('ls')",
            "tar.extractall(d)",
        ]
    )
    assert len(dangerous_calls(bad, "bad.py")) == 10
    safe = "\n".join(
        [
            "model.eval()",
            "torch.load(p, weights_only=True)",
            "yaml.safe_load(s)",
            "yaml.load(s, Loader=yaml.SafeLoader)",
            "subprocess.run(['ls'])",
            "re.compile('x')",
        ]
    )
    assert dangerous_calls(safe, "safe.py") == []


def test_source_tree_has_no_dangerous_calls():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50  # the tree was really found
    found = [f for path in files for f in dangerous_calls(path.read_text(), str(path))]
    assert not found, "dangerous calls:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- checkpoints


def _tiny_checkpoint(run_dir: Path) -> Path:
    model = torch.nn.Linear(4, 4)
    return save_checkpoint(run_dir, 1, model, None, {"config": {}})


def test_checksum_list_cannot_name_files_outside_the_checkpoint(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "run")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    for name in ("../../secret.txt", str(secret), "sub/../../secret.txt"):
        sums = json.loads((ckpt / "checksums.json").read_text())
        sums[name] = "0" * 64
        (ckpt / "checksums.json").write_text(json.dumps(sums))
        with pytest.raises(CheckpointError, match="not a plain file name"):
            verify_checkpoint(ckpt)
        del sums[name]
        (ckpt / "checksums.json").write_text(json.dumps(sums))
    verify_checkpoint(ckpt)  # the untouched list still verifies


def test_symlinked_checkpoint_file_is_refused_and_resume_falls_back(tmp_path):
    run = tmp_path / "run"
    model = torch.nn.Linear(4, 4)
    good = save_checkpoint(run, 1, model, None, {})
    bad = save_checkpoint(run, 2, model, None, {})
    # The link points outside at a file with the very same bytes, so only the link is wrong.
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((bad / "model.safetensors").read_bytes())
    (bad / "model.safetensors").unlink()
    os.symlink(outside, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="symbolic link"):
        verify_checkpoint(bad)
    messages: list[str] = []
    assert latest_checkpoint(run, log=messages.append) == good
    assert "model.safetensors" in messages[0]


def test_non_mapping_checksums_is_a_clear_error(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "run")
    (ckpt / "checksums.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"checksums\.json: corrupt"):
        verify_checkpoint(ckpt)


# ----------------------------------------------------------------------------- HF folders


def test_hf_shard_index_cannot_reach_outside_the_folder(tmp_path):
    from lmforge.export.hf import ExportError, _read_hf_weights

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        index = {"weight_map": {"w": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ExportError, match="outside"):
            _read_hf_weights(folder)
    # a shard inside the folder (also through a symlink, as in an HF cache snapshot) loads
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"w": torch.ones(2)}, str(blobs / "abc"))
    os.symlink(blobs / "abc", folder / "model-00001.safetensors")
    index = {"weight_map": {"w": "model-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(_read_hf_weights(folder)["w"], torch.ones(2))


def test_pickled_pytorch_bin_in_hf_folder_is_refused(tmp_path):
    from lmforge.export.hf import _read_hf_weights

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "hf"
    folder.mkdir()
    with (folder / "pytorch_model.bin").open("wb") as fh:
        pickle.dump({"w": Payload()}, fh)
    from lmforge.export.hf import ExportError

    with pytest.raises(ExportError, match="pickled weights are not loaded"):
        _read_hf_weights(folder)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- recipes


def test_recipe_yaml_cannot_build_python_objects(tmp_path):
    from lmforge.config import ConfigError, load_config

    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"train: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    with pytest.raises(ConfigError):
        load_config(str(recipe), [])
    assert not (tmp_path / "pwned").exists()
