"""Injected Inf in the inputs, the loss or the gradients: the step is skipped and counted.

(NaN in the embeddings is tested in tests/test_training.py.) Each injection hits
the 4th optimizer step of a 6-step run with a checkpoint every step: the weights
and Adam moments after step 4 must equal those after step 3, step 5 must move
them again, and `bad_steps` must say 1 in the metrics and the checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from lmforge.pretrain import build_model, model_config_for, tokenize_stage, tokenizer_stage
from lmforge.shards import TokenLoader
from lmforge.train.loop import Trainer

BAD_STEP = 4


def make_trainer(cfg) -> Trainer:
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage(cfg, run_dir)
    tokens = tokenize_stage(cfg, tok, run_dir)
    cfg = replace(cfg, model=model_config_for(cfg, tok))
    loader = TokenLoader(tokens, "train", cfg.model.context_length, cfg.train.seed)
    return Trainer(
        cfg, build_model(cfg.model, cfg.train.seed), run_dir, loader, log=lambda *_: None
    )


def inject_in_inputs(trainer: Trainer, is_bad) -> None:
    def hook(_module, _inputs, output):
        return output * float("inf") if is_bad() else output

    trainer.model.tok_emb.register_forward_hook(hook)


def inject_in_loss(trainer: Trainer, is_bad) -> None:
    real_forward = trainer.model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        return out + float("inf") if is_bad() and out.dim() == 0 else out

    trainer.model.forward = forward  # type: ignore[method-assign]
    trainer.train_model = trainer.model


def inject_in_gradients(trainer: Trainer, is_bad) -> None:
    param = next(trainer.model.parameters())
    param.register_hook(lambda g: g * float("inf") if is_bad() else g)


@pytest.mark.parametrize(
    "inject", [inject_in_inputs, inject_in_loss, inject_in_gradients], ids=lambda f: f.__name__
)
def test_inf_step_is_skipped_and_counted(tmp_path, inject):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=1")
    trainer = make_trainer(cfg)
    accum = trainer.accum_steps
    calls = {"forward": 0}

    def count(_module, _inputs, _output):
        if trainer.model.training:
            calls["forward"] += 1

    trainer.model.tok_emb.register_forward_hook(count)

    # the first micro-batch of the BAD_STEP-th optimizer step (hooks run after `count`)
    def is_bad():
        return trainer.model.training and calls["forward"] == (BAD_STEP - 1) * accum + 1

    inject(trainer, is_bad)
    trainer.fit()
    assert trainer.bad_steps == 1
    ckpts = tmp_path / "run" / "checkpoints"

    def weights(step):
        return load_file(str(ckpts / f"step_{step:08d}" / "model.safetensors"))

    def moments(step):
        from lmforge.train.checkpoint import read_optimizer_state

        opt = read_optimizer_state(ckpts / f"step_{step:08d}")
        return {k: (s["exp_avg"], s["exp_avg_sq"], s["step"]) for k, s in opt["state"].items()}

    before, bad, after = weights(BAD_STEP - 1), weights(BAD_STEP), weights(BAD_STEP + 1)
    assert all(torch.equal(before[k], bad[k]) for k in before)
    assert not all(torch.equal(bad[k], after[k]) for k in bad)
    m_before, m_bad = moments(BAD_STEP - 1), moments(BAD_STEP)
    assert all(
        all(torch.equal(a, b) for a, b in zip(m_before[k], m_bad[k], strict=True)) for k in m_before
    )
    state = json.loads((ckpts / f"step_{BAD_STEP + 2:08d}" / "trainer_state.json").read_text())
    assert state["bad_steps"] == 1 and state["consecutive_bad"] == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in records if "loss" in r] == [0, 0, 0, 1, 1, 1]
    # the skipped step has no loss to report (null, not a made-up number); the others are finite
    logged = [r["loss"] for r in records if "loss" in r]
    assert logged[BAD_STEP - 1] is None
    assert all(math.isfinite(x) for i, x in enumerate(logged) if i != BAD_STEP - 1)


# ----------------------------------------------------------------------------- loss spikes


class CrashAt:
    """Batch source that dies when asked for `step` (a crash between checkpoints)."""

    def __init__(self, inner, step):
        self.inner, self.step = inner, step

    def batch(self, step, *args):
        if step == self.step:
            raise KeyboardInterrupt("simulated crash")
        return self.inner.batch(step, *args)


def spiking_trainer(cfg, spike_step: int = 5) -> Trainer:
    """A trainer whose loss is 20× too large on optimizer step `spike_step` (1-based)."""
    trainer = make_trainer(cfg)
    real_forward = trainer.model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        hit = trainer.model.training and trainer.step == spike_step - 1 and out.dim() == 0
        return out * 20.0 if hit else out

    trainer.model.forward = forward  # type: ignore[method-assign]
    trainer.train_model = trainer.model
    return trainer


SPIKE = ("train.spike_policy=skip", "train.spike_factor=3", "train.spike_warmup=2")


def test_loss_spike_is_skipped_and_counted_when_asked(tmp_path):
    opts = ("train.max_steps=7", "train.checkpoint_every=1")
    skip = spiking_trainer(tiny_config(tmp_path / "skip", *opts, *SPIKE))
    skip.fit()
    none = spiking_trainer(tiny_config(tmp_path / "none", *opts))
    none.fit()
    assert skip.spike_steps == 1 and skip.bad_steps == 0 and none.spike_steps == 0

    def weights(root, step):
        ckpt = root / "run" / "checkpoints" / f"step_{step:08d}" / "model.safetensors"
        return load_file(str(ckpt))

    w4, w5 = weights(tmp_path / "skip", 4), weights(tmp_path / "skip", 5)
    assert all(torch.equal(w4[k], w5[k]) for k in w4)  # the spike never reached the weights
    n4, n5 = weights(tmp_path / "none", 4), weights(tmp_path / "none", 5)
    assert not all(torch.equal(n4[k], n5[k]) for k in n4)  # without the guard it did
    assert all(torch.equal(w4[k], n4[k]) for k in w4)  # and before it both runs are equal
    records = [
        json.loads(x)
        for x in (tmp_path / "skip" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["spike_steps"] for r in records if "loss" in r] == [0, 0, 0, 0, 1, 1, 1]


def test_spike_guard_state_survives_resume_bit_exactly(tmp_path):
    opts = ("train.max_steps=8", "train.checkpoint_every=3", *SPIKE)
    full = spiking_trainer(tiny_config(tmp_path / "a", *opts))
    full.fit()
    cut_cfg = tiny_config(tmp_path / "b", *opts)
    cut = spiking_trainer(cut_cfg)
    cut.train_data = CrashAt(cut.train_data, 7)  # checkpoint at 6, crash during step 8
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = spiking_trainer(cut_cfg)
    resumed.fit(resume="auto")
    assert resumed.spike_steps == full.spike_steps == 1
    assert resumed.loss_ema == full.loss_ema
    a = load_file(
        str(tmp_path / "a" / "run" / "checkpoints" / "step_00000008" / "model.safetensors")
    )
    b = load_file(
        str(tmp_path / "b" / "run" / "checkpoints" / "step_00000008" / "model.safetensors")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spike_config_is_validated():
    from lmforge.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train\.spike_factor"):
        load_config(None, ["train.spike_factor=0.5"])
    with pytest.raises(ConfigError, match=r"train\.spike_policy"):
        load_config(None, ["train.spike_policy=rollback"])
