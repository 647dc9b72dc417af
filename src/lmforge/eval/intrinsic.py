"""Intrinsic evaluation: loss, perplexity and bits per byte of raw text.

Bits per byte is the tokenizer-independent figure: the total negative
log-likelihood of a text, in bits, divided by the number of UTF-8 bytes of that
text. Two models with different vocabularies score the same bytes, so their
bits per byte compare directly; their per-token losses and perplexities do not.

Texts longer than the context are scored with a sliding window (the procedure of
HF's "Perplexity of fixed-length models" guide): windows of `context_length`
tokens start every `stride` tokens, and each window scores only the tokens that
no earlier window scored, so every token is scored exactly once and (after the
first window) with at least `context_length - stride` tokens of context. A text
that fits in one window is scored exactly as a single full-context forward pass.

Every text is scored after an end-of-text token, the document boundary the
models were trained with, so its first token is predicted too and the loss
covers every byte of the text.

Masked LMs (`model.cfg.objective == "masked"`) get pseudo-perplexity (Salazar et
al. 2020, "Masked Language Model Scoring"): each position in turn is replaced by
the mask token and scored from both sides; the copies of a window, one per
masked position, run as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.generation import context_length_of as context_length_of
from lmforge.tokenizer import Tokenizer


@dataclass
class Window:
    """One forward pass: `ids` (≤ context tokens) and the positions whose next token is scored.

    Causal: logits at position i predict ids[i + 1]; `first` is the first such i
    whose target is new. Masked: position i itself is masked and scored, for
    i in [first + 1, len(ids)).
    """

    text: int  # index of the text the window belongs to
    ids: list[int]
    first: int


@dataclass
class IntrinsicResult:
    """Sums over a set of texts, and the figures derived from them."""

    nll: float = 0.0  # total negative log-likelihood, nats
    n_tokens: int = 0  # scored tokens
    n_bytes: int = 0  # UTF-8 bytes of the texts
    n_texts: int = 0
    per_text_nll: list[float] = field(default_factory=list)
    per_text_tokens: list[int] = field(default_factory=list)
    per_text_bytes: list[int] = field(default_factory=list)

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token (nats)."""
        return self.nll / max(self.n_tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.n_bytes, 1)

    def bits_per_byte_stderr(self) -> float:
        """Standard error of bits per byte over texts (ratio estimator; see `ratio_stderr`)."""
        bits = [x / math.log(2) for x in self.per_text_nll]
        return ratio_stderr(bits, self.per_text_bytes)

    def loss_stderr(self) -> float:
        """Standard error of the per-token loss over texts (ratio estimator)."""
        return ratio_stderr(self.per_text_nll, self.per_text_tokens)

    def perplexity_stderr(self) -> float:
        """Standard error of perplexity = exp(loss), by the delta method: exp(loss) · se(loss)."""
        return self.perplexity * self.loss_stderr()


def ratio_stderr(numerators: list[float], denominators: list[int]) -> float:
    """Standard error of R = Σ yᵢ / Σ xᵢ over documents i (a ratio estimator).

    The corpus figures (loss per token, bits per byte) are token- or byte-weighted
    means, i.e. ratios of sums over documents, and documents are the unit that was
    sampled. The linearised (delta-method) variance of a ratio estimator
    (Cochran 1977, "Sampling Techniques", §6.3, eq. 6.9) is

        Var(R) ≈ Σ (yᵢ − R·xᵢ)² / ((n − 1) · n · x̄²),   x̄ = Σ xᵢ / n,

    and the standard error is its square root; nan with fewer than two documents.
    """
    n = len(numerators)
    total = sum(denominators)
    if n < 2 or total == 0:
        return float("nan")
    ratio = sum(numerators) / total
    resid = [y - ratio * x for y, x in zip(numerators, denominators, strict=True)]
    var = sum(r * r for r in resid) / ((n - 1) * n * (total / n) ** 2)
    return math.sqrt(var)


