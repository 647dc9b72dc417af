"""Injected Inf in the inputs, the loss or the gradients: the step is skipped and counted.

(NaN in the embeddings is tested in tests/test_training.py.) Each injection hits
the 4th optimizer step of a 6-step run with a checkpoint every step: the weights
and Adam moments after step 4 must equal those after step 3, step 5 must move
them again, and `bad_steps` must say 1 in the metrics and the checkpoint.
"""

from __future__ import annotations

import json
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
        opt = torch.load(ckpts / f"step_{step:08d}" / "optimizer.pt", weights_only=True)
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
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
