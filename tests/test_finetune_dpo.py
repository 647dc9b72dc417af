"""Preference tuning (DPO, SimPO): data, the losses against TRL and float64 formulas,
the cached reference log-probabilities, and exact resume."""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_config, to_dict
from lmforge.finetune.finetune import finetune
from lmforge.finetune.preference import (
    REF_CACHE,
    PairSource,
    load_pairs,
)
from lmforge.finetune.tasks import RecordError
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_char
from lmforge.train.checkpoint import save_checkpoint


def shakespeare_pairs(shared, path, n=24, offset=0):
    """{prompt: a line, chosen: the next line, rejected: the next line's words reversed}."""
    lines = [s.strip() for s in (shared / "tinyshakespeare" / "input.txt").read_text().splitlines()]
    lines = [s for s in lines if len(s.split()) >= 3][offset : offset + n + 1]
    with path.open("w") as fh:
        for a, b in itertools.pairwise(lines):
            rejected = " ".join(reversed(b.split()))
            fh.write(json.dumps({"prompt": a, "chosen": b, "rejected": rejected}) + "\n")
    return path


def start_checkpoint(tmp_path, data):
    cfg = load_config(
        None,
        [
            "model.context_length=96",
            "model.n_layers=1",
            "model.d_model=32",
            "model.n_heads=2",
            "train.tokens_per_step=768",
        ],
    )
    tok = train_char([data.read_text()])
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "start",
        0,
        Transformer(cfg.model),
        None,
        {"config": to_dict(cfg)},
        extra_files={"tokenizer.json": tok.to_json().encode()},
    )
    return tmp_path / "start"


def dpo_cfg(data, start, out, *extra):
    return load_config(
        None,
        [
            f"output.dir={out}",
            "model.context_length=96",
            "train.max_steps=8",
            "train.tokens_per_step=384",
            "train.micro_batch_size=2",
            "train.warmup_steps=2",
            "train.lr=3e-3",
            "train.log_every=1",
            "train.eval_every=4",
            "train.checkpoint_every=4",
            "train.peak_flops=1e11",
            f"finetune.init={start}",
            f"finetune.train_files=[{data}]",
            f"finetune.val_files=[{data}]",
            "finetune.objective=dpo",
            *extra,
        ],
    )


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_preference_records_name_file_and_line(tmp_path, shared):
    tok = train_char(["abc"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n'
    )
    with pytest.raises(RecordError, match=r"bad.jsonl:2: record has no field 'rejected'"):
        load_pairs(tok, [str(bad)])
    bad.write_text('{"chosen": [{"role": "user", "content": "a"}], "rejected": "c"}\n')
    with pytest.raises(
        RecordError, match=r"bad.jsonl:1: .*'chosen' does not end with an assistant"
    ):
        load_pairs(tok, [str(bad)])


def test_text_and_message_records_encode_alike_with_loss_on_the_answer_only(tmp_path):
    tok = train_char(["hello there general kenobi"])
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"prompt": "hello", "chosen": "there", "rejected": "kenobi"}) + "\n")
    msgs = tmp_path / "m.jsonl"
    user = {"role": "user", "content": "hello"}
    msgs.write_text(
        json.dumps(
            {
                "chosen": [user, {"role": "assistant", "content": "there"}],
                "rejected": [user, {"role": "assistant", "content": "kenobi"}],
            }
        )
        + "\n"
    )
    (c1, r1), (c2, r2) = load_pairs(tok, [str(text)])[0], load_pairs(tok, [str(msgs)])[0]
    assert c1.ids == c2.ids and r1.ids == r2.ids and c1.trained == c2.trained
    # trained: the answer's characters and its <|end|>, nothing of the prompt
    assert tok.decode([i for i, t in zip(c1.ids, c1.trained, strict=True) if t]) == "there<|end|>"
    assert sum(c1.trained) == len("there") + 1 and sum(r1.trained) == len("kenobi") + 1


