"""The one-token decode path (`lmforge.model.decode.Decoder`) against the full forward and HF."""

from __future__ import annotations

import copy

import pytest
import torch
from numerics_helpers import assert_as_accurate_as

from lmforge.config import ModelConfig
from lmforge.finetune.lora import LoRALinear
from lmforge.model import Transformer
from lmforge.model.decode import Decoder
from lmforge.model.generate import generate

VARIANTS = {
    "gpt2-bias": dict(bias=True),
    "gpt2-nobias-untied": dict(tie_embeddings=False),
    "llama-gqa": dict(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_heads=2),
    "qwen3-qknorm-mqa": dict(
        norm="rmsnorm", position="rope", mlp="swiglu", n_kv_heads=1, qk_norm=True
    ),
}
if "logit_softcap" in ModelConfig.__dataclass_fields__:  # variants newer than this file
    VARIANTS["relu2-softcap"] = dict(mlp="relu2", logit_softcap=3.0, tie_embeddings=False)
if "gelu_exact" in str(ModelConfig.__dataclass_fields__["mlp"].type):
    VARIANTS["gelu-exact"] = dict(mlp="gelu_exact")


def make(variant: str, vocab: int = 97, context: int = 40) -> Transformer:
    torch.manual_seed(0)
    # init_std 0.2, not 0.02: attention far from uniform, so a wrong score scale or a
    # wrong key shows in the logits.
    cfg = ModelConfig(
        vocab_size=vocab, context_length=context, n_layers=2, d_model=32, n_heads=4,
        init_std=0.2, **VARIANTS[variant],
    )  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():  # biases start at 0 and norms at 1: perturb them so they count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def float64_forward(model: Transformer, seq: torch.Tensor) -> torch.Tensor:
    """The logits of `model` computed in float64: the reference both fp32 paths
    are measured against."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(seq)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_logits_equal_full_forward(variant, transpose):
    model = make(variant)
    seq = torch.randint(0, 97, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)  # (B, T, V), no cache
        dec = Decoder(model, 3, 30, transpose=transpose)
        logits = [dec.prefill(seq[:, :7])]
        logits += [dec.step(seq[:, t]) for t in range(7, 30)]
    assert dec.length == 30
    ref = float64_forward(model, seq)[:, 6:]
    assert_as_accurate_as(torch.stack(logits, 1), full[:, 6:], ref)
    with pytest.raises(ValueError, match="full"):
        dec.step(seq[:, 0])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_fast_path_equals_recompute(variant, batch):
    model = make(variant)
    assert Decoder.supports(model)  # the cached run below really takes the one-token path
    prompt = torch.randint(0, 97, (batch, 6), generator=torch.Generator().manual_seed(2))
    streamed: list[torch.Tensor] = []
    fast = generate(model, prompt, 30, temperature=0, on_token=streamed.append)
    full = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert fast.shape == (batch, 36)
    assert torch.equal(fast, full)
    assert torch.equal(torch.stack(streamed, 1), fast[:, 6:])
    assert not fast.is_inference()  # callers may modify the result


@pytest.mark.parametrize("change", ["in_place", "data", "load_state_dict"])
def test_transposed_weights_follow_weight_changes(change):
    """The (in, out) weight copies are reused across calls, but never once stale:
    after an in-place update, a `.data` swap or `load_state_dict`, the step's logits
    still equal the full forward's."""
    model = make("gpt2-bias")
    seq = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))

    def check():
        with torch.no_grad():
            full = model(seq)
            dec = Decoder(model, 2, 12, transpose=True)
            logits = [dec.prefill(seq[:, :4])] + [dec.step(seq[:, t]) for t in range(4, 12)]
        ref = float64_forward(model, seq)[:, 3:]
        assert_as_accurate_as(torch.stack(logits, 1), full[:, 3:], ref)

    check()
    check()  # the second call reuses the copies
    w = model.blocks[0].mlp.up.weight
    with torch.no_grad():
        if change == "in_place":
            w.mul_(-1.5)
        elif change == "data":
            w.data = torch.randn_like(w)
        else:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            for k in state:
                if k.endswith("qkv.weight"):
                    state[k].normal_()
            model.load_state_dict(state)
    check()


def test_prefill_last_only_equals_the_full_head():
    model = make("gpt2-bias")
    seq = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        last, full = model(seq, last_only=True), model(seq)[:, -1:]
    assert_as_accurate_as(last, full, float64_forward(model, seq)[:, -1:])


def test_wrapped_or_adapted_models_take_the_general_path():
    model = make("llama-gqa")
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    reference = generate(model, prompt, 12, temperature=0)
    adapted = make("llama-gqa")
    blk = adapted.blocks[0]
    blk.attn.qkv = LoRALinear(blk.attn.qkv, rank=2, alpha=4.0)
    torch.nn.init.normal_(blk.attn.qkv.lora_B)  # a non-zero update the fast path would miss
    assert not Decoder.supports(adapted)
    got = generate(adapted, prompt, 12, temperature=0)
    assert torch.equal(got, generate(adapted, prompt, 12, temperature=0, use_cache=False))
    assert not torch.equal(got, reference)  # the adapter is in effect
    hooked = make("llama-gqa")
    hooked.lm_head.register_forward_hook(lambda m, i, o: -o)  # greedy becomes argmin
    assert not Decoder.supports(hooked)
    assert not torch.equal(generate(hooked, prompt, 12, temperature=0), reference)
    model.train()
    assert not Decoder.supports(model)


def test_sampling_with_seed_matches_general_path():
    model = make("gpt2-bias")
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(4))
    a = generate(model, prompt, 20, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    b = generate(model, prompt, 20, temperature=0.8, top_k=20, top_p=0.9, seed=7, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["gpt2-bias", "llama-gqa"])
def test_greedy_equals_hf_generate(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf import export_hf
    from lmforge.tokenizer import train_char

    tok = train_char(["abcdefghijklmnopqrstuvwxyz .,\n"])
    model = make(variant, vocab=tok.vocab_size + 40, context=64)
    export_hf(model, tok, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for batch in (1, 3):
        prompt = torch.randint(
            len(tok.specials), model.cfg.vocab_size, (batch, 8),
            generator=torch.Generator().manual_seed(batch),
        )  # fmt: skip
        ours = generate(model, prompt, 40, temperature=0)
        with torch.no_grad():
            theirs = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=40,
                min_new_tokens=40,  # never stop at the end-of-text id
                pad_token_id=tok.pad_id,
            )
        assert torch.equal(ours, theirs)
