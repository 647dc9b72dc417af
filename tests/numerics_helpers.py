"""Tolerances derived from the dtype and the reduction, for the numerics tests.

The machines differ (Intel Xeon with AMX, AMD EPYC without; oneDNN and MKL pick other
kernels per CPU, and `ATEN_CPU_CAPABILITY=avx2` others again), so no bound here is a
number read off one of them: each is the rounding a dtype must make, or the error of
another evaluation of the same function on the same CPU, against float64.
"""

from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 2^-23


def unit_roundoff(dtype: torch.dtype) -> float:
    """The largest relative error of one rounding to `dtype`: half its epsilon
    (bf16 2^-8, fp16 2^-11, fp32 2^-24)."""
    return torch.finfo(dtype).eps / 2


def assert_rounded_once(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, terms: int):
    """`got` was computed in fp32 from inputs already in `dtype` and rounded once to
    `dtype`; `ref` is the same function in float64 of the same inputs. Elementwise,
    |got - ref| ≤ u·|ref| (the final rounding) + terms·eps32·max|ref| (fp32 sums of at
    most `terms` terms of that size, worst case: Higham, Accuracy and Stability, §3.1)."""
    got, ref = got.double(), ref.double()
    bound = unit_roundoff(dtype) * ref.abs() + terms * FP32_EPS * ref.abs().max()
    excess = ((got - ref).abs() - bound).max().item()
    assert excess <= 0, f"off by {(got - ref).abs().max().item():.3g}, beyond the bound"


def assert_as_accurate_as(
    got: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, factor: float = 4.0
):
    """`got` and `baseline` are two fp32 evaluations of one function (say the cached
    decode and the full forward), `ref` its float64 evaluation. Their rounding errors
    pass through the same intermediate values (the same scores, the same softmax
    sharpness), so on any CPU they are of one order; sharp attention can amplify them
    far past the output's own magnitude times eps, which is why no fixed atol holds
    across CPUs. Bound: `factor` times the baseline's largest error, plus 16 roundings
    of the largest output (a baseline that happens to be nearly exact). A real bug (a
    stale key, a wrong scale) is off by orders of magnitude more."""
    got, baseline, ref = got.double(), baseline.double(), ref.double()
    err = (got - ref).abs().max().item()
    base_err = (baseline - ref).abs().max().item()
    bound = factor * base_err + 16 * FP32_EPS * ref.abs().max().item()
    assert err <= bound, f"error {err:.3g} against float64; the baseline's is {base_err:.3g}"
