"""LoRA adapters in PEFT's format: peft loads ours onto the exported base, we load peft's.

Every comparison is against the real `peft` and `transformers` packages. Tolerance:
both sides compute the same fp32 products in another order (fused against split
q/k/v, Conv1D against Linear), so logits of magnitude O(1) after two layers of
width 32 differ by a few hundred ulp (fp32 eps 1.2e-7) at most: 1e-4.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.export.hf import export_hf, load_hf_model  # noqa: E402
from lmforge.finetune.lora import (  # noqa: E402
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from lmforge.finetune.peft_format import AdapterError  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.tokenizer import train_bpe  # noqa: E402

FP32_LOGITS = 1e-4
TARGETS = ["attn.qkv", "attn.proj", "mlp.up", "mlp.down", "lm_head"]
FAMILIES = {
    "llama-gqa": dict(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_heads=2),
    "qwen3": dict(norm="rmsnorm", position="rope", mlp="swiglu", qk_norm=True, n_kv_heads=2),
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", bias=True),
}


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["def add(a, b):\n    return a + b\n", "Hello there, world."] * 20, 300)


def tiny(tok, family: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        context_length=32,
        n_layers=2,
        d_model=32,
        n_heads=4,
        **FAMILIES[family],
    )
    return Transformer(cfg).eval()


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """B starts at zero: give A and B values so every adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * 0.1)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_loads_our_adapter_onto_the_exported_base(tok, family, tmp_path):
    base = tiny(tok, family)
    ours = copy.deepcopy(base)
    apply_lora(ours, TARGETS, rank=4, alpha=8.0)
    randomise(ours)
    save_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "hf"))
    export_hf(base, tok, tmp_path / "hf")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b")])
    with torch.no_grad():
        expected = ours(ids)
        assert (expected - base(ids)).abs().max() > 1e-2  # the adapter does something
        got = theirs(ids).logits
    torch.testing.assert_close(got, expected, atol=FP32_LOGITS, rtol=0)

    # And back: our own adapter reloads with the shared A of the fused layers (rank 4).
    again = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert {m.rank for m in again.modules() if isinstance(m, LoRALinear)} == {4}
    with torch.no_grad():
        torch.testing.assert_close(again(ids), expected, atol=FP32_LOGITS, rtol=0)


def hf_llama(tmp_path, tok):
    """A tiny random Llama written by transformers itself, with its tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text(tok.to_json())
    return model


@pytest.mark.parametrize(
    "lora",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        dict(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"],
            rank_pattern={"k_proj": 2},
            alpha_pattern={"up_proj": 4},
        ),
    ],
    ids=["q-v-o-down", "rslora-patterns"],
)
def test_a_peft_adapter_loads_merges_and_trains_in_lmforge(tok, tmp_path, lora):
    hf = hf_llama(tmp_path, tok)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(lora_dropout=0.0, **lora))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok.encode("Hello there, world. def add(a, b):")])
    with torch.no_grad():
        expected = theirs.eval()(ids).logits

    model, _, _ = load_hf_model(tmp_path / "base")
    n_vocab = expected.shape[-1]
    load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :n_vocab], expected, atol=FP32_LOGITS, rtol=0)

    # Continue training: only the adapters move.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids[:, :-1], ids[:, 1:]).backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_" in n for n in moved)

    # Merged, the model is a plain Transformer with the adapted logits.
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids), adapted, atol=FP32_LOGITS, rtol=0)


def test_adapters_that_do_not_fit_are_refused_with_the_reason(tok, tmp_path):
    hf = hf_llama(tmp_path, tok)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "adapter")
    other = tiny(tok, "gpt2")  # another architecture: no q_proj anywhere
    with pytest.raises(AdapterError, match="layers this model lacks"):
        load_adapter(other, tmp_path / "adapter")

    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    model, _, _ = load_hf_model(tmp_path / "base")
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(model, tmp_path / "adapter")

    config_path.write_text(json.dumps(config))
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"pickled adapter_model\.bin is not read"):
        load_adapter(model, tmp_path / "adapter")
