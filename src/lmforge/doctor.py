"""`lmforge doctor`: is this machine ready to train, and what is missing?

Each check returns a :class:`Check` with a status (``ok``, ``warn``, ``missing``,
``error``), what was found, what it means for the user and, when something is
missing, how to fix it. Only a missing *core* piece (Python, torch, the core
packages) makes the command exit non-zero; a missing optional extra only turns
off the stage that needs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# torch versions the code and tests are checked against (pyproject: torch>=2.11,<2.14).
TORCH_SUPPORTED = ((2, 11), (2, 13))

CORE_MODULES = ["torch", "numpy", "tokenizers", "safetensors", "yaml", "rich"]

# extra → (import names, the stages that need it). Import names, not distribution names.
EXTRAS: dict[str, tuple[list[str], str]] = {
    "data": (
        [
            "trafilatura",
            "warcio",
            "rensa",
            "datasketch",
            "py3langid",
            "ftfy",
            "zstandard",
            "pyarrow",
            "datasets",
        ],
        "`lmforge prepare` (HTML/WARC extraction, language id, dedup, Parquet, HF datasets)",
    ),
    "ray": (["ray"], "`lmforge prepare --prepare.executor=ray` (a Ray cluster executor)"),
    "hf": (
        ["transformers", "peft", "accelerate"],
        "HF model import/fine-tuning, LoRA via peft, lm-eval parity",
    ),
    "eval": (["sacrebleu", "rouge_score"], "BLEU/chrF and ROUGE in `lmforge eval` and fine-tuning"),
    "export": (["gguf"], "`lmforge export --format gguf` (llama.cpp)"),
    "serve": (
        ["fastapi", "uvicorn", "httpx", "jinja2", "multipart"],
        "`lmforge serve` (arena, chat playground, dashboard)",
    ),
    "report": (["matplotlib"], "plots in the report card (`lmforge report`, `lmforge compare`)"),
    "tensorboard": (["tensorboard"], "`--train.tensorboard=true` event files"),
    "docs": (["mkdocs", "material"], "building this documentation (`mkdocs build`)"),
}

CHROMIUM = Path("/usr/bin/chromium")
MIN_FREE_GB = 5.0  # a small run with a few checkpoints fits in well under this


@dataclass
class Check:
    name: str
    status: str  # ok | warn | missing | error
    found: str
    meaning: str = ""
    fix: str = ""
    core: bool = False  # a failure here makes `lmforge doctor` exit 1


def _has_module(name: str, do_import: bool = False) -> bool:
    """Whether `name` is installed; with `do_import`, whether it actually imports (slower:
    peft alone takes ≈ 13 s here, but it catches broken installs such as trafilatura
    without lxml_html_clean)."""
    try:
        if importlib.util.find_spec(name) is None:
            return False
        if do_import:
            importlib.import_module(name)
        return True
    except Exception:  # a broken package can raise anything on import
        return False


TORCH_FIX = 'pip install -c constraints.txt -e "."  (pins torch==2.13.0)'


def _core_check(name: str, ok: bool, found: str, meaning: str, fix: str) -> Check:
    """A check the core needs; what a failure means and its fix are shown only on failure."""
    return Check(
        name, "ok" if ok else "error", found, "" if ok else meaning, "" if ok else fix, core=True
    )


def check_python() -> Check:
    v = sys.version_info
    return _core_check(
        "python",
        (3, 11) <= (v.major, v.minor) < (3, 13),
        f"Python {platform.python_version()} ({sys.executable})",
        "lmforge is tested on Python 3.11 and 3.12 only.",
        "Create a virtual environment with Python 3.11 or 3.12.",
    )


def check_torch() -> Check:
    if not _has_module("torch"):
        return _core_check(
            "torch", False, "not installed", "Nothing can train without PyTorch.", TORCH_FIX
        )
    import torch

    version = torch.__version__.split("+")[0]
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    return _core_check(
        "torch",
        TORCH_SUPPORTED[0] <= major_minor <= TORCH_SUPPORTED[1],
        f"torch {torch.__version__}",
        "lmforge supports torch 2.11 to 2.13; other versions are untested.",
        TORCH_FIX,
    )


def check_core_modules(modules: list[str] | None = None) -> Check:
    missing = [m for m in (modules or CORE_MODULES) if not _has_module(m)]
    return _core_check(
        "core packages",
        not missing,
        "missing: " + ", ".join(missing) if missing else "all importable",
        "lmforge itself cannot start without these.",
        'pip install -c constraints.txt -e "."',
    )


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty off Linux)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Check:
    flags = cpu_flags(cpuinfo)
    model = platform.processor() or platform.machine()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    feats = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    found = f"{model}; {', '.join(feats) or 'no AVX2/AVX-512 flags seen'}"
    if native_bf16:
        return Check(
            "cpu",
            "ok",
            found,
            "The CPU multiplies bf16 natively: --train.dtype=bf16-pure (or auto, which picks "
            "it here) or bf16 (autocast) multiplies 2-3x faster than fp32 (≈ 700 vs 250 "
            "GFLOP/s for 768×128×512 on 2 AMX Xeon cores).",
        )
    return Check(
        "cpu",
        "warn",
        found,
        "No AVX512-BF16/AMX: bf16 autocast on this CPU emulates bf16 and is usually no faster "
        "than fp32; keep --train.dtype=fp32 for CPU runs.",
        "Nothing to install; use a GPU or a CPU with AVX512-BF16 for faster bf16.",
    )


def check_threads() -> Check:
    import torch

    cores = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    threads = torch.get_num_threads()
    found = f"torch uses {threads} threads; {affinity} cores available to this process"
    if threads > affinity:
        return Check(
            "threads",
            "warn",
            found,
            "More compute threads than cores: threads compete and training slows down.",
            f"Set --train.threads={affinity} or OMP_NUM_THREADS={affinity}.",
        )
    return Check("threads", "ok", found)


def check_kernels() -> Check:
    """Whether the C kernels build here (attention for bf16/fp16 CPU training)."""
    from lmforge import kernels

    if os.environ.get("LMFORGE_KERNELS", "1") == "0":
        return Check("cpu kernels", "ok", "switched off (LMFORGE_KERNELS=0)")
    try:
        kern = kernels.load()
    except (OSError, RuntimeError) as e:
        return Check(
            "cpu kernels",
            "warn",
            str(e).splitlines()[0],
            "bf16 CPU training of short contexts uses torch's operators for attention "
            "instead of lmforge's C kernel: the same math, ≈ 10% slower steps at the "
            "baby-GPT size (BENCHMARKS.md).",
            "Install a C compiler (Debian/Ubuntu: apt install gcc), or set CC.",
        )
    return Check("cpu kernels", "ok", f"built for -march={kernels.march()}: {kern.path}")


def check_gpu() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check(
            "gpu",
            "warn",
            f"no CUDA device (torch built with CUDA {torch.version.cuda or 'none'})",
            "Training runs on CPU: fine for the quickstart and small recipes, far too slow "
            "for gpt2-124m and larger (see `lmforge plan`).",
            "On a GPU machine install a CUDA build of torch 2.11–2.13 (drop -c constraints.txt).",
        )
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    try:
        nccl_version = ".".join(str(x) for x in torch.cuda.nccl.version()) if nccl else ""
    except (RuntimeError, AttributeError):
        nccl_version = ""
    found = f"{len(names)} × {names[0]}; CUDA {torch.version.cuda}; NCCL {nccl_version or 'no'}"
    bf16 = torch.cuda.is_bf16_supported()
    meaning = "bf16 supported" if bf16 else "no bf16 on this GPU: use --train.dtype=fp32"
    if len(names) > 1 and not nccl:
        return Check(
            "gpu",
            "warn",
            found,
            "Several GPUs but no NCCL: torchrun multi-GPU training will not work.",
            "Install a torch build with NCCL (the official CUDA wheels have it).",
        )
    return Check("gpu", "ok", found, meaning)


def check_disk(folder: Path, min_free_gb: float = MIN_FREE_GB) -> Check:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_gb = usage.free / 1e9
    found = f"{free_gb:.1f} GB free for {folder}"
    if free_gb < min_free_gb:
        return Check(
            "disk",
            "warn",
            found,
            f"Less than {min_free_gb:g} GB free: checkpoints of larger models may not fit "
            "(a checkpoint is ≈ 16 bytes per parameter with AdamW state).",
            "Free space, lower --train.keep_last, or set output.dir on a bigger disk.",
        )
    return Check("disk", "ok", found)


def check_extra(
    extra: str, modules: list[str] | None = None, needed_for: str = "", do_import: bool = False
) -> Check:
    """Whether an optional extra's packages are installed (`do_import`: import them);
    `modules` overrides the extra's package list."""
    default_modules, default_needed = EXTRAS.get(extra, ([], ""))
    modules = default_modules if modules is None else modules
    needed_for = needed_for or default_needed
    missing = [m for m in modules if not _has_module(m, do_import)]
    if not missing:
        return Check(f"extra: {extra}", "ok", "installed")
    return Check(
        f"extra: {extra}",
        "missing",
        "missing: " + ", ".join(missing),
        f"Without it: {needed_for} will not work; everything else does.",
        f'pip install -c constraints.txt -e ".[{extra}]"',
    )


