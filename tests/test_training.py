import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from helpers import shakespeare_snippet, tiny_config
from safetensors.torch import load_file

from lmforge.pretrain import (
    build_model,
    load_model,
    model_config_for,
    pretrain,
    tokenize_stage,
    tokenizer_stage,
)
from lmforge.shards import TokenLoader
from lmforge.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_optimizer_state,
    save_checkpoint,
    verify_checkpoint,
)
from lmforge.train.loop import Trainer, TrainingDiverged


def losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def weights(run_dir):
    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


def make_trainer(cfg, train_data=None, **kw):
    run_dir = cfg.output.dir
    from pathlib import Path

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage(cfg, run_dir)
    tokens = tokenize_stage(cfg, tok, run_dir)
    cfg = replace(cfg, model=model_config_for(cfg, tok))
    model = build_model(cfg.model, cfg.train.seed)
    loader = train_data or TokenLoader(tokens, "train", cfg.model.context_length, cfg.train.seed)
    return Trainer(cfg, model, run_dir, loader, log=lambda *_: None, **kw), loader


class StopAt:
    """Batch source that dies when asked for `step` (a crash between checkpoints)."""

    def __init__(self, inner, step):
        self.inner, self.step = inner, step

    def batch(self, step, *args):
        if step == self.step:
            raise KeyboardInterrupt("simulated crash")
        return self.inner.batch(step, *args)


# The speed recipe's settings: Muon's momentum buffers and the AdamW moments of its
# other groups must survive a resume too.
FAST = (
    "train.optimizer=muon",
    "model.mlp=relu2",
    "model.logit_softcap=30",
    "model.zero_init_proj=true",
    "model.position=rope",
    "model.norm=rmsnorm",
    "model.qk_norm=true",
    "model.tie_embeddings=false",
)


