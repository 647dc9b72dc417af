"""`lmforge plan`: counters and estimates checked against the real thing.

- parameter counts of presets against the published counts of the models they copy;
- training FLOPs against `torch.utils.flop_counter` on one real training step;
- peak memory against the peak resident memory of real CPU training steps (see
  `_measure_peak` for the method);
- step time estimated from an MFU measured on one shape against the measured step
  time of another (slow: timing);
- the compute-optimal size against a brute-force minimisation of the law.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.model.presets import PRESETS
from lmforge.model.transformer import Transformer, count_params
from lmforge.plan import (
    DEVICES,
    Hardware,
    chinchilla_optimum,
    make_plan,
    memory_per_device,
    model_config,
    parse_gpus,
    parse_quantity,
    recommend,
)

# Published parameter counts (HF model cards / safetensors metadata of the originals).
PUBLISHED = {
    ("gpt2-124m", 50257): 124_439_808,  # openai-community/gpt2
    ("gpt2-350m", 50257): 354_823_168,  # gpt2-medium
    ("gpt2-774m", 50257): 774_030_080,  # gpt2-large
    ("gpt2-1.5b", 50257): 1_557_611_200,  # gpt2-xl
    ("llama-1b", 0): 1_235_814_400,  # meta-llama/Llama-3.2-1B
    ("llama-3b", 0): 3_212_749_824,  # meta-llama/Llama-3.2-3B
    ("llama-8b", 0): 8_030_261_248,  # meta-llama/Meta-Llama-3-8B
}


@pytest.mark.parametrize(("preset", "vocab"), list(PUBLISHED))
def test_preset_param_counts_match_published(preset, vocab):
    assert count_params(model_config(preset, vocab_size=vocab))["total"] == PUBLISHED[preset, vocab]


@pytest.mark.parametrize("preset", ["baby-gpt", "cpu-tiny", "cpu-llama-small", "cpu-masked"])
def test_small_presets_build_and_count(preset):
    cfg = model_config(preset, vocab_size=96)
    assert Transformer(cfg).num_params() == count_params(cfg)["total"]


def test_plan_list_names_every_preset(capsys):
    assert main(["plan", "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["preset"] for r in rows} == set(PRESETS)
    assert {r["objective"] for r in rows} == {"causal", "masked"}


TINY = [
    dict(vocab_size=96, context_length=32, n_layers=2, d_model=64, n_heads=4),
    dict(
        vocab_size=96,
        context_length=32,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        norm="rmsnorm",
        position="rope",
        mlp="swiglu",
        tie_embeddings=False,
    ),
]


@pytest.mark.parametrize("fields", TINY)
def test_training_flops_match_flop_counter(fields):
    cfg = ModelConfig(**fields)
    model = Transformer(cfg)
    B, T = 3, 32
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    hw = Hardware(DEVICES["H100"], count=1)
    plan = make_plan(cfg, hw, seq_len=T, tokens=B * T)
    assert plan.training_flops == counter.get_total_flops()


def test_targets_are_consistent():
    cfg = model_config("gpt2-124m")
    hw = Hardware(DEVICES["H100"], count=8)
    by_tokens = make_plan(cfg, hw, tokens=parse_quantity("10B", "tokens"), mfu=0.5)
    # time = FLOPs / (devices · peak · MFU), cost = time · devices · price (closed forms)
    expected_h = by_tokens.training_flops / (8 * 989e12 * 0.5) / 3600
    assert by_tokens.hours == pytest.approx(expected_h)
    assert by_tokens.cost == pytest.approx(expected_h * 8 * DEVICES["H100"].price_per_hour)
    by_money = make_plan(cfg, hw, budget=by_tokens.cost, mfu=0.5)
    assert by_money.tokens == pytest.approx(10e9)
    by_hours = make_plan(cfg, hw, hours=by_tokens.hours, mfu=0.5)
    assert by_hours.tokens == pytest.approx(10e9)
    assert by_tokens.energy_kwh == pytest.approx(8 * 0.7 * expected_h * 1.2)


def test_parsers():
    assert parse_quantity("1T", "x") == 1e12
    assert parse_quantity("$500", "x") == 500
    assert parse_quantity("2.5e9", "x") == 2.5e9
    assert parse_gpus("8xH100") == (8, "H100")
    with pytest.raises(ValueError, match="--tokens"):
        parse_quantity("lots", "--tokens")


def test_fsdp_shards_state_and_checkpointing_saves_activations():
    cfg = model_config("llama-8b")
    one = memory_per_device(cfg, 1, 2048, "bf16", shards=1)
    eight = memory_per_device(cfg, 1, 2048, "bf16", shards=8)
    assert eight.optimizer == pytest.approx(one.optimizer / 8)
    assert one.optimizer == pytest.approx(8 * count_params(cfg)["total"])
    assert one.activations_checkpointed < one.activations / 3


def test_chinchilla_rule_and_fitted_law_optimum():
    n, d = chinchilla_optimum(1e21)
    assert d / n == pytest.approx(20)
    assert 6 * n * d == pytest.approx(1e21)
    law = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al.
    n_opt, d_opt = chinchilla_optimum(1e21, law)
    # Brute force along the iso-FLOP line C = 6ND.
    ns = np.geomspace(1e8, 1e12, 20001)
    losses = law["E"] + law["A"] / ns ** law["alpha"] + law["B"] / (1e21 / (6 * ns)) ** law["beta"]
    assert n_opt == pytest.approx(ns[np.argmin(losses)], rel=2e-3)
    assert 6 * n_opt * d_opt == pytest.approx(1e21)


def test_budget_recommendation_is_compute_optimal():
    plan = recommend(Hardware(DEVICES["H100"]), budget=500)
    assert plan.cost == pytest.approx(500)
    assert 15 < plan.tokens_per_param < 27  # the chosen shape lands near 20 tokens/param
    assert plan.fits["plain"] or plan.fits["checkpointed"]
    cfg = plan.model
    assert cfg["n_heads"] % cfg["n_kv_heads"] == 0


def test_plan_cli_prints_sensible_answers(capsys):
    assert (
        main(["plan", "--preset", "llama-8b", "--gpus", "8xH100", "--tokens", "1T", "--json"]) == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"]["total"] == 8_030_261_248
    assert plan["hardware"]["devices"] == 8 and plan["hardware"]["fsdp_shards"] == 8
    assert plan["fits"]["plain"]
    assert main(["plan", "--budget", "$500", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    assert "compute-optimal size" in out and "$500" in out


# ----------------------------------------------------------------------------- memory

_PROBE = textwrap.dedent(
    """
    import gc, json, sys, torch
    torch.set_num_threads(1)
    from lmforge.config import ModelConfig
    from lmforge.model.transformer import Transformer

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def step(model, opt, B, T, V, dtype):
        x = torch.randint(0, V, (B, T))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peaks = []
    for fields, B, T, *rest in json.loads(sys.argv[1]):
        dtype = rest[0] if rest else "fp32"
        cfg = ModelConfig(**fields)
        small = dict(fields, d_model=32, n_layers=1, n_heads=2, n_kv_heads=0)
        warm = Transformer(ModelConfig(**small))
        opt = torch.optim.AdamW(warm.parameters(), fused=True)
        for _ in range(2):
            step(warm, opt, 2, T, cfg.vocab_size, dtype)
        del warm, opt
        gc.collect()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM, the peak resident set size, to the current size
        base = status("VmRSS")
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), fused=True)
        for _ in range(2):  # Adam's moments exist from the first step's update on
            step(model, opt, B, T, cfg.vocab_size, dtype)
        peaks.append(status("VmHWM") - base)
        del model, opt
        gc.collect()
    print(json.dumps(peaks))
    """
)


def _measure_peaks(shapes: list) -> list[int]:
    """Peak resident memory added by building each model and taking 2 AdamW training steps.

    Method: one fresh process; for each shape it warms up the kernels and allocator
    on a small model of the same kind, resets the kernel's peak-RSS counter
    (`/proc/self/clear_refs`, value 5), records the resident size, builds the real
    model and optimizer, runs two steps (Adam's moments appear at the first
    update), and reads the peak (VmHWM). `MALLOC_MMAP_THRESHOLD_` fixes glibc's
    mmap threshold at 64 KiB: otherwise glibc raises it after the first large
    free and keeps freed tensors on its heap, so RSS would measure allocator
    fragmentation rather than live tensors; with it, freed tensors go back to the
    system and the next shape starts from a clean baseline.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(shapes)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


