"""Devices, threads and peak FLOP/s (for MFU)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from lmforge.energy import DEVICES
from lmforge.fileio import atomic_path


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("train.device = cuda, but no CUDA device is available")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware (CUDA bf16, or AVX512-BF16/AMX on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from lmforge.doctor import cpu_flags

        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`train.dtype`, with "auto" made concrete for `device`.

    On a CPU with native bf16, "auto" is "bf16-pure": there each autocast cast is a
    kernel call of its own, and the baby GPT's step is ≈ 13% faster without them, to
    the same validation loss (BENCHMARKS.md). On a GPU it is bf16 autocast.
    """
    if dtype == "auto":
        if not native_bf16(device):
            return "fp32"
        return "bf16-pure" if device.type == "cpu" else "bf16"
    return dtype


def gpu_peak_flops(device: torch.device) -> float:
    """Dense bf16 peak of the GPU, from the datasheet table in `lmforge.energy` (0 if unknown)."""
    name = torch.cuda.get_device_name(device).upper().replace(" ", "")
    for key, dev in DEVICES.items():
        if key.split("-")[0].upper() in name:  # "A100-80" matches "NVIDIA A100-SXM4-80GB"
            return dev.peak_flops
    return 0.0


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.6
) -> float:
    """Median FLOP/s of square matmuls on this CPU at the current thread count.

    1024³ is large enough to reach the BLAS peak here and quick to measure;
    the median of short repeats resists the noise of shared machines.
    """
    # A private generator: measuring must not move the global RNG (dropout after a resume).
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    for _ in range(2):
        a @ b
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _peak_cache() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge"
    return Path(root) / "cpu_peak.json"


def peak_flops(device: torch.device, dtype: str) -> float:
    """Peak FLOP/s for MFU: the datasheet figure on GPUs; on CPUs the best matmul rate
    measured so far on this CPU model at this thread count (kept in ~/.cache/lmforge).

    A single measurement on a shared machine can come out several times too low and
    push MFU above 100%; the best one seen is the closest to what the hardware can do.
    """
    if device.type == "cuda":
        peak = gpu_peak_flops(device)
        return peak if dtype == "bf16" else peak / 2  # TF32 is half the bf16 rate
    measured = measure_matmul_peak(torch.bfloat16 if dtype == "bf16" else torch.float32)
    key = f"{cpu_model()}|threads={torch.get_num_threads()}|{dtype}"
    path = _peak_cache()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    best = max(measured, float(cache.get(key, 0.0)))
    if best > float(cache.get(key, 0.0)):
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            cache[key] = best
            # a temporary name of its own: several processes may measure at once
            with atomic_path(path, suffix=f".{os.getpid()}.tmp") as tmp:
                tmp.write_text(json.dumps(cache, indent=1))
    return best
