"""Cross-check against the real clients: transformers GPT-2 and lm-evaluation-harness."""

import pytest
import torch
from helpers import require_interop

from lmforge.config import ModelConfig
from lmforge.eval.multiple_choice import load_hellaswag, score_items
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok(shared):
    items = load_hellaswag(shared / "hellaswag", limit=2000)
    return train_bpe([f"{it.context} {' '.join(it.choices)}" for it in items], 1024)


def gpt2_like(tok, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, context_length=256, n_layers=2, d_model=64, n_heads=4, bias=True
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up in the mapping shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_gpt2_folder_has_our_logits_and_tokens(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.eval.lm_eval_bridge import write_gpt2_folder

    model = gpt2_like(tok)
    write_gpt2_folder(model, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Roof shingle removal: A man is sitting on a roof. he starts pulling up roofing."
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)


def test_hellaswag_accuracy_equals_lm_eval_per_item(tok, shared, tmp_path):
    """300 HellaSwag items: lm-eval's `hf` model on a local task vs our scorer, item by item.

    Needs the `interop` extra (lm-eval); mandatory under `.ci/run`."""
    require_interop("lm_eval", "lm-eval")
    from lmforge.eval.lm_eval_bridge import run_lm_eval, write_gpt2_folder, write_lm_eval_task

    items = load_hellaswag(shared / "hellaswag", limit=300)
    model = gpt2_like(tok)
    write_gpt2_folder(model, tok, tmp_path / "hf")
    write_lm_eval_task(items, tmp_path / "task", "lmforge_hellaswag_parity")
    theirs, metrics = run_lm_eval(tmp_path / "hf", tmp_path / "task", "lmforge_hellaswag_parity")
    ours = score_items(model, tok, items)
    assert theirs.n == ours.n == 300
    for a, b in zip(ours.loglikelihoods, theirs.loglikelihoods, strict=True):
        assert a == pytest.approx(b, abs=1e-3)
    diff = max(
        abs(x - y)
        for a, b in zip(ours.loglikelihoods, theirs.loglikelihoods, strict=True)
        for x, y in zip(a, b, strict=True)
    )
    assert ours.correct("none") == theirs.correct("none")
    assert ours.correct("chars") == theirs.correct("chars")
    assert ours.accuracy("none") == pytest.approx(metrics["acc,none"])
    assert ours.accuracy("chars") == pytest.approx(metrics["acc_norm,none"])
    print(
        f"HellaSwag 300 items: acc ours {ours.accuracy():.4f} lm-eval {metrics['acc,none']:.4f}; "
        f"acc_norm ours {ours.accuracy('chars'):.4f} lm-eval {metrics['acc_norm,none']:.4f}; "
        f"max |Δ log-likelihood| {diff:.1e}"
    )
