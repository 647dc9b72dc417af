"""The C attention kernel (`lmforge.kernels`): numerics against float64 SDPA at shapes
that exercise its padding, NaN propagation, threads, and how it is built, cached and
given up on."""

import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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


@needs_cc
@pytest.mark.parametrize(
    ("B", "T", "H", "D"),
    [(1, 1, 1, 16), (2, 37, 3, 24), (1, 130, 2, 64), (3, 16, 2, 40)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_float64_sdpa_at_padded_shapes(monkeypatch, B, T, H, D, dtype):
    """Time and head sizes off the kernel's block of 16, one position, one head: the
    kernel's error against float64 is that of its torch form (both round only the bf16
    or fp16 inputs and outputs), within a margin."""
    monkeypatch.setattr(kernels, "_kernels", kernels.load())
    monkeypatch.setattr(kernels, "_tried", True)
    torch.manual_seed(0)
    x = torch.randn(B, T, 3, H, D)
    dy = torch.randn(B, T, H, D)
    ref_y, ref_g = _reference(x.to(dtype), dy.to(dtype))
    y, g = _packed(x.to(dtype), dy.to(dtype))
    kernels._kernels = None  # the torch form, same inputs
    ty, tg = _packed(x.to(dtype), dy.to(dtype))
    for ours, torch_form, ref in ((y, ty, ref_y), (g, tg, ref_g)):
        err, torch_err = (ours - ref).abs().max(), (torch_form - ref).abs().max()
        assert err <= 1.5 * torch_err + 1e-3, (err, torch_err)


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
    assert (y - ref_y).abs().max() < 3e-2 and (g - ref_g).abs().max() < 1e-1


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
