"""Small C kernels for the CPU, built on first use with the system's C compiler.

`get()` returns the kernels of `cpu_kernels.c` — for now causal attention for
short sequences, forward and backward; bf16/fp16 in and out, fp32 math (see the
file's header) — or None when they cannot be had: no C compiler, a failed build
(with a warning), not Linux on x86-64 or ARM64, or ``LMFORGE_KERNELS=0``. Callers
then use torch's operators, which compute the same thing; tests compare the two.

The source is plain C, so a build takes about a second (no torch headers). It is
compiled for this CPU (``-march=native``; ``$LMFORGE_KERNEL_MARCH`` names another
target, e.g. ``x86-64-v3`` for AVX2 without AVX-512 or ``x86-64-v4``: the build of a
CPU other than this one, which the tests use as a stand-in; a target whose instructions
this CPU lacks dies of an illegal instruction) and cached under
``$LMFORGE_KERNEL_CACHE`` (default ``~/.cache/lmforge/kernels``; a per-user folder in
the temporary directory when that cannot be written), keyed by the source,
the flags, the compiler's version and the CPU's model and flags: a cache copied to
another machine is rebuilt, not run with instructions it lacks. The library links to
the OpenMP runtime torch has loaded, so the kernels' threads are torch's threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_CFLAGS = ["-O3", "-fPIC", "-fopenmp", "-std=gnu11"]
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}

_lock = threading.Lock()
_kernels: CpuKernels | None = None
_tried = False


class View(ctypes.Structure):
    """A (B, H, T, D) tensor as the kernel reads it: pointer and element strides."""

    _fields_ = [
        ("ptr", ctypes.c_void_p),
        ("sb", ctypes.c_int64),
        ("sh", ctypes.c_int64),
        ("st", ctypes.c_int64),
    ]


def view(t: torch.Tensor, offset: int = 0, bhtd: tuple[int, int, int] | None = None) -> View:
    """`View` of `t` (B, H, T, D) with D contiguous, `offset` elements in.

    bhtd: the batch, head and time strides, when `t` is not shaped (B, H, T, D).
    """
    sb, sh, st = bhtd if bhtd is not None else t.stride()[:3]
    return View(t.data_ptr() + offset * t.element_size(), sb, sh, st)


def _check(t: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    """The C reads raw memory: every tensor must be a dense CPU buffer of the right type."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous CPU tensor")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected {dtype}, got {t.dtype}")


