"""Process-wide allocator settings for CPU work (no torch import: the CLI calls it first)."""

from __future__ import annotations

import os
import platform

# glibc malloc options (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep freed tensor memory in the process instead of returning it to the kernel.

    glibc serves allocations above `M_MMAP_THRESHOLD` (128 KiB at first, adjusted
    as the program runs) with fresh `mmap` pages and unmaps them when freed, so a
    training step that allocates the same activations again and again takes a page
    fault on every 4 KiB it touches. On the baby GPT that was ≈ 3,500 faults per
    step and 15-20% of the wall time (benchmarks/LOG.md). Raising the mmap and trim
    thresholds to 32 / 256 MiB (the largest mmap threshold glibc accepts) and
    padding the heap by 64 MiB lets the heap keep and reuse those pages: what
    jemalloc or tcmalloc would give, without installing either.

    Called by the `lmforge` command before any work. No-op off glibc (macOS, musl)
    or when `LMFORGE_MALLOC_TUNING=0`; idempotent. Returns whether it applied.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if os.environ.get("LMFORGE_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and others have no such symbol  # noqa: B018
    except (OSError, AttributeError):
        return False
    ok = all(
        libc.mallopt(option, value) == 1
        for option, value in (
            (_M_MMAP_THRESHOLD, 32 << 20),
            (_M_TRIM_THRESHOLD, 256 << 20),
            (_M_TOP_PAD, 64 << 20),
        )
    )
    _malloc_tuned = ok
    return ok