MEMORY_SHAPES = [
    (dict(vocab_size=512, n_layers=4, d_model=256, n_heads=4, context_length=128), 8, 128),
    (dict(vocab_size=4096, n_layers=2, d_model=128, n_heads=4, context_length=128), 8, 128),
    (
        dict(
            vocab_size=512,
            n_layers=3,
            d_model=256,
            n_heads=8,
            n_kv_heads=2,
            norm="rmsnorm",
            position="rope",
            mlp="swiglu",
            tie_embeddings=False,
            context_length=128,
        ),
        8,
        128,
    ),
]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_estimate_matches_peak_rss():
    """GPT-2 style, large-vocabulary and Llama-style (GQA, RoPE, SwiGLU) shapes: within 25%."""
    measured = _measure_peaks(MEMORY_SHAPES)
    for (fields, B, T), peak in zip(MEMORY_SHAPES, measured, strict=True):
        estimate = memory_per_device(ModelConfig(**fields), B, T, "fp32").peak
        assert 0.75 < estimate / peak < 1.25, (fields, estimate, peak)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_estimate_counts_the_small_cpu_attention():
    """bf16 on a CPU at T ≤ 256 trains through `SmallCausalAttention`, which keeps fp32
    T×T probabilities: the estimate must count them (within 25%), where the SDPA
    count would be far too low."""
    fields, B, T = (
        dict(vocab_size=256, n_layers=4, d_model=128, n_heads=8, context_length=256),
        8,
        256,
    )
    (peak,) = _measure_peaks([(fields, B, T, "bf16")])
    cfg = ModelConfig(**fields)
    estimate = memory_per_device(cfg, B, T, "bf16", on_gpu=False).peak
    assert 0.75 < estimate / peak < 1.25, (estimate, peak)
    assert memory_per_device(cfg, B, T, "bf16", on_gpu=True).peak / peak < 0.5


