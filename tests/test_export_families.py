"""Real families in and out, against transformers: Qwen2.5, Mistral, OLMo 2, Gemma 2, Phi-3.

Each test has transformers build a tiny random model from the family's real config.json
settings (norms, activations, RoPE base, soft-capping, tied or untied head, sliding
window, ...) with only the sizes scaled down, saves it as a folder, imports it, and
checks logits, greedy ids against HF `generate`, and an export that transformers loads
back with the same logits.

Tolerance: fp32 logits of magnitude O(1) after two layers, the same products summed in
another order (fused q/k/v and gate/up matmuls): 1e-4, as for the other families. Gemma
2's soft-capped logits are bounded by the cap (30): still O(1)–O(10), and tanh only
shrinks differences.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.export.hf import ExportError, export_hf, hf_architecture, load_hf_model  # noqa: E402
from lmforge.model.decode import Decoder  # noqa: E402
from lmforge.model.generate import generate  # noqa: E402
from lmforge.model.transformer import count_params  # noqa: E402
from lmforge.tokenizer import train_bpe  # noqa: E402

FP32_LOGITS = 1e-4
TEXT = "def add(a, b):\n    return a + b\n"

# The sizes every family's test model shrinks to; the rest of each config is the family's.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT, "Hello there, world."] * 20, 300)


def build(tok, tmp_path, name: str, config) -> torch.nn.Module:
    """transformers' own random model for `config`, saved as folder tmp_path/name."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves some weights at exact constants (norms at 1 or 0): perturb every
    # tensor so each mapping (and each norm's offset) shows in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / name)
    (tmp_path / name / "tokenizer.json").write_text(tok.to_json())
    return model


