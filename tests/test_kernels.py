"""The C attention kernel (`lmforge.kernels`): numerics against float64 SDPA at shapes
that exercise its padding, NaN propagation, threads, and how it is built, cached and
given up on."""

import os
import platform
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics_helpers import assert_rounded_once

from lmforge import kernels
from lmforge.model.transformer import PackedSmallCausalAttention, SmallCausalAttention

needs_cc = pytest.mark.skipif(kernels.find_compiler() is None, reason="no C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Forget the process's kernel and build into an empty cache."""
    monkeypatch.setattr(kernels, "_kernels", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    return tmp_path / "cache"


def _reference(x: torch.Tensor, dy: torch.Tensor):
    """float64 SDPA output (B, T, H, D) and gradient of x (B, T, 3, H, D)."""
    x = x.double().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    y.backward(dy.double())
    return y.detach(), x.grad


def _packed(x: torch.Tensor, dy: torch.Tensor):
    B, T, _, H, D = x.shape
    x = x.clone().requires_grad_()
    y = PackedSmallCausalAttention.apply(x.reshape(B, T, 3 * H * D), H)
    y.backward(dy)
    return y.detach().double(), x.grad.double()


# The kernel as configured (for this CPU unless LMFORGE_KERNEL_MARCH says otherwise), and
# for a generic x86-64 target (AVX2 and FMA, no AVX-512: the instructions of an older or
# another vendor's CPU). .ci/run runs this file again with the whole build generic.
MARCHES = ["configured"] + (["x86-64-v3"] if platform.machine() == "x86_64" else [])


@needs_cc
@pytest.mark.parametrize(
    ("B", "T", "H", "D"),
    [(1, 1, 1, 16), (2, 37, 3, 24), (1, 130, 2, 64), (3, 16, 2, 40)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("march", MARCHES)
def test_kernel_matches_float64_sdpa_at_padded_shapes(monkeypatch, B, T, H, D, dtype, march):
    """Time and head sizes off the kernel's block of 16, one position, one head: the
    kernel's error against float64 is that of its torch form (both round only the bf16
    or fp16 inputs and outputs), within a margin."""
    if march != "configured":
        monkeypatch.setenv("LMFORGE_KERNEL_MARCH", march)
    monkeypatch.setattr(kernels, "_kernels", kernels.load())
    monkeypatch.setattr(kernels, "_tried", True)
    torch.manual_seed(0)
    x = torch.randn(B, T, 3, H, D)
    dy = torch.randn(B, T, H, D)
    ref_y, ref_g = _reference(x.to(dtype), dy.to(dtype))
    y, g = _packed(x.to(dtype), dy.to(dtype))
    kernels._kernels = None  # the torch form, same inputs
    ty, tg = _packed(x.to(dtype), dy.to(dtype))
    unit_roundoff = torch.finfo(dtype).eps / 2
    for ours, torch_form, ref in ((y, ty, ref_y), (g, tg, ref_g)):
        err, torch_err = (ours - ref).abs().max(), (torch_form - ref).abs().max()
        # Both forms do the same fp32 math and round the result once to the dtype; they
        # may sum in another order, and one may round a value the other hits exactly
        # (T = 1: y is v). Margin: half again the torch form's error, plus one rounding
        # of the largest value.
        assert err <= 1.5 * torch_err + unit_roundoff * ref.abs().max(), (err, torch_err)


@needs_cc
def test_kernel_target_is_configurable(fresh, monkeypatch):
    """LMFORGE_KERNEL_MARCH picks the compiler's -march and is part of the cache key (a
    generic build never replaces the native one); a value that is no target is one
    clear error, and the model falls back to torch's operators with a warning."""
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 targets")
    monkeypatch.setenv("LMFORGE_KERNEL_MARCH", "native")
    native = kernels.load().path
    monkeypatch.setenv("LMFORGE_KERNEL_MARCH", "x86-64-v3")
    assert "-march=x86-64-v3" in kernels._cflags()
    generic = kernels.load().path
    assert generic != native and {p.name for p in fresh.iterdir()} == {native.name, generic.name}
    monkeypatch.setenv("LMFORGE_KERNEL_MARCH", "native -o /etc/passwd")
    with pytest.raises(RuntimeError, match=r"LMFORGE_KERNEL_MARCH=.* is not a -march target"):
        kernels.load()
    with pytest.warns(RuntimeWarning, match="LMFORGE_KERNEL_MARCH"):
        assert kernels.get() is None


@needs_cc
def test_kernel_propagates_nan(attention_impl):
    """A NaN in one position's key reaches every later query's output, and no other
    batch or head: the masking must not swallow it, so a diverged run shows as one."""
    torch.manual_seed(0)
    x = torch.randn(2, 20, 3, 2, 16).bfloat16()
    x[0, 5, 1, 0, 3] = float("nan")  # key of position 5, head 0, batch 0
    y, _ = _packed(x, torch.randn(2, 20, 2, 16).bfloat16())
    assert y[0, 5:, 0].isnan().all()
    assert not y[1].isnan().any() and not y[0, :, 1].isnan().any()


@needs_cc
def test_kernel_threads_do_not_change_results(attention_impl):
    """Each (batch, head) pair is one thread's: 1 and 2 threads give the same bits."""
    torch.manual_seed(0)
    x = torch.randn(3, 50, 3, 4, 32).bfloat16()
    dy = torch.randn(3, 50, 4, 32).bfloat16()
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_packed(x, dy))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@needs_cc
def test_split_form_reads_strided_inputs(attention_impl):
    """`SmallCausalAttention` hands the kernel q, k, v with their own strides (here k
    contiguous, q and v slices of one buffer): same result as the packed form."""
    torch.manual_seed(0)
    x = torch.randn(2, 24, 3, 2, 16).bfloat16()
    dy = torch.randn(2, 24, 2, 16).bfloat16()
    y_packed, g_packed = _packed(x, dy)
    xs = x.clone().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in xs.unbind(2))
    y = SmallCausalAttention.apply(q, k.contiguous(), v)
    y.backward(dy)
    assert torch.equal(y.double(), y_packed)
    assert torch.equal(xs.grad.double(), g_packed)


@needs_cc
def test_kernel_is_cached_and_linked_to_torchs_openmp(fresh):
    kern = kernels.get()
    assert kern is not None and kern.path.parent == fresh
    built = kern.path.stat().st_mtime_ns
    again = kernels.load()
    assert again.path == kern.path and kern.path.stat().st_mtime_ns == built
    assert [p.name for p in fresh.iterdir()] == [kern.path.name]  # no temporary left
    # One OpenMP runtime, torch's, so the kernel's threads are torch's threads (other
    # libraries may have loaded theirs: scikit-learn does).
    runtime = kernels._openmp_runtime()
    torch_dir = Path(torch.__file__).resolve().parent
    bundled = [p for p in (torch_dir / "lib").glob("libgomp*")]
    if bundled:
        assert runtime is not None and runtime.resolve().parent == torch_dir / "lib"
    linked = subprocess.run(["ldd", str(kern.path)], capture_output=True, text=True).stdout
    if runtime is not None:
        assert str(runtime) in linked, linked


@needs_cc
def test_failed_build_warns_and_falls_back(fresh, monkeypatch, tmp_path):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: out of cheese' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match="out of cheese"):
        kernels.load(str(broken))
    monkeypatch.setenv("CC", str(broken))
    with pytest.warns(RuntimeWarning, match="out of cheese"):
        assert kernels.get() is None
    # and the model still trains, through the torch form
    x, dy = torch.randn(1, 8, 3, 2, 16).bfloat16(), torch.randn(1, 8, 2, 16).bfloat16()
    (y, g), (ref_y, ref_g) = _packed(x, dy), _reference(x, dy)
    # fp32 math, one rounding to bf16 (T = 8 and D = 16 long reductions; the gradient
    # chains two: see test_model.py)
    assert_rounded_once(y, ref_y, torch.bfloat16, terms=8 + 16)
    assert_rounded_once(g, ref_g, torch.bfloat16, terms=2 * (8 + 16))


def test_kernels_can_be_switched_off(fresh, monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.get() is None
    assert not fresh.exists()  # nothing built


@needs_cc
def test_unwritable_cache_falls_back_to_the_temporary_folder(fresh, monkeypatch, tmp_path):
    """A cache path that cannot be a folder (here: under a file; a read-only home is
    the same for a user who is not root) builds into a per-user temporary folder."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    kern = kernels.load()
    assert kern.path.parent == tmp_path / "tmp" / f"lmforge-kernels-{os.getuid()}"
