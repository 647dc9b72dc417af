"""A 100-step golden loss curve: catches any unintended change to numerics.

Tolerance 1e-3 nats allows BLAS kernel differences between CPUs of the same
kind; a change to init, schedule, data order, loss or model shifts the curve by
far more (a 10% change of lr moves every logged step by ≥ 8e-3).
"""

import json

import pytest
from golden_run import GOLDEN, run_golden


def test_golden_loss_curve(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    result = run_golden(tmp_path)
    assert result["train_loss"].keys() == golden["train_loss"].keys()
    for step, loss in golden["train_loss"].items():
        assert result["train_loss"][step] == pytest.approx(loss, abs=1e-3), f"step {step}"
    assert result["val_loss"] == pytest.approx(golden["val_loss"], abs=1e-3)