@dataclass
class CpuKernels:
    """The loaded library. The attention takes `View`s: its callers read q, k and v in
    place, with their strides, and the C does no bounds checks, so every call site
    builds its views from tensors it allocated or checked."""

    lib: ctypes.CDLL
    path: Path
    block: int  # the attention pads time to a multiple of this

    def padded(self, T: int) -> int:
        """T rounded up to the kernel's block: the probabilities are (B·H, padded, padded)."""
        return -(-T // self.block) * self.block

    def _attention_checks(self, probs: torch.Tensor, B: int, H: int, T: int) -> None:
        _check(probs, "probabilities", torch.float32)
        if probs.numel() != B * H * self.padded(T) ** 2:
            raise ValueError("probabilities: expected B·H·padded(T)² elements")

    def attention_forward(
        self, q: View, k: View, v: View, y: View, probs: torch.Tensor,
        B: int, H: int, T: int, D: int, dtype: torch.dtype, scale: float,
    ) -> None:  # fmt: skip
        """y = softmax(q·kᵀ·scale, causal)·v per (batch, head); probs saved for backward."""
        self._attention_checks(probs, B, H, T)
        rc = self.lib.lmf_attention_forward(
            q, k, v, y, probs.data_ptr(), B, H, T, D, _DTYPES[dtype], scale,
            torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("cpu attention: could not allocate a thread's workspace")

    def attention_backward(
        self, q: View, k: View, v: View, dy: View, probs: torch.Tensor,
        dq: View, dk: View, dv: View,
        B: int, H: int, T: int, D: int, dtype: torch.dtype, scale: float,
    ) -> None:  # fmt: skip
        self._attention_checks(probs, B, H, T)
        rc = self.lib.lmf_attention_backward(
            q, k, v, dy, probs.data_ptr(), dq, dk, dv, B, H, T, D, _DTYPES[dtype], scale,
            torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("cpu attention: could not allocate a thread's workspace")


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPES


def _openmp_runtime() -> Path | None:
    """The OpenMP runtime (libgomp) torch has loaded, if any.

    Other libraries bring their own (scikit-learn does), so the one in torch's folder
    (``torch/lib`` or a wheel's ``torch.libs``) is preferred to the first one mapped.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and Path(parts[5]).name.startswith("libgomp"):
            found.append(Path(parts[5]))
    torch_dir = Path(torch.__file__).resolve().parent
    for path in found:
        if path.resolve().parent in (torch_dir / "lib", torch_dir.parent / "torch.libs"):
            return path
    return found[0] if found else None


def _cache_dir() -> Path:
    env = os.environ.get("LMFORGE_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmforge" / "kernels"


def march() -> str:
    """The ``-march`` target the kernels are built for: ``$LMFORGE_KERNEL_MARCH``, else
    ``native``."""
    value = os.environ.get("LMFORGE_KERNEL_MARCH", "").strip() or "native"
    if not all(c.isalnum() or c in "-_.+" for c in value) or value.startswith("-"):
        raise RuntimeError(
            f"LMFORGE_KERNEL_MARCH={value!r} is not a -march target: "
            "use one such as native, x86-64-v3 or x86-64-v4"
        )
    return value


def _cflags() -> list[str]:
    return [*_CFLAGS, f"-march={march()}"]


def _cpu_identity() -> str:
    """Model name and flags of the first CPU: what -march=native compiles for."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [
        ln for ln in info.split("\n\n")[0].splitlines()
        if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")
    ]  # fmt: skip
    return "\n".join(keep)


def _build(cc: str, gomp: Path | None) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        raise RuntimeError(f"{cc} --version failed:\n{version.stderr.strip()[-2000:]}")
    key_parts = [
        _SOURCE.read_text(), " ".join(_cflags()), version.stdout, _cpu_identity(),
        platform.machine(), str(gomp),
    ]  # fmt: skip
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:16]
    name = f"cpu_kernels-{key}.so"
    for out_dir in _cache_dirs():
        if (out_dir / name).exists():
            return out_dir / name
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            return _compile(cc, gomp, out_dir, name)
        except (PermissionError, NotADirectoryError, FileExistsError):
            continue  # a cache folder we cannot write: the next one
    raise RuntimeError(f"no writable folder for the kernel among {_cache_dirs()}")


def _cache_dirs() -> list[Path]:
    """The cache, then a per-user folder in the temporary directory (a read-only home)."""
    return [_cache_dir(), Path(tempfile.gettempdir()) / f"lmforge-kernels-{os.getuid()}"]


def _compile(cc: str, gomp: Path | None, out_dir: Path, name: str) -> Path:
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        obj, lib = Path(tmp) / "cpu_kernels.o", Path(tmp) / "cpu_kernels.so"
        steps = [[cc, *_cflags(), "-c", str(_SOURCE), "-o", str(obj)]]
        # Link to torch's runtime by path: one thread pool, not two.
        link = [str(gomp), f"-Wl,-rpath,{gomp.parent}"] if gomp else ["-fopenmp"]
        steps.append([cc, "-shared", str(obj), *link, "-o", str(lib)])
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(lib, out_dir / name)  # atomic: a concurrent builder finds a whole file or none
    return out_dir / name


def find_compiler() -> str | None:
    """The C compiler the kernels build with: ``$CC``, else ``cc`` or ``gcc`` on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def load(cc: str | None = None) -> CpuKernels:
    """Build (or find in the cache) and load the kernels; raises on failure.

    cc: the C compiler; default ``$CC``, else ``cc`` or ``gcc`` on PATH.
    """
    cc = cc or find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler: set CC or put cc or gcc on PATH")
    path = _build(cc, _openmp_runtime())
    lib = ctypes.CDLL(str(path))
    view_t, i, f, p = View, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    signatures = {
        "lmf_attention_forward": [view_t, view_t, view_t, view_t, p, i, i, i, i, i, f, i],
        "lmf_attention_backward": [
            view_t, view_t, view_t, view_t, p, view_t, view_t, view_t, i, i, i, i, i, f, i,
        ],
    }  # fmt: skip
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = i
    return CpuKernels(lib, path, lib.lmf_block())


def get() -> CpuKernels | None:
    """The CPU kernels, built and loaded once per process; None if unavailable (with a
    warning when a compiler was there but the build failed)."""
    global _kernels, _tried
    if _tried:
        return _kernels
    with _lock:
        if _tried:
            return _kernels
        _tried = True
        if os.environ.get("LMFORGE_KERNELS", "1") == "0":
            return None
        if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
            return None
        if find_compiler() is None:
            return None
        try:
            _kernels = load()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            warnings.warn(
                f"lmforge: the CPU kernels could not be built ({e}); "
                "using torch's operators instead (slower for small models)",
                RuntimeWarning,
                stacklevel=2,
            )
        return _kernels
