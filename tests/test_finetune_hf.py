"""HF round trip: a tiny random HF model loads with HF's logits, fine-tunes, and exports back."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import load_config  # noqa: E402
from lmforge.export.hf import export_hf  # noqa: E402
from lmforge.finetune.data import PackedLM  # noqa: E402
from lmforge.finetune.finetune import finetune, finetuned_checkpoint, load_start  # noqa: E402
from lmforge.finetune.tasks import get_task  # noqa: E402
from lmforge.pretrain import load_model  # noqa: E402
from lmforge.tokenizer import train_bpe  # noqa: E402

TEXT = ["Give three colours. Red, green and blue.", "Name a fruit. An apple is a fruit. " * 10]


def hf_config(kind):
    small = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    llama_like = dict(small, intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "llama":
        return transformers.LlamaConfig(**llama_like, num_key_value_heads=2)
    if kind == "qwen2":
        return transformers.Qwen2Config(
            **llama_like, num_key_value_heads=2, tie_word_embeddings=True
        )
    return transformers.GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def save_random_hf(kind, folder):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind)).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    train_bpe(TEXT * 10, 320).save(folder)
    return model


@pytest.mark.parametrize(
    ("kind", "method"), [("llama", "lora"), ("qwen2", "full"), ("gpt2", "full")]
)
def test_hf_model_loads_with_equal_logits_finetunes_and_exports(kind, method, tmp_path):
    hf_model = save_random_hf(kind, tmp_path / "hf")
    data = tmp_path / "instr.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"instruction": f"Name fruit number {i}.", "input": "", "output": f"Apple {i}."}
            )
            + "\n"
            for i in range(12)
        )
    )
    cfg = load_config(
        None,
        [
            f"finetune.init={tmp_path / 'hf'}",
            "finetune.task=instruction",
            f"finetune.train_files=[{data}]",
            f"finetune.val_files=[{data}]",
            f"finetune.method={method}",
            "finetune.lora_targets=[attn.qkv, mlp.down]",
            "finetune.max_steps=3",
            "finetune.tokens_per_step=128",
            "train.micro_batch_size=2",
            "train.warmup_steps=0",
            "train.lr=1e-2",
            "train.log_every=1",
            "train.peak_flops=1e11",
        ],
    )
    # Before fine-tuning: our converted model (plain and through the packing wrapper) has HF's logits.
    model, tok, _ = load_start(cfg, tmp_path, [], get_task("instruction"))
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = tok.eot_id  # one packed example per row
    with torch.no_grad():
        ref = hf_model(ids).logits
        assert (model(ids) - ref).abs().max().item() < 1e-4
        assert (PackedLM(model, tok.eot_id)(ids) - ref).abs().max().item() < 1e-4

    summary = finetune(cfg, tmp_path / "run")
    assert summary["step"] == 3 and summary["method"] == method
    tuned, tok2, _ = load_model(finetuned_checkpoint(tmp_path / "run"))
    with torch.no_grad():
        assert (tuned(ids) - ref).abs().max().item() > 1e-3  # the weights moved
        # Export back to transformers: HF computes what our fine-tuned model does.
        out = export_hf(tuned, tok2, tmp_path / "exported")
        back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (back(ids).logits - tuned(ids)).abs().max().item() < 1e-4
