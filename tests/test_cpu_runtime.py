"""CPU run-time settings: `train.dtype = auto` and the malloc tuning of the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import tiny_config

import lmforge.doctor
from lmforge.hardware import native_bf16, resolve_dtype
from lmforge.pretrain import pretrain


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "amx_bf16"}, "bf16-pure"),
        ({"avx512f", "avx512_bf16"}, "bf16-pure"),
        ({"avx2"}, "fp32"),
    ],
)
def test_auto_dtype_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(lmforge.doctor, "cpu_flags", lambda *a: flags)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    # explicit choices are kept whatever the hardware
    assert resolve_dtype("fp32", torch.device("cpu")) == "fp32"
    assert resolve_dtype("bf16", torch.device("cpu")) == "bf16"
    assert resolve_dtype("bf16-pure", torch.device("cpu")) == "bf16-pure"


def test_a_run_records_the_dtype_auto_chose(tmp_path):
    cfg = tiny_config(tmp_path, "train.dtype=auto", "train.max_steps=2")
    pretrain(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["dtype"] == ("bf16-pure" if native_bf16(torch.device("cpu")) else "fp32")


# Counts the minor page faults of 20 steps of a small model's forward and backward,
# after 5 warm-up steps, in a fresh interpreter (the malloc settings are per process).
FAULTS = """
import json, resource, sys, torch
from lmforge.malloc import tune_malloc
applied = tune_malloc()
torch.set_num_threads(1)
torch.manual_seed(0)
from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer
m = Transformer(ModelConfig(vocab_size=256, context_length=128, n_layers=2, d_model=256, n_heads=4))
x = torch.randint(0, 256, (8, 128))
def step():
    m(x, x).backward()
    m.zero_grad(set_to_none=True)
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps({"applied": applied,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(env_value: str) -> dict:
    import os

    env = {**os.environ, "LMFORGE_MALLOC_TUNING": env_value}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
def test_malloc_tuning_stops_the_page_faults_of_a_training_step():
    tuned, untuned = _faults("1"), _faults("0")
    assert tuned["applied"] and not untuned["applied"]
    # Untuned, glibc maps and unmaps the activations' pages every step (measured:
    # thousands of faults per step); tuned, the heap keeps them.
    assert tuned["faults"] * 5 < untuned["faults"], (tuned, untuned)


def test_bf16_pure_accumulates_micro_batch_gradients_in_fp32_and_publishes_masters():
    """`train.dtype = bf16-pure`: the bf16 copy's gradients of several micro-batches sum in
    fp32 into the master weights' gradients (not in bf16), and after an update the copy
    holds the masters rounded to bf16."""
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.train.loop import _Bf16Compute

    torch.manual_seed(0)
    master = Transformer(
        ModelConfig(vocab_size=50, n_layers=1, d_model=32, n_heads=4, context_length=16)
    )
    comp = _Bf16Compute(master)
    assert all(p.dtype == torch.bfloat16 for p in comp.model.parameters())
    assert all(p.dtype == torch.float32 for p in master.parameters())
    expected = None
    for i in range(3):
        x = torch.randint(0, 50, (2, 16))
        comp.model(x, x).backward()
        g = [p.grad.float() for p in comp.params]
        expected = g if expected is None else [a + b for a, b in zip(expected, g, strict=True)]
        comp.collect(first=i == 0)
        assert all(p.grad is None for p in comp.params)
    comp.attach()
    assert all(torch.equal(m.grad, e) for m, e in zip(comp.masters, expected, strict=True))
    # bf16 accumulation would differ: the test can tell the two apart
    bf16_sum = [e.bfloat16().float() for e in expected]
    assert any(not torch.equal(a, b) for a, b in zip(expected, bf16_sum, strict=True))
    with torch.no_grad():
        for m in comp.masters:
            m.add_(1e-3)
    comp.publish()
    assert all(
        torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(comp.params, comp.masters, strict=True)
    )


@pytest.mark.parametrize("max_norm", [1e-3, 1e3, math.inf])
def test_bf16_pure_clip_matches_torch_clip_grad_norm(max_norm):
    """`_Bf16Compute.clip` (one norm over the flat fp32 buffer) returns torch's total
    norm and scales like `clip_grad_norm_`, clipping or not. A parameter without a
    gradient this step contributes nothing, even if it had one the step before."""
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.train.loop import _Bf16Compute

    torch.manual_seed(0)
    master = Transformer(
        ModelConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=4, context_length=16)
    )
    comp = _Bf16Compute(master)
    for step in range(2):
        x = torch.randint(0, 50, (2, 16))
        comp.model(x, x).backward()
        if step == 1:  # as if the last block took no part in this step
            for p in comp.model.blocks[-1].parameters():
                p.grad = None
        comp.collect(first=True)
        comp.attach()
    with_grad = [m for m in comp.masters if m.grad is not None]
    assert len(with_grad) < len(comp.masters)
    reference = [m.grad.clone().requires_grad_(False) for m in with_grad]
    holders = [torch.nn.Parameter(torch.zeros_like(g)) for g in reference]
    for h, g in zip(holders, reference, strict=True):
        h.grad = g
    want = torch.nn.utils.clip_grad_norm_(holders, max_norm)
    got = comp.clip(max_norm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for m, h in zip(with_grad, holders, strict=True):
        torch.testing.assert_close(m.grad, h.grad, rtol=1e-6, atol=1e-12)