def check_chromium(path: Path = CHROMIUM) -> Check:
    if path.exists():
        return Check("chromium", "ok", str(path))
    return Check(
        "chromium",
        "missing",
        f"{path} not found",
        "Only the browser tests (report card, web app, docs screenshot) need it; they are skipped.",
        "apt-get install -y chromium  (never `playwright install`: it downloads a browser)",
    )


def check_shared_data() -> Check:
    from lmforge.paths import shared_data

    folder = shared_data()
    if folder.is_dir():
        n = sum(1 for p in folder.iterdir() if p.is_dir())
        return Check("shared data", "ok", f"{folder} ({n} datasets)")
    return Check(
        "shared data",
        "missing",
        f"{folder} not found",
        "Recipes naming 'shared:...' data (gutenberg-small, finetune-multi30k, ...) and many "
        "tests cannot run; the quickstart (Python standard library corpus) still works.",
        "Put the shared data beside the checkout (../shared/data) or set LMFORGE_SHARED_DATA.",
    )


def run_checks(
    runs_dir: Path = Path("runs"), extras: list[str] | None = None, do_import: bool = False
) -> list[Check]:
    checks = [check_python(), check_torch(), check_core_modules()]
    if checks[1].status == "ok":
        checks += [check_cpu(), check_threads(), check_kernels(), check_gpu()]
    checks.append(check_disk(runs_dir))
    checks += [check_extra(name, do_import=do_import) for name in (extras or list(EXTRAS))]
    checks += [check_chromium(), check_shared_data()]
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.core and c.status == "error" for c in checks) else 0


