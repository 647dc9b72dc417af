"""`lmforge scale`: the iso-FLOP ladder and the scaling-law fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import shakespeare_snippet

from lmforge.config import ModelConfig, load_config
from lmforge.model.transformer import flops_per_token
from lmforge.scale import DEFAULT_SHAPES, fit_law, plan_ladder, predict, shape_config


def test_ladder_is_iso_flop():
    base = ModelConfig(vocab_size=72, context_length=64)
    budgets = [6e9, 2e10, 6e10]
    rungs = plan_ladder(base, budgets, DEFAULT_SHAPES, 2048)
    assert {r["budget"] for r in rungs} == set(budgets)
    for r in rungs:
        cfg = shape_config(base, *r["shape"])
        # D rounds to whole steps: the rung's FLOPs are within half a step of the budget.
        half_step = flops_per_token(cfg) * 2048 / 2
        assert abs(r["flops"] - r["budget"]) <= half_step
        assert 4 <= r["tokens"] / r["params"] <= 250


def test_fit_recovers_a_known_law():
    """Noise-free losses from a known law: the fit extrapolates to a 4× larger run."""
    truth = {"_x": [np.log(60.0), np.log(400.0), np.log(1.3), 0.45, 0.38]}
    n, d = [], []
    for c in (1e10, 3e10, 1e11):
        for size in (5e3, 1e4, 2e4, 4e4):
            n.append(size)
            d.append(c / (6 * size))
    n_arr, d_arr = np.array(n), np.array(d)
    loss = np.array([predict(truth, a, b) for a, b in zip(n_arr, d_arr, strict=True)])
    starts = [np.array([a, b, 0.0, 0.5, 0.5]) for a in (2.0, 6.0) for b in (2.0, 6.0)]
    fit = fit_law(n_arr, d_arr, loss, starts=starts)
    target = (8e4, 4e11 / (6 * 8e4))
    assert predict(fit, *target) == pytest.approx(predict(truth, *target), rel=5e-3)
    assert fit["E"] == pytest.approx(1.3, rel=0.1)


@pytest.mark.slow
def test_scale_end_to_end(tmp_path):
    from lmforge.scale import scale

    corpus = shakespeare_snippet(tmp_path, 400_000)
    cfg = load_config(
        "shakespeare-char",
        [
            f"data.sources=[{corpus}]",
            "train.tokens_per_step=2048",
            "train.micro_batch_size=32",
            "train.eval_tokens=8192",
            "train.threads=1",
            "train.peak_flops=1e11",
        ],
    )
    report = scale(cfg, tmp_path / "scale", [3e9, 1e10], predict_flops=3e10, bootstrap_samples=10)
    assert (tmp_path / "scale" / "scale.png").stat().st_size > 0
    saved = json.loads((tmp_path / "scale" / "scale.json").read_text())
    assert saved["held_out"]["val_loss"] == report["held_out"]["val_loss"]
    assert abs(report["held_out"]["relative_error"]) < 0.15
