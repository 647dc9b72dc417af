"""Perplexity / bits per byte: closed forms, sliding windows, pseudo-perplexity."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.eval.intrinsic import evaluate_texts, plan_windows
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_char

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
)


class FixedLogits(nn.Module):
    """The same next-token distribution at every position, whatever the input."""

    def __init__(self, logits: torch.Tensor, context_length: int, objective: str = "causal"):
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.cfg = SimpleNamespace(context_length=context_length, objective=objective)

    def forward(self, idx, targets=None, cache=None):
        return self.logits.expand(*idx.shape, -1)


@pytest.fixture(scope="module")
def tok():
    return train_char([TEXT + "é€"])


def tiny(tok, objective="causal", ctx=32) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        context_length=ctx,
        n_layers=2,
        d_model=32,
        n_heads=4,
        objective=objective,
    )
    return Transformer(cfg).eval()


@pytest.mark.parametrize("stride", [3, 8, 16])
def test_fixed_logits_match_closed_form(tok, stride):
    torch.manual_seed(1)
    logits = torch.randn(tok.vocab_size, dtype=torch.float64).float()
    texts = [TEXT, "speak, speak. é€", "a"]
    res = evaluate_texts(FixedLogits(logits, 16), tok, texts, stride=stride)
    logp = F.log_softmax(logits.double(), dim=-1)
    ids = [i for t in texts for i in tok.encode(t)]
    nll = -sum(logp[i].item() for i in ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert res.n_tokens == len(ids)  # every token scored exactly once, windows or not
    assert res.n_bytes == n_bytes
    assert res.loss == pytest.approx(nll / len(ids), rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(nll / len(ids)), rel=1e-6)
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)


def test_uniform_model_perplexity_is_vocab_size(tok):
    res = evaluate_texts(FixedLogits(torch.zeros(tok.vocab_size), 8), tok, [TEXT], stride=5)
    assert res.perplexity == pytest.approx(tok.vocab_size, rel=1e-5)
    chars_per_byte = len(TEXT) / len(TEXT.encode("utf-8"))
    assert res.bits_per_byte == pytest.approx(math.log2(tok.vocab_size) * chars_per_byte, rel=1e-5)


def test_sliding_equals_full_context_when_text_fits(tok):
    model = tiny(tok, ctx=64)
    text = TEXT[:60]  # 60 tokens + the boundary token fit in 64
    ids = torch.tensor([[tok.eot_id, *tok.encode(text)]])
    with torch.no_grad():
        full = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="sum").item()
    for stride in (1, 7, 32, 64):
        res = evaluate_texts(model, tok, [text], stride=stride)
        assert res.nll == pytest.approx(full, rel=1e-5)


def test_stride_one_equals_per_token_brute_force(tok):
    """Stride 1: every token after the first window sees exactly the previous ctx-1 tokens."""
    ctx = 16
    model = tiny(tok, ctx=ctx)
    text = TEXT[:50]
    seq = [tok.eot_id, *tok.encode(text)]
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(seq)):
            window = torch.tensor([seq[max(0, t - ctx + 1) : t]])
            nll -= F.log_softmax(model(window)[0, -1], dim=-1)[seq[t]].item()
    res = evaluate_texts(model, tok, [text], stride=1)
    assert res.nll == pytest.approx(nll, rel=1e-5)


def test_batching_does_not_change_scores(tok):
    model = tiny(tok)
    texts = [TEXT, TEXT[:10], TEXT[5:70], "é€ speak"]
    together = evaluate_texts(model, tok, texts, stride=9, max_batch_tokens=4096)
    alone = [evaluate_texts(model, tok, [t], stride=9, max_batch_tokens=40).nll for t in texts]
    assert together.per_text_nll == pytest.approx(alone, rel=1e-5)


def test_windows_cover_each_target_once():
    for n, ctx, stride in [(1, 4, 2), (2, 4, 4), (10, 4, 1), (37, 8, 3), (37, 8, 8), (9, 8, 5)]:
        covered = []
        for begin, end, first in plan_windows(n, ctx, stride):
            assert end - begin <= ctx and begin < first
            covered += list(range(first, end))
        assert covered == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 4, 5)


def test_pseudo_perplexity_matches_one_mask_at_a_time(tok):
    model = tiny(tok, objective="masked", ctx=24)
    text = TEXT[:40]
    seq = [tok.eot_id, *tok.encode(text)]
    res = evaluate_texts(model, tok, [text], stride=12, max_batch_tokens=100)
    # Brute force over the same windows: one forward pass per masked position.
    nll = 0.0
    with torch.no_grad():
        for begin, end, first in plan_windows(len(seq), 24, 12):
            for pos in range(first, end):
                x = torch.tensor([seq[begin:end]])
                x[0, pos - begin] = tok.mask_id
                nll -= F.log_softmax(model(x)[0, pos - begin], dim=-1)[seq[pos]].item()
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.n_tokens == len(seq) - 1


def test_standard_errors_over_documents_match_numpy(tok, tmp_path):
    """loss, perplexity and bits/byte carry the ratio-estimator standard error over documents."""
    import numpy as np

    lines = [line for line in TEXT.splitlines() if line.strip()]
    res = evaluate_texts(tiny(tok), tok, lines)
    nll = np.array(res.per_text_nll, dtype=np.float64)
    tokens = np.array(res.per_text_tokens, dtype=np.float64)
    nbytes = np.array([len(t.encode()) for t in lines], dtype=np.float64)
    n = len(lines)

    def ratio_se(y, x):  # Cochran (1977) eq. 6.9, written out in numpy
        r = y.sum() / x.sum()
        return np.sqrt(((y - r * x) ** 2).sum() / (n - 1) / n) / x.mean()

    # float64 sums of n ≈ 7 terms: agreement to ~1e-12 relative; 1e-9 leaves margin
    se_loss = ratio_se(nll, tokens)
    assert res.loss_stderr() == pytest.approx(se_loss, rel=1e-9)
    assert res.bits_per_byte_stderr() == pytest.approx(ratio_se(nll / np.log(2), nbytes), rel=1e-9)
    assert res.perplexity_stderr() == pytest.approx(
        np.exp(nll.sum() / tokens.sum()) * se_loss, rel=1e-9
    )
    # and the ppl task reports them with its figures
    import json

    from lmforge.eval.tasks import TaskOptions, run_task

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    results = {r.metric: r for r in run_task(tiny(tok), tok, "ppl", TaskOptions(data=[str(data)]))}
    assert results["loss"].n == n and results["loss"].stderr == pytest.approx(se_loss, rel=1e-9)
    assert results["perplexity"].stderr == pytest.approx(res.perplexity_stderr(), rel=1e-9)