def test_dpo_resume_matches_uninterrupted_and_reuses_the_cached_reference(
    shared, tmp_path, monkeypatch
):
    data = shakespeare_pairs(shared, tmp_path / "pairs.jsonl")
    start = start_checkpoint(tmp_path, data)
    a, b = tmp_path / "a", tmp_path / "b"
    summary = finetune(dpo_cfg(data, start, a))
    assert summary["step"] == 8 and summary["objective"] == "dpo"
    logged = [r for r in records(a) if "loss" in r]
    assert len(logged) == 8
    for r in logged:
        assert 0.0 <= r["reward_acc"] <= 1.0
        assert r["reward_margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"])
    assert any("val_reward_acc" in r for r in records(a))
    # Step 1 starts from the reference itself: every reward is 0 and the loss is log 2
    # (float32 logits, so equal to a few ulps of the summed log-probabilities).
    assert logged[0]["reward_chosen"] == pytest.approx(0.0, abs=1e-5)
    assert logged[0]["loss"] == pytest.approx(0.693147, abs=1e-5)

    original = PairSource.batch

    def crash_at_6(self, step, *args):
        if step == 6:  # after the step-4 checkpoint, before step 8's
            raise KeyboardInterrupt("simulated crash")
        return original(self, step, *args)

    monkeypatch.setattr(PairSource, "batch", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        finetune(dpo_cfg(data, start, b))
    monkeypatch.setattr(PairSource, "batch", original)
    cache = load_file(str(b / REF_CACHE))
    # The resumed run must read the cache, not recompute it: poison it and see the poison.
    monkeypatch.setattr(
        "lmforge.finetune.preference.reference_logps",
        lambda *a, **k: pytest.fail("reference log-probabilities recomputed on resume"),
    )
    finetune(dpo_cfg(data, start, b), resume="auto")
    assert [r for r in records(a) if "loss" in r] != []
    strip = ("tokens_per_s", "mfu", "elapsed_s", "data_ms", "data_frac")
    clean = lambda run: [{k: v for k, v in r.items() if k not in strip} for r in records(run)]
    assert clean(a) == clean(b)  # losses, rewards and validation figures, exactly
    wa = load_file(str(a / "checkpoints/step_00000008/model.safetensors"))
    wb = load_file(str(b / "checkpoints/step_00000008/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(cache[k], load_file(str(a / REF_CACHE))[k]) for k in cache)


PARITY_TEXTS = [
    ("Name a colour of the sky.", "The sky is blue.", "Potatoes are heavy."),
    ("What is two plus two?", "Two plus two is four.", "Blue."),
]


def _parity_setup(tmp_path):
    """A small Llama-shaped model exported to a transformers folder, and two pairs."""
    from lmforge.config import ModelConfig
    from lmforge.export.hf import export_hf
    from lmforge.tokenizer import train_bpe

    texts = [t for triple in PARITY_TEXTS for t in triple]
    tok = train_bpe(texts * 20, 300)
    torch.manual_seed(0)
    mcfg = ModelConfig(
        vocab_size=tok.vocab_size,
        context_length=48,
        n_layers=2,
        d_model=32,
        n_heads=4,
        norm="rmsnorm",
        position="rope",
        mlp="swiglu",
        tie_embeddings=False,
    )
    model = Transformer(mcfg)
    export_hf(model, tok, tmp_path / "hf")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PARITY_TEXTS
        )
    )
    pairs = load_pairs(tok, [str(data)])
    return model, tok, pairs


def _lmforge_loss_and_grads(model, tok, pairs, ref, loss_fn):
    from lmforge.export.hf import to_hf_state
    from lmforge.finetune.preference import PreferenceLM

    source = PairSource(pairs, model.cfg.context_length, tok.pad_id)
    source.ref = ref.numpy()
    x, y = source.rows(list(range(len(pairs))))
    model.zero_grad()
    loss = PreferenceLM(model, loss_fn)(x, y)
    loss.backward()
    grads = Transformer(model.cfg)
    for g, p in zip(grads.parameters(), model.parameters(), strict=True):
        g.data = p.grad.clone()
    return loss.detach(), to_hf_state(grads, "llama")


def test_dpo_loss_and_gradients_equal_trl(tmp_path):
    """lmforge's DPO loss and its gradients equal TRL's `DPOTrainer.compute_loss`
    (sigmoid loss, precomputed reference log-probabilities) on the same model and pairs."""
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset

    from lmforge.finetune.preference import PreferenceLoss

    model, tok, pairs = _parity_setup(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=2,
    )
    dataset = Dataset.from_list(
        [dict(zip(("prompt", "chosen", "rejected"), t, strict=True)) for t in PARITY_TEXTS]
    )
    trainer = trl.DPOTrainer(model=hf, args=args, train_dataset=dataset, processing_class=hf_tok)
    # The same ids for both: prompt through '<|assistant|>', then the answer and its <|end|>
    # (the end-of-text after it is never a target, so it is left out).
    examples = [
        {
            "prompt_ids": c.ids[: c.prompt_len],
            "chosen_ids": c.ids[c.prompt_len : -1],
            "rejected_ids": r.ids[r.prompt_len : -1],
        }
        for c, r in pairs
    ]
    assert all(c.ids[: c.prompt_len] == r.ids[: r.prompt_len] for c, r in pairs)
    inputs = trainer.data_collator(examples)
    # Reference log-probabilities away from the policy's, so the rewards are not 0.
    ref = torch.tensor([[-40.0, -35.0], [-30.0, -50.0]], dtype=torch.float64)
    inputs["ref_chosen_logps"] = ref[:, 0].float()
    inputs["ref_rejected_logps"] = ref[:, 1].float()
    hf.train()
    trl_loss = trainer.compute_loss(hf, inputs)
    trl_loss.backward()

    loss, grads = _lmforge_loss_and_grads(model, tok, pairs, ref, PreferenceLoss("dpo", 0.1))
    # fp32 throughout: summed log-probabilities of ≈ 20 tokens (|Σ| ≈ 100) carry ≈ 1e-5
    # absolute rounding, which β = 0.1 shrinks in the loss; gradients are O(1e-2) sums of
    # the same products in another order, so 1e-5 absolute holds with margin.
    assert float(loss) == pytest.approx(trl_loss.item(), abs=1e-5)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert grads.keys() == hf_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, hf_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_simpo_loss_and_gradients_equal_the_papers_formula_in_float64(tmp_path):
    """SimPO (Meng et al. 2024, eq. 6, with label smoothing as TRL's CPO trainer has it):
    −(1−ε) log σ(β/|y_c| log π(y_c) − β/|y_r| log π(y_r) − γ) − ε log σ(−(...)), computed
    here in float64 from a float64 copy of the model."""
    import copy

    from lmforge.finetune.preference import PreferenceLoss

    model, tok, pairs = _parity_setup(tmp_path)
    beta, gamma, eps = 2.0, 0.5, 0.1
    zeros = torch.zeros(len(pairs), 2, dtype=torch.float64)
    loss, grads = _lmforge_loss_and_grads(
        model, tok, pairs, zeros, PreferenceLoss("simpo", beta, gamma, eps)
    )

    ref_model = copy.deepcopy(model).double()
    losses = []
    for c, r in pairs:
        avg = []
        for ex in (c, r):
            ids = torch.tensor([ex.ids])
            logp = torch.log_softmax(ref_model(ids[:, :-1]), -1)[0]
            picked = [logp[t - 1, ex.ids[t]] for t in range(1, len(ex.ids)) if ex.trained[t]]
            avg.append(torch.stack(picked).sum() / len(picked))
        z = beta * (avg[0] - avg[1]) - gamma
        losses.append(
            -(1 - eps) * torch.nn.functional.logsigmoid(z)
            - eps * torch.nn.functional.logsigmoid(-z)
        )
    expected = torch.stack(losses).mean()
    expected.backward()
    # float32 against float64: the per-token log-probabilities carry ≈ 1e-6 relative
    # error, averaged over each answer and scaled by β = 2; 1e-5 covers it.
    assert float(loss) == pytest.approx(expected.item(), abs=1e-5)
    from lmforge.export.hf import to_hf_state

    exp_model = Transformer(model.cfg)
    for g, p in zip(exp_model.parameters(), ref_model.parameters(), strict=True):
        g.data = p.grad.float()
    for name, g in to_hf_state(exp_model, "llama").items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
