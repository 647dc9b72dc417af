"""The fine-tuning stage end to end: resume after a crash equals the uninterrupted run (LoRA)."""

import gzip
import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.finetune.data import PackedExamples
from lmforge.finetune.finetune import finetune
from lmforge.pretrain import load_model


def task_data(shared, tmp_path, n=48):
    """A small translation JSONL taken from the head of Multi30k's training set."""
    with gzip.open(shared / "multi30k" / "train.en.gz", "rt") as fs:
        src = [next(fs).strip() for _ in range(n)]
    with gzip.open(shared / "multi30k" / "train.de.gz", "rt") as ft:
        tgt = [next(ft).strip() for _ in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"source": s, "target": t}) + "\n" for s, t in zip(src, tgt, strict=True)
        )
    )
    return path


def tiny_cfg(data, out, method="lora"):
    return load_config(
        None,
        [
            f"output.dir={out}",
            "tokenizer.kind=char",
            "model.context_length=96",
            "model.n_layers=1",
            "model.d_model=32",
            "model.n_heads=2",
            "model.dropout=0.1",
            "train.max_steps=8",
            "train.tokens_per_step=384",
            "train.micro_batch_size=2",
            "train.warmup_steps=2",
            "train.lr=3e-3",
            "train.log_every=1",
            "train.eval_every=4",
            "train.checkpoint_every=4",
            "train.peak_flops=1e11",
            "finetune.task=translation",
            f"finetune.train_files=[{data}]",
            f"finetune.val_files=[{data}]",
            f"finetune.test_files=[{data}]",
            "finetune.max_examples=12",
            "finetune.eval_examples=2",
            "finetune.max_new_tokens=4",
            f"finetune.method={method}",
            "finetune.lora_rank=2",
            "finetune.lora_dropout=0.1",
        ],
    )


def losses(run):
    return [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]


def test_lora_finetune_resume_matches_uninterrupted(shared, tmp_path, monkeypatch):
    data = task_data(shared, tmp_path)
    a = tmp_path / "a"
    summary = finetune(tiny_cfg(data, a))
    assert summary["method"] == "lora" and summary["trainable_params"] < summary["total_params"]
    assert {"bleu", "chrf"} <= set(summary["test"])
    assert "val_bleu" in (a / "metrics.jsonl").read_text()

    b = tmp_path / "b"
    original = PackedExamples.batch

    def crash_at_6(self, step, *args):
        if step == 6:  # after the step-4 checkpoint, before step 8's
            raise KeyboardInterrupt("simulated crash")
        return original(self, step, *args)

    monkeypatch.setattr(PackedExamples, "batch", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_cfg(data, b))
    monkeypatch.setattr(PackedExamples, "batch", original)
    finetune(tiny_cfg(data, b), resume="auto")

    assert losses(a) == losses(b)  # exact, steps 1..8
    for name in (
        "adapter/adapter_model.safetensors",
        "merged/checkpoints/step_00000008/model.safetensors",
    ):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # The merged model loads as a plain checkpoint and differs from the untrained start.
    model, tok, cfg = load_model(a / "merged")
    assert cfg.finetune.method == "full" and tok.vocab_size == model.cfg.vocab_size


def test_lora_finetune_in_bf16_pure_trains_the_fp32_master_adapters(shared, tmp_path):
    """With train.dtype = bf16-pure the bf16 copy computes and the fp32 masters are what
    the adapter file holds: LoRA's B matrices start at zero, so they must have moved."""
    data = task_data(shared, tmp_path)
    cfg = tiny_cfg(data, tmp_path / "run")
    cfg.train.dtype = "bf16-pure"
    finetune(cfg)
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b_mats = [v for k, v in adapter.items() if k.endswith(".lora_B.weight")]
    assert b_mats and all(v.dtype == torch.float32 and v.abs().max() > 1e-3 for v in b_mats)


def test_chat_streams_replies_and_keeps_history():
    """Each streamed reply equals a direct greedy generation from the templated history."""
    from lmforge.config import ModelConfig
    from lmforge.finetune.chat import chat_loop
    from lmforge.finetune.tasks import prompt_ids
    from lmforge.model.generate import decode_text, generate
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import END, train_bpe

    tok = train_bpe(["hello there, how are you? fine thanks."] * 20, 300)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, context_length=64, n_layers=1, d_model=32, n_heads=2)
    )
    inputs = iter(["hello", "how are you?"])

    def read(_prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    written: list[str] = []
    history = chat_loop(
        model, tok, max_new_tokens=8, temperature=0.0, read=read, write=written.append
    )
    assert [r for r, _ in history] == ["user", "assistant", "user", "assistant"]
    # Replay the second turn by hand: same prompt (history so far), same greedy tokens.
    ids = prompt_ids(tok, history[:3])
    out = generate(model, ids, 8, temperature=0.0, stop_ids=[tok.specials[END], tok.eot_id])[
        0, len(ids) :
    ]
    # The reply ends at <|end|> / end-of-text and shows no special token.
    new = out.tolist()
    new = new[: next((i for i, t in enumerate(new) if t in (tok.specials[END], tok.eot_id)), None)]
    expected = decode_text(tok, new).strip()
    assert "<|" not in expected
    assert history[3][1] == expected
    assert expected in "".join(written)


@pytest.mark.slow
def test_finetune_stage_code_docstring_from_a_pretrained_checkpoint(tmp_path):
    """The quickstart hook: an lmforge checkpoint → code-docstring fine-tuning → test ROUGE."""
    from lmforge.finetune.finetune import finetune_stage
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import train_bpe
    from lmforge.train.checkpoint import save_checkpoint

    cfg = load_config(
        None,
        [
            "model.context_length=256",
            "model.n_layers=1",
            "model.d_model=32",
            "model.n_heads=2",
            "train.max_steps=2",
            "train.tokens_per_step=512",
            "train.micro_batch_size=2",
            "train.peak_flops=1e11",
            "finetune.max_examples=20",
            "finetune.eval_examples=2",
            "finetune.max_new_tokens=8",
        ],
    )
    tok = train_bpe(["def add(a, b):\n    return a + b\n    Return the sum."] * 50, 300)
    cfg.model.vocab_size = tok.vocab_size
    from lmforge.config import to_dict

    save_checkpoint(
        tmp_path / "pre",
        0,
        Transformer(cfg.model),
        None,
        {"config": to_dict(cfg)},
        extra_files={"tokenizer.json": tok.to_json().encode()},
    )
    summary = finetune_stage(cfg, tmp_path / "pre", tmp_path / "ft")
    assert summary["task"] == "code-docstring" and summary["step"] == 2
    assert {"rouge1", "rouge2", "rougeL"} <= set(summary["test"])
    assert (tmp_path / "ft" / "task_data" / "train.jsonl").exists()
