"""lmforge needs nothing beside its package: the wheel, installed into a fresh virtualenv
in a temporary folder with no shared data folder, carries everything `lmforge quickstart`
reads (recipes, the C kernel's source, CrowS-Pairs with its attribution) and runs it.

The virtualenv sees the system's packages (torch and the rest come from there), and the
system may hold an editable lmforge: every check first asserts that the lmforge it runs
is the one installed in the virtualenv.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lmforge.bias.pairs import crows_pairs_path, load_crows_pairs, load_minimal_pairs
from lmforge.paths import shared_data

ROOT = Path(__file__).resolve().parents[1]
SHARED_CSV = shared_data() / "crows_pairs" / "crows_pairs_anonymized.csv"
QUICKSTART_READS = {
    "lmforge/recipes/quickstart.yaml",
    "lmforge/kernels/cpu_kernels.c",
    "lmforge/bias/data/crows_pairs.jsonl.gz",
    "lmforge/bias/data/ATTRIBUTION.md",
}


def test_packaged_crows_pairs_equals_the_original_csv(tmp_path):
    """Record by record: the packaged pairs are the CSV's (ids, sentences, bias type,
    direction), and the script in scripts/ regenerates the packaged file byte for byte."""
    if not SHARED_CSV.is_file():
        pytest.skip(f"the original CSV is not here ({SHARED_CSV})")
    packaged, original = load_crows_pairs(), load_minimal_pairs(SHARED_CSV)
    assert len(packaged) == len(original) == 1508
    for ours, theirs in zip(packaged, original, strict=True):
        assert ours == theirs, theirs.id
    out = tmp_path / "crows_pairs.jsonl.gz"
    script = ROOT / "scripts" / "package_crows_pairs.py"
    subprocess.run([sys.executable, str(script), str(SHARED_CSV), "--out", str(out)], check=True)
    assert out.read_bytes() == crows_pairs_path().read_bytes()
    # a converted form, not a copy of the shared file (which must never be committed)
    assert gzip.decompress(out.read_bytes()) != SHARED_CSV.read_bytes()


def test_crows_pairs_and_its_decontamination_need_no_shared_data(tmp_path, monkeypatch):
    from lmforge.data.decontam import iter_eval_texts

    monkeypatch.setenv("LMFORGE_SHARED_DATA", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    assert not shared_data().exists()
    sets = load_crows_pairs()
    assert len(sets) == 1508 and len({s.category for s in sets}) == 9
    assert sum(1 for _ in iter_eval_texts("crows_pairs")) == 2 * 1508


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, virtualenv python, environment): lmforge built from this checkout's files
    into a wheel, installed into a fresh virtualenv; an environment with no shared data."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp / "dist"), str(source)])  # fmt: skip
    (wheel,) = (tmp / "dist").glob("lmforge-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # run from a virtualenv: its packages, not the base's
        purelib = _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        )
        outer = "\n".join(site.getsitepackages()) + "\n"  # after the new venv's own packages
        (Path(purelib.stdout.strip()) / "outer_site_packages.pth").write_text(outer)
    # The system's pip, run by the virtualenv's interpreter, installs into the virtualenv.
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMFORGE_SHARED_DATA")}
    env["LMFORGE_KERNEL_CACHE"] = str(tmp / "kernel-cache")
    (tmp / "cwd").mkdir()
    return wheel, python, env, tmp


CHECK_INSTALLED = """
import json, lmforge
from lmforge import kernels
from lmforge.bias.pairs import crows_pairs_path, load_crows_pairs
from lmforge.config import load_config
from lmforge.paths import shared_data
cfg = load_config("quickstart", [])
built = kernels.load().path.name if kernels.find_compiler() else None
print(json.dumps({
    "lmforge": lmforge.__file__, "shared_data": shared_data().exists(),
    "crows_pairs": str(crows_pairs_path()), "pairs": len(load_crows_pairs()),
    "benchmarks": cfg.bias.benchmarks, "kernel": built,
}))
"""


def test_wheel_ships_what_the_quickstart_reads(installed):
    """The wheel holds the recipes, the kernel's C source and CrowS-Pairs with its
    attribution; installed, the quickstart's config loads, CrowS-Pairs loads from the
    package and the kernel builds, with no shared data folder."""
    wheel, python, env, tmp = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert names >= QUICKSTART_READS, QUICKSTART_READS - names
    assert (
        "CC BY-SA 4.0" in zipfile.ZipFile(wheel).read("lmforge/bias/data/ATTRIBUTION.md").decode()
    )
    out = _run([str(python), "-c", CHECK_INSTALLED], env=env, cwd=tmp / "cwd").stdout
    got = json.loads(out.strip().splitlines()[-1])
    site = str(python.parent.parent)
    assert got["lmforge"].startswith(site), got  # not a source checkout on the path
    assert got["crows_pairs"].startswith(site) and got["pairs"] == 1508
    assert not got["shared_data"] and got["benchmarks"] == ["crows_pairs"]
    assert got["kernel"] is None or got["kernel"].startswith("cpu_kernels-")


# `lmforge quickstart` shrunk: a few hundred kB of the standard library, a 1-layer model,
# a few steps per stage; every stage of the recipe still runs.
TINY_QUICKSTART = [
    "data.max_bytes=200000", "data.val_fraction=0.1", "tokenizer.vocab_size=400",
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.context_length=64",
    "train.micro_batch_size=4", "train.tokens_per_step=256", "train.max_steps=4",
    "train.warmup_steps=2", "train.log_every=1", "train.eval_every=2", "train.eval_tokens=512",
    "train.checkpoint_every=2", "train.peak_flops=1e11", "train.dtype=fp32",
    "train.tensorboard=false", "finetune.max_steps=2", "finetune.max_examples=12",
    "finetune.eval_examples=2", "finetune.max_new_tokens=4", "eval.limit=3", "eval.samples=1",
    "eval.sample_tokens=8", "bias.limit=40", "bias.samples=1", "bias.max_new_tokens=4",
]  # fmt: skip


@pytest.mark.slow
def test_installed_wheel_runs_every_quickstart_stage_without_shared_data(installed):
    """≈ 1.5 CPU-minutes; several minutes of wall time on a busy 2-core machine."""
    _, python, env, tmp = installed
    run = tmp / "run"
    lmforge = python.parent / "lmforge"  # the wheel's console script
    overrides = [f"--{o}" for o in [*TINY_QUICKSTART, f"output.dir={run}"]]
    _run([str(lmforge), "quickstart", *overrides], env=env, cwd=tmp / "cwd", timeout=1200)
    stages = json.loads((run / "stages.json").read_text())
    recipe_stages = ["tokenizer", "tokenize", "pretrain", "finetune", "eval", "bias", "export"]
    assert [s for s in recipe_stages if not stages.get(s, {}).get("done")] == []
    assert stages["report"]["done"] and (run / "report.html").exists()
    bias = json.loads((run / "bias" / "bias.json").read_text())
    assert [c["label"] for c in bias["checkpoints"]] == ["pretrained", "finetuned"]
    for audited in bias["checkpoints"]:  # the packaged CrowS-Pairs, its first 40 pairs
        assert audited["benchmarks"]["crows_pairs"]["overall"]["n"] == 40