def plan_windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_new_target) windows over a sequence of `n_tokens` (boundary included).

    Token t (1 ≤ t < n_tokens) is predicted from tokens [begin, t) of the window
    that scores it; windows overlap by `context_length - stride` tokens.
    """
    if not 0 < stride <= context_length:
        raise ValueError(f"stride = {stride} must be in 1..context_length ({context_length})")
    if context_length < 2:
        raise ValueError("context_length must be at least 2 to score anything")
    windows = []
    prev_end = 1  # token 0 is the end-of-text boundary: never a target
    begin = 0
    while prev_end < n_tokens:
        # A window must start before its first target, or that target has no context.
        begin = min(begin, prev_end - 1)
        end = min(begin + context_length, n_tokens)
        windows.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return windows


def _windows(
    token_lists: list[list[int]], boundary: int, context_length: int, stride: int
) -> Iterator[Window]:
    for i, ids in enumerate(token_lists):
        seq = [boundary, *ids]
        for begin, end, first in plan_windows(len(seq), context_length, stride):
            # Causal positions predicting targets first..end-1 are first-1..end-2 in the window.
            yield Window(i, seq[begin:end], first - begin - 1)


def _batches(windows: list[Window], max_tokens: int) -> Iterator[list[Window]]:
    """Length-sorted batches of at most `max_tokens` (padded) tokens each."""
    order = sorted(windows, key=lambda w: -len(w.ids))
    batch: list[Window] = []
    for w in order:
        width = len(batch[0].ids) if batch else len(w.ids)
        if batch and width * (len(batch) + 1) > max_tokens:
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


@torch.no_grad()
def _score_causal(
    model: nn.Module, windows: list[Window], pad_id: int, max_tokens: int, device: torch.device
) -> list[float]:
    """Summed NLL (nats) of each window's new targets."""
    out = [0.0] * len(windows)
    index = {id(w): k for k, w in enumerate(windows)}
    for batch in _batches(windows, max_tokens):
        width = max(len(w.ids) for w in batch)
        # Right padding: a causal model's real positions never see the pads after them.
        x = torch.full((len(batch), width), pad_id, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, w in enumerate(batch):
            ids = torch.tensor(w.ids)
            x[r, : len(ids)] = ids
            y[r, w.first : len(ids) - 1] = ids[w.first + 1 :]
        logits = model(x.to(device)).float()  # (B, T, V)
        nll = F.cross_entropy(
            logits.transpose(1, 2), y.to(device), ignore_index=-100, reduction="none"
        )  # (B, T)
        sums = nll.sum(dim=1).double().cpu().tolist()
        for r, w in enumerate(batch):
            out[index[id(w)]] = sums[r]
    return out


@torch.no_grad()
def _score_masked(
    model: nn.Module,
    windows: list[Window],
    mask_id: int,
    max_tokens: int,
    device: torch.device,
) -> list[float]:
    """Pseudo-NLL: each scored position masked in its own copy of the window, copies batched."""
    out = [0.0] * len(windows)
    for k, w in enumerate(windows):
        ids = torch.tensor(w.ids)
        positions = torch.arange(w.first + 1, len(ids))
        rows_per_batch = max(1, max_tokens // len(ids))
        total = 0.0
        for chunk in positions.split(rows_per_batch):
            x = ids.repeat(len(chunk), 1)  # (P, T): one copy per masked position
            rows = torch.arange(len(chunk))
            x[rows, chunk] = mask_id
            logits = model(x.to(device)).float()  # (P, T, V)
            picked = logits[rows.to(device), chunk.to(device)]  # (P, V)
            total += float(F.cross_entropy(picked, ids[chunk].to(device), reduction="sum"))
        out[k] = total
    return out


def evaluate_texts(
    model: nn.Module,
    tok: Tokenizer,
    texts: Iterable[str],
    stride: int | None = None,
    context_length: int | None = None,
    max_batch_tokens: int = 8192,
    device: str | torch.device | None = None,
) -> IntrinsicResult:
    """Loss, perplexity and bits per byte of `texts` (see the module docstring).

    `stride` defaults to half the context (each token then sees at least half a
    context of history); `stride = context_length` gives windows that overlap by
    the one token needed to predict each window's first target.
    """
    ctx = context_length_of(model, context_length)
    stride = stride or max(1, ctx // 2)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    texts = list(texts)
    token_lists = tok.encode_batch(texts)
    windows = list(_windows(token_lists, tok.eot_id, ctx, stride))
    was_training = model.training
    model.eval()
    masked = getattr(getattr(model, "cfg", None), "objective", "causal") == "masked"
    try:
        if masked:
            nlls = _score_masked(model, windows, tok.mask_id, max_batch_tokens, device)
        else:
            nlls = _score_causal(model, windows, tok.pad_id, max_batch_tokens, device)
    finally:
        model.train(was_training)
    res = IntrinsicResult(n_texts=len(texts))
    res.per_text_nll = [0.0] * len(texts)
    res.per_text_tokens = [len(ids) for ids in token_lists]
    res.per_text_bytes = [len(t.encode("utf-8", errors="replace")) for t in texts]
    for w, nll in zip(windows, nlls, strict=True):
        res.per_text_nll[w.text] += nll
    res.nll = sum(res.per_text_nll)
    res.n_tokens = sum(res.per_text_tokens)
    res.n_bytes = sum(res.per_text_bytes)
    return res


def read_texts(specs: list[str], limit: int = 0, max_bytes: int = 0) -> list[str]:
    """Texts of the documents of data sources (files, folders, globs, JSONL with `text`)."""
    from lmforge.data.sources import iter_documents

    return _collect_texts(iter_documents(specs), specs, limit, max_bytes)


def held_out_texts(
    specs: list[str], split: str, val_fraction: float, limit: int = 0, max_bytes: int = 2_000_000
) -> list[str]:
    """The validation documents of data sources, split as `lmforge tokenize` splits them
    (`lmforge.shards`: whole documents by id, or the tail of each document)."""
    from lmforge.data.sources import iter_documents
    from lmforge.shards import split_document

    held = (
        replace(d, text=split_document(d.id, d.text, val_fraction, split)[1])
        for d in iter_documents(specs)
    )
    return _collect_texts(held, specs, limit, max_bytes)


def _collect_texts(docs: Iterable[Any], specs: list[str], limit: int, max_bytes: int) -> list[str]:
    texts, seen = [], 0
    for doc in docs:
        if not doc.text:
            continue
        texts.append(doc.text)
        seen += len(doc.text.encode("utf-8", errors="replace"))
        if (limit and len(texts) >= limit) or (max_bytes and seen >= max_bytes):
            break
    if not texts:
        raise ValueError(f"no text found in {specs}")
    return texts
