"""LoRA: parity with peft's LoRA, exact start, merge, adapter round trip, freezing."""

import copy

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.finetune.lora import (
    LoRALinear,
    apply_lora,
    freeze,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_params,
)
from lmforge.model.transformer import Transformer

TARGETS = ["attn.qkv", "attn.proj", "mlp.up", "mlp.down", "lm_head"]


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=16, n_layers=2, d_model=32, n_heads=4, **kw)
    return Transformer(cfg).eval()


def randomise_b(model: nn.Module) -> None:
    """B starts at zero; give it values so the adapters actually change the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)


def test_matches_peft_lora():
    """Same A, B, rank and alpha: our adapted model's logits equal peft's."""
    peft = pytest.importorskip("peft")
    base = tiny(mlp="swiglu", position="rope", norm="rmsnorm", tie_embeddings=False)
    ours = copy.deepcopy(base)
    apply_lora(ours, TARGETS, rank=4, alpha=8.0)
    randomise_b(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    theirs = peft.inject_adapter_in_model(config, copy.deepcopy(base))
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, LoRALinear):
                layer = theirs.get_submodule(name)
                layer.lora_A["default"].weight.copy_(m.lora_A)
                layer.lora_B["default"].weight.copy_(m.lora_B)
    x = torch.randint(0, 64, (2, 16))
    a, b = ours(x), theirs(x)
    assert not torch.allclose(a, base(x), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_starts_equal_merges_exactly_and_trains_only_adapters(tmp_path):
    base = tiny()
    x = torch.randint(0, 64, (2, 16))
    ref = base(x)
    model = copy.deepcopy(base)
    adapted = apply_lora(model, TARGETS, rank=4, alpha=8.0)
    assert len(adapted) == 2 * 4 + 1
    torch.testing.assert_close(model(x), ref)  # B = 0: identical at the start
    # Only A and B train: r·(in + out) per adapted layer.
    expected = sum(
        4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear)
    )
    assert trainable_params(model) == expected
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    # The tied head was untied before adapting, so the embeddings stay the base's.
    assert model.lm_head.weight is not model.tok_emb.weight and not model.cfg.tie_embeddings

    randomise_b(model)
    adapted_out = model(x)
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(reloaded.eval()(x), adapted_out)

    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), adapted_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.tok_emb.weight, base.tok_emb.weight)
    # A merged model is a plain Transformer again: its weights load into a fresh one.
    fresh = Transformer(merged.cfg)
    fresh.load_state_dict(merged.state_dict())
    torch.testing.assert_close(fresh.eval()(x), adapted_out, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_adapters():
    model = tiny()
    apply_lora(model, ["attn.qkv", "mlp.down"], rank=2, alpha=2.0)
    model.train()
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None
        else:
            assert p.grad is None, name


def test_bad_targets_and_freeze_patterns_are_named():
    with pytest.raises(ValueError, match=r"finetune\.lora_targets"):
        apply_lora(tiny(), ["attn.q_proj"])
    model = tiny()
    frozen = freeze(model, ["tok_emb", "blocks.0"])
    assert "tok_emb.weight" in frozen and all(n.startswith(("tok_emb", "blocks.0")) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("blocks.1"))
    with pytest.raises(ValueError, match=r"finetune\.freeze"):
        freeze(tiny(), ["blocks.9"])