def check_parity(hf, tok, tmp_path, name: str, n_tokens: int = 48):
    """Import tmp_path/name; logits and greedy ids equal HF's; export loads back equal."""
    model, _, cfg = load_hf_model(tmp_path / name)
    ids = torch.tensor([tok.encode(TEXT * 8)[:n_tokens]])
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)[..., : want.shape[-1]]
    torch.testing.assert_close(got, want, atol=FP32_LOGITS, rtol=0)
    assert count_params(model.cfg)["total"] == model.num_params() == hf.num_parameters()
    # The KV-cache decoder's one-token steps compute the full forward's logits.
    assert Decoder.supports(model)
    decoder = Decoder(model, 1, n_tokens)
    with torch.no_grad():
        decoder.prefill(ids[:, :12])
        steps = torch.stack([decoder.step(ids[:, t]) for t in range(12, n_tokens)], dim=1)
        torch.testing.assert_close(steps[:, :-1], model(ids)[:, 12:-1], atol=FP32_LOGITS, rtol=0)
    prompt = ids[0, :12].tolist()
    ours = generate(model, prompt, 20, temperature=0)[0, 12:].tolist()
    theirs = hf.generate(ids[:, :12], max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert ours == theirs[0, 12:].tolist()
    export_hf(model, tok, tmp_path / (name + "-back"))
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / (name + "-back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids), atol=FP32_LOGITS, rtol=0)
    return model, cfg


def test_qwen25_imports_exports_and_decodes(tok, tmp_path):
    # Qwen2.5-0.5B's config.json: tied head, rope_theta 1e6, q/k/v biases, no sliding.
    config = transformers.Qwen2Config(
        vocab_size=tok.vocab_size,
        **TINY,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=24,
        hidden_act="silu",
    )
    hf = build(tok, tmp_path, "qwen25", config)
    model, _ = check_parity(hf, tok, tmp_path, "qwen25")
    m = model.cfg
    assert (m.qkv_bias, m.tie_embeddings, m.rope_theta, m.context_length) == (
        True,
        True,
        1e6,
        32768,
    )


def test_qwen3_with_its_own_head_size_imports(tok, tmp_path):
    # Qwen3-0.6B's config.json: head_dim 128 with hidden 1024 / 16 heads (here 32 against
    # 64 / 4), QK-norm per head, tied head, rope_theta 1e6, no biases.
    config = transformers.Qwen3Config(
        vocab_size=tok.vocab_size,
        **TINY,
        head_dim=32,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
    )
    hf = build(tok, tmp_path, "qwen3", config)
    model, _ = check_parity(hf, tok, tmp_path, "qwen3")
    assert (model.cfg.head_dim, model.cfg.qk_norm) == (32, True)


def test_mistral_with_a_sliding_window_imports(tok, tmp_path):
    # Mistral-7B-v0.1's config.json: GQA, untied head, sliding_window 4096 < 32768 positions.
    config = transformers.MistralConfig(
        vocab_size=tok.vocab_size,
        **TINY,
        max_position_embeddings=32768,
        sliding_window=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    hf = build(tok, tmp_path, "mistral", config)
    model, _ = check_parity(hf, tok, tmp_path, "mistral")
    # Attending to the whole context equals the window only up to the window's length.
    assert model.cfg.context_length == 4096


def test_a_long_context_import_builds_rope_tables_lazily(tok, tmp_path):
    # A 131072-position model (Qwen2.5-7B-Instruct's YaRN-less setting, Llama 3.1's length).
    config = transformers.Qwen2Config(
        vocab_size=tok.vocab_size,
        **TINY,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )
    hf = build(tok, tmp_path, "long", config)
    model, _, cfg = load_hf_model(tmp_path / "long")
    assert model.cfg.context_length == 131072 == cfg.model.context_length
    head_dim = 64 // 4
    # Tables for all 131072 positions would be 2 × 131072 × D/2 floats (8 MiB here, 64 MiB
    # at D = 128); they start at ROPE_TABLE_START positions and grow on demand.
    buffers = sum(b.numel() for b in model.buffers())
    assert buffers <= 2 * 4096 * head_dim // 2
    ids = torch.tensor([tok.encode(TEXT * 8)[:40]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids)[..., : tok.vocab_size], hf(ids).logits, atol=FP32_LOGITS, rtol=0
        )
        # A sequence past the first table grows it and still agrees with HF's positions.
        long_ids = torch.tensor([(tok.encode(TEXT) * 400)[:4200]])
        torch.testing.assert_close(
            model(long_ids)[0, -4:], hf(long_ids).logits[0, -4:], atol=FP32_LOGITS, rtol=0
        )
    assert model.rope_cos is not None and 4200 <= model.rope_cos.size(0) <= 8192


def test_finetuning_an_imported_long_context_model_trains_short_rows():
    from dataclasses import replace

    from lmforge.config import Config, ConfigError, FinetuneConfig, ModelConfig
    from lmforge.finetune.finetune import finetune_seq_len

    def seq_len(position: str, context: int, asked: int = 0) -> int:
        model = ModelConfig(position=position, context_length=context)  # type: ignore[arg-type]
        return finetune_seq_len(
            replace(Config(), model=model, finetune=FinetuneConfig(seq_len=asked))
        )

    assert seq_len("rope", 131072) == 2048
    assert seq_len("rope", 131072, 8192) == 8192
    assert seq_len("rope", 512) == 512
    assert seq_len("learned", 4096, 1024) == 4096  # learned positions: the table is the context
    with pytest.raises(ConfigError, match=r"finetune\.seq_len"):
        seq_len("rope", 512, 1024)


def test_olmo2_imports_exports_and_decodes(tok, tmp_path):
    # OLMo-2-1124-7B's config.json: norms after attention and MLP (no pre-norm), QK-norm
    # over the whole q and k projections, rope_theta 500000, untied head.
    config = transformers.Olmo2Config(
        vocab_size=tok.vocab_size,
        **TINY,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        attention_bias=False,
        tie_word_embeddings=False,
        hidden_act="silu",
    )
    hf = build(tok, tmp_path, "olmo2", config)
    model, _ = check_parity(hf, tok, tmp_path, "olmo2")
    m = model.cfg
    assert (m.norm_placement, m.qk_norm, m.qk_norm_scope) == ("post", True, "full")
    assert hf_architecture(m) == "olmo2"
    back = json.loads((tmp_path / "olmo2-back" / "config.json").read_text())
    assert back["model_type"] == "olmo2"


def test_a_variant_no_architecture_expresses_is_refused_by_name():
    from lmforge.config import ModelConfig

    llama = dict(norm="rmsnorm", position="rope", mlp="swiglu", vocab_size=300)
    with pytest.raises(ExportError, match=r"model\.gate_act"):
        hf_architecture(ModelConfig(**llama, norm_placement="sandwich", embed_scale=True))
    with pytest.raises(ExportError, match=r"model\.qk_norm_scope"):
        hf_architecture(ModelConfig(**llama, norm_placement="post", qk_norm=True))
    with pytest.raises(ExportError, match=r"model\.attn_softcap"):
        hf_architecture(ModelConfig(**llama, attn_softcap=50.0))
    with pytest.raises(ExportError, match=r"model\.logit_softcap"):
        hf_architecture(ModelConfig(vocab_size=300, logit_softcap=30.0))  # GPT-2-like


def test_gemma2_imports_exports_and_decodes(tok, tmp_path):
    # gemma-2-2b's config.json: GeGLU (tanh GELU), four norms per layer with (1 + weight),
    # embeddings × √C, query_pre_attn_scalar 256 (here ≠ head size, so the scale shows),
    # attention and final logit soft-capping, tied head. Its sliding window (4096 in
    # every other layer) is set above the test's length; the import caps its context there.
    # head_dim 32 ≠ 64 / 4 heads, as gemma-2-2b's 256 ≠ 2304 / 8.
    # The real caps (50, 30) hardly touch a tiny random model's scores (removing the
    # attention cap moves its logits by ~2e-6): caps of 0.5 and 2 make both change the
    # logits by 1e-2 and more, far above the tolerance.
    # Attention soft-capping needs the "eager" implementation in transformers.
    config = transformers.Gemma2Config(
        vocab_size=tok.vocab_size,
        **TINY,
        head_dim=32,
        max_position_embeddings=8192,
        sliding_window=4096,
        query_pre_attn_scalar=64,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    hf = build(tok, tmp_path, "gemma2", config)
    model, _ = check_parity(hf, tok, tmp_path, "gemma2")
    m = model.cfg
    assert (m.norm_placement, m.gate_act, m.embed_scale) == ("sandwich", "gelu_tanh", True)
    assert (m.attn_scale, m.attn_softcap, m.logit_softcap) == (64**-0.5, 0.5, 2.0)
    assert m.context_length == 4096
    back = json.loads((tmp_path / "gemma2-back" / "config.json").read_text())
    assert back["model_type"] == "gemma2" and back["query_pre_attn_scalar"] == 64


def test_phi3_imports_with_its_fused_projections(tok, tmp_path):
    # Phi-3-mini-4k-instruct's config.json: fused qkv_proj and gate_up_proj, full rotary,
    # no RoPE scaling, untied head, sliding_window 2047 of 4096 positions (MHA; GQA here).
    config = transformers.Phi3Config(
        vocab_size=tok.vocab_size,
        **TINY,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        sliding_window=2047,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        # Phi-3's special ids (32000) lie outside the tiny vocabulary.
        bos_token_id=tok.eot_id,
        eos_token_id=tok.eot_id,
        pad_token_id=tok.pad_id,
    )
    hf = build(tok, tmp_path, "phi3", config)
    assert "model.layers.0.self_attn.qkv_proj.weight" in hf.state_dict()
    model, _ = check_parity(hf, tok, tmp_path, "phi3")  # exported as Llama
    assert model.cfg.context_length == 2047


# Qwen2.5's ChatML core (its real template adds tool calling around this).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TURNS = [("system", "Be brief."), ("user", "Hello there"), ("assistant", "def add(a, b)")]


@pytest.fixture(scope="module")
def chatml_tok(tok):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.tokenizer import BPETokenizer

    hf = HFTokenizer.from_str(tok.to_json())
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    return BPETokenizer(hf)


def test_chat_template_and_special_tokens_come_over_and_go_back(chatml_tok, tmp_path):
    from lmforge.export.hf import import_hf
    from lmforge.finetune.finetune import model_template
    from lmforge.pretrain import load_model

    tok = chatml_tok
    config = transformers.Qwen2Config(vocab_size=tok.vocab_size, **TINY, tie_word_embeddings=True)
    build(tok, tmp_path, "chat", config)
    tk_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML,
        "bos_token": None,
        "eos_token": "<|im_end|>",
    }
    (tmp_path / "chat" / "tokenizer_config.json").write_text(json.dumps(tk_cfg))
    model, _, cfg = load_hf_model(tmp_path / "chat")
    t = cfg.tokenizer
    assert (t.chat_template, t.bos_token, t.eos_token) == (CHATML, "", "<|im_end|>")
    # Recorded with the imported run, so fine-tuning and export find it there too.
    import_hf(tmp_path / "chat", tmp_path / "run")
    _, _, run_cfg = load_model(tmp_path / "run")
    assert run_cfg.tokenizer.chat_template == CHATML
    _, stop = model_template(run_cfg, tok)
    assert stop == (tok.encode("<|im_end|>")[0],)

    export_hf(model, tok, tmp_path / "chat-back", chat=cfg.tokenizer)
    messages = [{"role": r, "content": c} for r, c in TURNS[:2]]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "chat")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "chat-back")
    want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert back.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert want.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    config_back = json.loads((tmp_path / "chat-back" / "config.json").read_text())
    assert config_back["eos_token_id"] == tok.encode("<|im_end|>")[0] == back.eos_token_id


def test_finetuning_renders_through_the_imported_template(chatml_tok, tmp_path):
    from lmforge.finetune.tasks import ChatTemplate, encode_turns_template

    tok = chatml_tok
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    hf_tok.chat_template = CHATML
    messages = [{"role": r, "content": c} for r, c in TURNS]
    want = hf_tok.apply_chat_template(messages, tokenize=False)
    ids, trained, prompt_len = encode_turns_template(tok, TURNS, ChatTemplate(CHATML))
    assert tok.decode(ids[:-1]) == want and ids[-1] == tok.eot_id
    # Trained: the reply and the template's end of turn, nothing of the prompt.
    assert tok.decode([i for i, t in zip(ids, trained, strict=True) if t]) == (
        "def add(a, b)<|im_end|>\n"
    )
    prompt = hf_tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids[:prompt_len]) == prompt


