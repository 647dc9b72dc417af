"""The masked-LM objective: BERT corruption statistics, determinism, pseudo-perplexity, training."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import shakespeare_snippet, tiny_config

from lmforge.config import ModelConfig
from lmforge.masked import MaskedBatches, mask_window, ordinary_token_ids, pseudo_perplexity
from lmforge.model.transformer import Transformer
from lmforge.pretrain import pretrain, tokenize_stage, tokenizer_stage
from lmforge.shards import TokenLoader
from lmforge.tokenizer import train_tokenizer


def test_mask_window_follows_bert_80_10_10():
    ordinary = np.arange(7, 107)
    rng = np.random.default_rng(0)
    tokens = rng.choice(ordinary, size=200_000)
    tokens[::50] = 0  # end-of-text tokens must never be selected
    x, y = mask_window(tokens, np.random.Generator(np.random.PCG64([1, 2])), 2, ordinary)
    selected = y != -100
    n = selected.sum()
    eligible = (tokens != 0).sum()
    # Binomial(eligible, 0.15): 6 standard deviations either side.
    assert abs(n - 0.15 * eligible) < 6 * math.sqrt(eligible * 0.15 * 0.85)
    assert not selected[tokens == 0].any()
    assert (y[selected] == tokens[selected]).all()
    assert (x[~selected] == tokens[~selected]).all()
    masked = (x[selected] == 2).mean()
    changed = ((x[selected] != 2) & (x[selected] != tokens[selected])).mean()
    # 80% mask; 10% random (of which 1/100 draws the same token, so ≈ 9.9% changed).
    assert abs(masked - 0.8) < 6 * math.sqrt(0.8 * 0.2 / n)
    assert abs(changed - 0.1 * 0.99) < 6 * math.sqrt(0.1 * 0.9 / n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masked")
    cfg = tiny_config(tmp, corpus=shakespeare_snippet(tmp, 60_000))
    tok = tokenizer_stage(cfg, tmp)
    return tok, tokenize_stage(cfg, tok, tmp)


def test_masks_follow_global_samples_not_world_size(corpus):
    tok, tokens_dir = corpus
    loader = TokenLoader(tokens_dir, "train", 32, seed=3)
    batches = MaskedBatches(loader, tok, seed=3)
    one = [batches.batch(5, m, 4, 2, 0, 1) for m in range(2)]
    two = [batches.batch(5, 0, 4, 1, r, 2) for r in range(2)]
    for (x1, y1), (x2, y2) in zip(one, two, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    again = MaskedBatches(TokenLoader(tokens_dir, "train", 32, seed=3), tok, seed=3).batch(
        5, 1, 4, 2, 0, 1
    )
    assert torch.equal(again[0], one[1][0]) and torch.equal(again[1], one[1][1])
    other_step = batches.batch(6, 0, 4, 2, 0, 1)
    assert not torch.equal(other_step[1], one[0][1])


def test_pseudo_perplexity_matches_eval_implementation_and_brute_force():
    """Two implementations (ours over token windows, `eval.intrinsic` over texts) and a loop."""
    from lmforge.eval.intrinsic import evaluate_texts

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    tok = train_tokenizer([text], "char", 0)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, context_length=96, n_layers=2, d_model=32, n_heads=4
    )
    model = Transformer(ModelConfig(**{**cfg.__dict__, "objective": "masked"})).eval()
    ids = torch.tensor([tok.eot_id, *tok.encode(text)])
    ours = pseudo_perplexity(model, [ids], tok.mask_id, ordinary_token_ids(tok), batch_size=7)
    theirs = evaluate_texts(model, tok, [text])
    assert ours["pppl_tokens"] == theirs.n_tokens == len(text)
    # The loop, in float64, is the reference; it also measures the fp32 logits' error.
    model64 = copy.deepcopy(model).double()
    total, logit_err = 0.0, 0.0
    for t in range(1, len(ids)):
        x = ids.clone()
        x[t] = tok.mask_id
        with torch.no_grad():
            logits, logits64 = model(x[None])[0, t], model64(x[None])[0, t]
        total += float(torch.log_softmax(logits64, -1)[ids[t]])
        logit_err = max(logit_err, (logits.double() - logits64).abs().max().item())
    ref = total / len(text)
    # A log-softmax value moves by at most twice the largest logit error (its gradient in
    # the logits has l1 norm 2), and so does their mean. The two implementations batch
    # the positions otherwise than the loop (other matmul shapes, other rounding): allow
    # 4 times the loop's logit error, plus 16 roundings of the result.
    tol = 2 * 4 * logit_err + 16 * torch.finfo(torch.float32).eps * abs(ref)
    assert ours["pll_per_token"] == pytest.approx(ref, abs=tol)
    assert -theirs.loss == pytest.approx(ref, abs=tol)


def _masked_cfg(tmp, *extra):
    return tiny_config(
        tmp,
        "model.objective=masked",
        "train.max_steps=8",
        *extra,
    )


def test_masked_pretrain_runs_and_resumes_exactly(tmp_path):
    cfg = _masked_cfg(tmp_path)
    full = pretrain(cfg)
    assert {"val_loss", "val_pppl", "unigram_ppl"} <= set(full)
    assert "val_bpb" not in full  # a masked loss is not a per-byte figure
    # Drop the final checkpoint and resume from step 4: the masks of steps 5-8 must be
    # the ones the uninterrupted run drew, so the result is identical.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000008")
    resumed = pretrain(cfg, resume="auto")
    assert resumed["val_loss"] == full["val_loss"]
    assert resumed["val_pppl"] == full["val_pppl"]


@pytest.mark.slow
def test_masked_lm_learns_on_shakespeare(tmp_path):
    """Pseudo-perplexity ends well below the unigram baseline (acceptance of issue 4)."""
    cfg = tiny_config(
        tmp_path,
        "model.objective=masked",
        "model.position=rope",
        "model.context_length=64",
        "model.n_layers=2",
        "model.d_model=64",
        "train.max_steps=300",
        "train.tokens_per_step=2048",
        "train.micro_batch_size=32",
        "train.lr=3e-3",
        "train.warmup_steps=20",
        "train.eval_every=300",
        "train.checkpoint_every=300",
        corpus=shakespeare_snippet(tmp_path, 400_000),
    )
    summary = pretrain(cfg)
    json.dumps(summary)
    assert summary["val_pppl"] < 0.5 * summary["unigram_ppl"]