# ----------------------------------------------------------------------------- time


@pytest.mark.slow
def test_time_estimate_from_measured_mfu_predicts_other_shape():
    """MFU measured on one shape predicts the step time of a 2× wider one within 40%.

    Steps of the two shapes are interleaved and their medians compared, so a change
    in the load of a shared machine (its speed swings ±15–20%) hits both alike.
    """
    from lmforge.plan import Device

    def stepper(cfg: ModelConfig, B: int):
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), fused=True)
        x = torch.randint(0, cfg.vocab_size, (B, cfg.context_length))

        def step() -> float:
            t0 = time.perf_counter()
            model(x, x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        return step

    a = ModelConfig(vocab_size=256, context_length=128, n_layers=4, d_model=192, n_heads=4)
    b = ModelConfig(vocab_size=256, context_length=128, n_layers=4, d_model=384, n_heads=4)
    B = 8
    step_a, step_b = stepper(a, B), stepper(b, B)
    times_a, times_b = [], []
    for i in range(12):
        ta, tb = step_a(), step_b()
        if i >= 2:  # the first steps allocate Adam's state and warm up kernels
            times_a.append(ta)
            times_b.append(tb)
    peak = 1e11  # any peak: MFU is measured against it and used against it
    hw = Hardware(Device("cpu", peak, 16, 0, 0, fp32_flops=peak), dtype="fp32")
    mfu = make_plan(a, hw, tokens=B * 128).training_flops / peak / float(np.median(times_a))
    predicted = make_plan(b, hw, tokens=B * 128, mfu=mfu).hours * 3600
    measured = float(np.median(times_b))
    assert math.isclose(predicted, measured, rel_tol=0.4), (predicted, measured, mfu)


def test_measured_run_carries_its_achieved_flops_to_cpu_plans(tmp_path, capsys):
    """--measured RUN on CPU: time = FLOPs / (the run's MFU × the run's peak), whatever peak
    this command measures now."""
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "mfu": m} for s, m in ((10, 0.2), (20, 0.3), (30, 0.4))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({"peak_flops": 5e10}))
    args = ["plan", "--preset", "baby-gpt", "--vocab", "72", "--gpu", "cpu", "--dtype", "fp32"]
    assert main([*args, "--tokens", "1M", "--measured", str(run), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["hours"] * 3600 == pytest.approx(plan["training_flops"] / (0.3 * 5e10), rel=1e-9)