_MARK = {"ok": "ok  ", "warn": "warn", "missing": "MISS", "error": "FAIL"}


def format_checks(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{_MARK.get(c.status, c.status)}] {c.name}: {c.found}")
        if c.meaning:
            lines.append(f"       {c.meaning}")
        if c.fix and c.status != "ok":
            lines.append(f"       fix: {c.fix}")
    bad = [c for c in checks if c.core and c.status == "error"]
    lines.append(
        "core: NOT ready (" + ", ".join(c.name for c in bad) + ")"
        if bad
        else "core: ready to train"
    )
    return "\n".join(lines)


def cmd_doctor(args, overrides) -> int:
    """Check this machine: Python, torch, CPU bf16 support, threads, GPU/CUDA/NCCL, disk space,
    optional extras, Chromium and the shared data; say what each missing piece means and how
    to fix it. Exits 1 only if something the core needs is missing.
    """
    checks = run_checks(Path(args.runs), do_import=args.do_import)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(format_checks(checks))
    return exit_code(checks)


def register(subparsers) -> None:
    doc = inspect.cleandoc(cmd_doctor.__doc__ or "")
    p = subparsers.add_parser("doctor", help=doc.splitlines()[0], description=doc)
    p.set_defaults(func=cmd_doctor)
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--runs", default="runs", help="folder whose disk space to check")
    p.add_argument(
        "--import",
        dest="do_import",
        action="store_true",
        help="import every optional package instead of only finding it (slower, ≈ 30 s)",
    )
