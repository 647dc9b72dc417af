"""Llama 3.x folders in and out: the "llama3" RoPE frequency scaling, against transformers.

A tiny random model is built by transformers itself from a Llama 3.2-shaped config
(GQA, tied embeddings, rope_theta 500000, `rope_scaling` of type llama3) with the
scaling's original context set below the test's sequence length, so that every
regime of the scaling (kept, interpolated, stretched frequencies) changes the logits.
Tolerance: fp32 logits of magnitude O(1) after two layers, the same products summed
in another order (fused q/k/v): 1e-4, as for the other families.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.config import ConfigError, load_config  # noqa: E402
from lmforge.export.hf import export_hf, load_hf_model  # noqa: E402
from lmforge.model.generate import generate  # noqa: E402
from lmforge.model.transformer import rope_inv_freq  # noqa: E402
from lmforge.tokenizer import train_bpe  # noqa: E402

FP32_LOGITS = 1e-4
SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["def add(a, b):\n    return a + b\n", "Hello there, world."] * 20, 300)


def llama32(tok, tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        rope_theta=500000.0,
        rope_scaling=dict(SCALING),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama32")
    (tmp_path / "llama32" / "tokenizer.json").write_text(tok.to_json())
    return model


def test_inverse_frequencies_equal_transformers_llama3():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = load_config(
        None,
        [
            "model.d_model=128",
            "model.n_heads=2",
            "model.position=rope",
            "model.rope_theta=500000",
            "model.rope_scaling=llama3",
            "model.rope_factor=8",
            "model.rope_original_context=8192",
        ],
    ).model
    hf_config = transformers.LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        rope_theta=500000.0,
        rope_scaling={**SCALING, "original_max_position_embeddings": 8192},
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rope_inv_freq(cfg)
    plain = rope_inv_freq(replace(cfg, rope_scaling="none"))
    # transformers computes in float32: agreement to fp32's relative precision.
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-6, atol=0)
    assert (ours < plain).any() and (ours == plain).any()  # stretched and kept both occur
    wavelen = 2 * math.pi / plain
    middle = (wavelen > 8192 / 4) & (wavelen < 8192 / 1)
    assert (
        middle.any() and ((ours[middle] < plain[middle]) & (ours[middle] > plain[middle] / 8)).all()
    )


def test_llama3_folder_imports_and_exports_with_its_scaling(tok, tmp_path):
    hf = llama32(tok, tmp_path)
    model, _, cfg = load_hf_model(tmp_path / "llama32")
    m = cfg.model if hasattr(cfg, "model") else model.cfg
    assert (m.rope_scaling, m.rope_factor, m.rope_original_context) == ("llama3", 8.0, 16)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n" * 12)[:80]])
    assert ids.shape[1] > 4 * 16  # past the original context: the stretched frequencies act
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)[..., : want.shape[-1]]
        torch.testing.assert_close(got, want, atol=FP32_LOGITS, rtol=0)
        unscaled = load_hf_model(tmp_path / "llama32")[0]
        unscaled.cfg = replace(unscaled.cfg, rope_scaling="none")
        from lmforge.model.transformer import rope_tables

        cos, sin = rope_tables(unscaled.cfg, unscaled.cfg.context_length)
        unscaled.rope_cos.copy_(cos)
        unscaled.rope_sin.copy_(sin)
        assert (unscaled(ids)[..., : want.shape[-1]] - want).abs().max() > 1e-3  # it matters
    prompt = ids[0, :20].tolist()
    ours = generate(model, prompt, 24, temperature=0)[0, 20:].tolist()
    theirs = hf.generate(ids[:, :20], max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert ours == theirs[0, 20:].tolist()

    export_hf(model, tok, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    params = config.get("rope_parameters") or config.get("rope_scaling")
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids), atol=FP32_LOGITS, rtol=0)


def test_an_empty_scaling_ramp_is_refused():
    with pytest.raises(ConfigError, match="rope_high_freq_factor"):
        load_config(
            None,
            [
                "model.position=rope",
                "model.rope_scaling=llama3",
                "model.rope_low_freq_factor=4",
                "model.rope_high_freq_factor=1",
            ],
        )