def test_gguf_export_of_a_new_family_refuses_clearly():
    from lmforge.config import ModelConfig
    from lmforge.export.gguf import gguf_tensors
    from lmforge.model.transformer import Transformer

    cfg = ModelConfig(
        norm="rmsnorm", position="rope", mlp="swiglu", vocab_size=64, d_model=32, n_layers=1,
        norm_placement="post", qk_norm=True, qk_norm_scope="full",
    )  # fmt: skip
    with pytest.raises(ExportError, match="GGUF export does not write olmo2"):
        gguf_tensors(Transformer(cfg))


def test_an_imported_chat_model_fine_tunes_on_short_rows_through_its_template(chatml_tok, tmp_path):
    from lmforge.config import load_config
    from lmforge.finetune.finetune import finetune, finetuned_checkpoint
    from lmforge.pretrain import load_model

    tok = chatml_tok
    # A Qwen2.5-shaped folder of 32768 positions with its ChatML template.
    config = transformers.Qwen2Config(
        vocab_size=tok.vocab_size, **TINY, max_position_embeddings=32768, tie_word_embeddings=True
    )
    build(tok, tmp_path, "chat", config)
    tk_cfg = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    (tmp_path / "chat" / "tokenizer_config.json").write_text(json.dumps(tk_cfg))
    data = tmp_path / "instr.jsonl"
    rows = [{"instruction": f"Add {i}.", "input": "", "output": f"a + {i}"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"finetune.init={tmp_path / 'chat'}",
            "finetune.task=instruction",
            f"finetune.train_files=[{data}]",
            "finetune.max_steps=2",
            "finetune.seq_len=64",
            "finetune.tokens_per_step=128",
            "finetune.eval_examples=0",
            "train.micro_batch_size=2",
            "train.warmup_steps=0",
            "train.peak_flops=1e11",
        ],
    )
    summary = finetune(cfg, tmp_path / "run")
    assert summary["step"] == 2
    _, _, tuned_cfg = load_model(finetuned_checkpoint(tmp_path / "run"))
    assert tuned_cfg.model.context_length == 32768  # rows of 64 tokens, the context kept
    assert tuned_cfg.tokenizer.chat_template == CHATML
