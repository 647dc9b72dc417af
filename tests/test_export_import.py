"""Import of transformers folders: tiny random HF models give our model the same logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.export.hf import ExportError, import_hf, load_hf_model  # noqa: E402
from lmforge.pretrain import load_model  # noqa: E402
from lmforge.tokenizer import SPECIAL_TOKENS, train_bpe  # noqa: E402

TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 20]

SMALL = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def hf_config(kind: str):
    llama_like = dict(SMALL, intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "llama":
        return transformers.LlamaConfig(**llama_like, num_key_value_heads=2, rope_theta=500.0)
    if kind == "llama-bias":
        return transformers.LlamaConfig(
            **llama_like, attention_bias=True, mlp_bias=True, tie_word_embeddings=True
        )
    if kind == "qwen2":
        return transformers.Qwen2Config(
            **llama_like, num_key_value_heads=2, tie_word_embeddings=True
        )
    if kind == "qwen3":
        return transformers.Qwen3Config(**llama_like, num_key_value_heads=2, head_dim=8)
    if kind == "mistral":
        return transformers.MistralConfig(
            **llama_like, num_key_value_heads=1, head_dim=8, sliding_window=None
        )
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_positions=64, layer_norm_epsilon=1e-5
        )
    raise AssertionError(kind)


def save_random_hf(kind: str, folder, tokenizer=True):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind)).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    if tokenizer:
        train_bpe(TEXT, 320).save(folder)
    return model


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2", "qwen3", "mistral", "gpt2"])
def test_import_logits_match_hf(kind, tmp_path):
    hf_model = save_random_hf(kind, tmp_path / "hf")
    model, tok, cfg = load_hf_model(tmp_path / "hf")
    assert cfg.model.qkv_bias == (kind == "qwen2")
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids).logits
        ours = model(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4
    assert set(tok.specials) == set(SPECIAL_TOKENS)


def test_import_writes_loadable_checkpoint(tmp_path):
    hf_model = save_random_hf("qwen2", tmp_path / "hf")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "run")
    assert ckpt.name == "step_00000000"
    model, tok, _cfg = load_model(tmp_path / "run")
    ids = torch.tensor([tok.encode("def add(a, b): return a")])
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() < 1e-4


def test_import_adds_missing_specials_and_grows_vocab(tmp_path):
    """A tokenizer without lmforge's specials gets them; logits of old tokens are unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf_model = save_random_hf("llama", tmp_path / "hf", tokenizer=False)
    vocab = {chr(ord("a") + i): i for i in range(26)} | {f"<x{i}>": 26 + i for i in range(294)}
    hf_tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    model, tok, cfg = load_hf_model(tmp_path / "hf")
    assert cfg.model.vocab_size == 320 + len(SPECIAL_TOKENS)
    assert tok.eot_id == 320 and tok.encode("abc") == [0, 1, 2]
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert (model(ids)[..., :320] - hf_model(ids).logits).abs().max().item() < 1e-4


def test_import_refuses_clearly(tmp_path):
    save_random_hf("llama", tmp_path / "hf")
    cfg = (tmp_path / "hf" / "config.json").read_text().replace('"silu"', '"gelu"')
    (tmp_path / "hf" / "config.json").write_text(cfg)
    with pytest.raises(ExportError, match="hidden_act"):
        load_hf_model(tmp_path / "hf")
    with pytest.raises(ExportError, match=r"no config\.json"):
        load_hf_model(tmp_path)


def test_qkv_bias_counts_match_the_model():
    """`ModelConfig.qkv_bias` (added for Qwen2): the parameter counter still equals the model."""
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer, count_params
    from lmforge.model.transformer import matmul_params

    cfg = ModelConfig(
        vocab_size=50,
        context_length=8,
        n_layers=2,
        d_model=16,
        n_heads=4,
        n_kv_heads=2,
        norm="rmsnorm",
        position="rope",
        mlp="swiglu",
        qkv_bias=True,
    )
    model = Transformer(cfg)
    assert count_params(cfg)["total"] == model.num_params()
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert biases == 2 * (4 + 2 * 2) * 4  # layers × (q + k + v heads) × head dim
    no_bias = Transformer(ModelConfig(**{**cfg.__dict__, "qkv_bias": False}))
    assert matmul_params(cfg) == matmul_params(no_bias.cfg)