@pytest.mark.parametrize(
    "overrides",
    [("model.dropout=0.0",), ("model.dropout=0.1",), FAST, ("train.dtype=bf16-pure",)],
    ids=["plain", "dropout", "fast", "bf16-pure"],
)
def test_resume_is_bit_exact(tmp_path, overrides):
    corpus = shakespeare_snippet(tmp_path)
    full_cfg = tiny_config(tmp_path / "a", *overrides, corpus=corpus)
    trainer, _ = make_trainer(full_cfg)
    trainer.fit()
    cut_cfg = tiny_config(tmp_path / "b", *overrides, corpus=corpus)
    trainer, loader = make_trainer(cut_cfg)
    trainer.train_data = StopAt(loader, 6)  # checkpoint at 4, crash during step 6
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer, _ = make_trainer(cut_cfg)
    trainer.fit(resume="auto")
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert losses(a) == losses(b)  # exact float equality, steps 1..8
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_step_leaves_weights_and_moments_unchanged(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=5", "train.checkpoint_every=1")
    trainer, _ = make_trainer(cfg)
    accum = trainer.accum_steps
    calls = {"n": 0}

    def inject(_module, _inputs, output):
        if trainer.model.training:
            calls["n"] += 1
            if calls["n"] == 3 * accum + 1:  # the 4th optimizer step
                return output * float("nan")
        return output

    trainer.model.tok_emb.register_forward_hook(inject)
    trainer.fit()
    assert trainer.bad_steps == 1
    run = tmp_path / "run"
    after3 = load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    after4 = load_file(str(run / "checkpoints" / "step_00000004" / "model.safetensors"))
    after5 = load_file(str(run / "checkpoints" / "step_00000005" / "model.safetensors"))
    assert all(torch.equal(after3[k], after4[k]) for k in after3)
    assert not all(torch.equal(after4[k], after5[k]) for k in after4)
    opt3 = read_optimizer_state(run / "checkpoints" / "step_00000003")
    opt4 = read_optimizer_state(run / "checkpoints" / "step_00000004")
    for k, s in opt3["state"].items():
        assert torch.equal(s["exp_avg"], opt4["state"][k]["exp_avg"])
        assert torch.equal(s["step"], opt4["state"][k]["step"])
    assert (
        json.loads((run / "checkpoints" / "step_00000005" / "trainer_state.json").read_text())[
            "bad_steps"
        ]
        == 1
    )


def test_too_many_bad_steps_stop_with_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=12", "train.max_bad_steps=3")
    trainer, _ = make_trainer(cfg)
    hook = trainer.model.tok_emb.register_forward_hook(
        lambda m, i, o: o * float("nan") if trainer.model.training and trainer.step >= 5 else o
    )
    with pytest.raises(TrainingDiverged, match="3 consecutive steps with a non-finite loss") as err:
        trainer.fit()
    hook.remove()
    # true in every part: the steps, that the weights are fine, the checkpoint that exists
    assert "steps 6-8" in str(err.value) and "the weights are finite" in str(err.value)
    assert "step_00000004, holds finite weights" in str(err.value)
    good = latest_checkpoint(tmp_path / "run")
    assert good is not None and good.name == "step_00000004"
    state = verify_checkpoint(good)
    assert state["bad_steps"] == 0


@pytest.mark.parametrize("every", [1, 4])
def test_nan_weight_decay_stop_message_is_true(tmp_path, every):
    # set after loading, past any range check of the config: the loop must still tell
    # the truth about the cause and about what is on disk
    cfg = tiny_config(tmp_path, f"train.checkpoint_every={every}")
    cfg.train.weight_decay = float("nan")
    trainer, _ = make_trainer(cfg)
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    message = str(err.value)
    # step 1's update (loss still finite) made the weights NaN: caught at the step-1
    # checkpoint, or at step 2's non-finite loss
    where = "after step 1 the weights are non-finite" if every == 1 else "step 2 (loss nan"
    assert where in message and "non-finite since the update of step 1" in message
    assert "train.weight_decay = nan is not a finite number" in message
    assert "no checkpoint was written" in message and "train.lr" not in message
    assert list_checkpoints(tmp_path / "run") == []


def test_corrupt_checkpoint_is_detected_and_skipped(tmp_path):
    cfg = tiny_config(tmp_path)
    trainer, _ = make_trainer(cfg)
    trainer.fit()
    ckpts = list_checkpoints(tmp_path / "run")
    newest = ckpts[-1] / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: checksum mismatch"):
        verify_checkpoint(ckpts[-1])
    messages = []
    assert latest_checkpoint(tmp_path / "run", log=messages.append) == ckpts[-2]
    assert "checksum mismatch" in messages[0]
    (ckpts[-2] / "optimizer.safetensors").write_bytes(b"")
    assert latest_checkpoint(tmp_path / "run", log=messages.append) is None


def test_pickled_payload_is_refused(tmp_path):
    from reliability_helpers import to_legacy_layout

    cfg = tiny_config(tmp_path, "train.max_steps=4")
    trainer, _ = make_trainer(cfg)
    trainer.fit()
    ckpt = list_checkpoints(tmp_path / "run")[-1]

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    # an old-layout checkpoint whose checksum matches its payload
    to_legacy_layout(ckpt, optimizer={"state": Evil()})
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: refused by the safe loader"):
        load_checkpoint(ckpt, trainer.model, trainer.optimizer, log=lambda _m: None)
    assert not (tmp_path / "pwned").exists()


def test_atomic_save_ignores_partial_folders(tmp_path):
    model = build_model(
        tiny_config(tmp_path).model.__class__(vocab_size=50, n_layers=1, d_model=16, n_heads=2), 0
    )
    save_checkpoint(tmp_path, 1, model, None, {"x": 1})
    (tmp_path / "checkpoints" / ".tmp-step_00000002-123").mkdir()
    (tmp_path / "checkpoints" / "step_00000003").mkdir()  # no checksums: incomplete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000003"]
    assert latest_checkpoint(tmp_path, log=lambda _m: None).name == "step_00000001"


def test_pretrain_end_to_end_and_load(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=12", "train.eval_every=6")
    summary = pretrain(cfg)
    assert summary["step"] == 12 and summary["val_bpb"] < summary["unigram_bpb"] * 1.2
    _model, tok, loaded_cfg = load_model(tmp_path / "run")
    assert loaded_cfg.model.vocab_size == tok.vocab_size
    assert (tmp_path / "run" / "config.yaml").exists()
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"loss", "tokens_per_s", "mfu", "lr"} <= set(records[0])
    assert any("val_bpb" in r for r in records)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    corpus = shakespeare_snippet(tmp_path)
    common = [
        f"--data.sources=[{corpus}]",
        "--tokenizer.kind=char",
        "--model.context_length=32",
        "--model.n_layers=2",
        "--model.d_model=32",
        "--model.n_heads=4",
        "--train.max_steps=60",
        "--train.tokens_per_step=256",
        "--train.micro_batch_size=4",
        "--train.log_every=1",
        "--train.eval_every=1000",
        "--train.checkpoint_every=5",
        "--train.peak_flops=1e11",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lmforge", "pretrain", *common]
    subprocess.run(
        [*cmd, f"--output.dir={tmp_path / 'a'}"], check=True, env=env, capture_output=True
    )
    proc = subprocess.Popen(
        [*cmd, f"--output.dir={tmp_path / 'b'}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(tmp_path / "b")) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list_checkpoints(tmp_path / "b")) < 12, "the run finished before it was killed"
    subprocess.run(
        [*cmd, f"--output.dir={tmp_path / 'b'}", "--resume", "auto"],
        check=True,
        env=env,
        capture_output=True,
    )
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_measuring_the_peak_leaves_the_rng_alone(tmp_path, monkeypatch):
    """The MFU peak is measured at the start of every fit, resumed ones too: it must not
    consume the global RNG, or dropout masks after a resume would differ."""
    from lmforge.hardware import peak_flops

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert peak_flops(torch.device("cpu"), "fp32") > 0
    assert torch.equal(before, torch.get_rng_state())
    assert (tmp_path / "cpu_peak.json").exists()


def test_time_budget_stops_cleanly_with_a_final_evaluation(tmp_path):
    cfg = tiny_config(
        tmp_path, "train.max_steps=1000", "train.eval_every=1000", "train.max_time_s=0.5"
    )
    summary = pretrain(cfg)
    assert 0 < summary["step"] < 1000 and "val_loss" in summary
    newest = latest_checkpoint(tmp_path / "run")
    assert newest is not None and newest.name == f"step_{summary['step']:08d}"
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[-1]["step"] == summary["step"] and "val_loss" in records[-1]


def test_matmul_precision_applies_during_fit_and_is_restored(tmp_path):
    cfg = tiny_config(tmp_path, "train.matmul_precision=medium", "train.max_steps=2")
    trainer, _ = make_trainer(cfg)
    seen = []
    inner = trainer.train_data

    class Spy:
        def batch(self, *args):
            seen.append(torch.get_float32_matmul_precision())
            return inner.batch(*args)

    trainer.train_data = Spy()
    before = torch.get_float32_matmul_precision()
    trainer.fit()
    assert seen == ["medium"] * (2 * trainer.accum_steps)
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize("dtype", ["fp32", "bf16-pure"])
def test_train_step_alone_matches_fit(tmp_path, dtype):
    """`setup_pretrain(cfg).trainer.train_step()`, called N times, trains exactly what
    `fit` trains in N steps (the loop body is the same method): equal weights, and the
    step results carry the logged loss and learning rate."""
    from lmforge.pretrain import setup_pretrain
    from lmforge.train.loop import StepResult

    corpus = shakespeare_snippet(tmp_path)
    cfg = tiny_config(tmp_path / "a", "train.max_steps=5", f"train.dtype={dtype}", corpus=corpus)
    fitted = setup_pretrain(cfg).trainer
    fitted.fit()
    cfg = tiny_config(tmp_path / "b", "train.max_steps=5", f"train.dtype={dtype}", corpus=corpus)
    stepped = setup_pretrain(cfg).trainer
    stepped.train_model.train()
    results = [stepped.train_step() for _ in range(5)]
    assert all(isinstance(r, StepResult) and r.finite for r in results)
    assert stepped.step == 5 and stepped.tokens_seen == fitted.tokens_seen
    a, b = fitted.model.state_dict(), stepped.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [
        json.loads(line)
        for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = {r["step"]: r for r in logged if "loss" in r}
    for step, r in enumerate(results, start=1):  # log_every=1: one record per step
        assert r.loss.item() == pytest.approx(losses[step]["loss"], rel=1e-6)
        assert r.lr == pytest.approx(losses[step]["lr"])
