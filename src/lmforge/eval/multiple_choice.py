"""Zero-shot multiple choice by log-likelihood (HellaSwag and user tasks).

Each item is a context and a few choices; the model scores the log-likelihood of
every continuation `delimiter + choice` given the context and picks the best:

- `acc`: highest summed log-likelihood;
- `acc_norm`: highest log-likelihood per character of the choice, which removes
  the bias towards long endings having lower total likelihood (lm-evaluation-harness's
  `acc_norm` divides by `len(choice)`, the length of the string in characters);
- `acc_bytes`: the same per UTF-8 byte of the choice (lm-eval's `acc_bytes`),
  the tokenizer- and script-independent variant. On ASCII text the two agree.

Requests are built exactly as lm-evaluation-harness builds them for a causal HF
model, so scores agree with it item by item: trailing spaces of the context move
to the continuation; the continuation's tokens are those of
`encode(context + continuation)` after the first `len(encode(context))` tokens;
an empty context becomes the end-of-text token; a request longer than the
context window keeps its last `context_length + 1` tokens.

Speed: the context of an item is computed once. Items whose contexts have the
same token length run together as one batch through the model, filling a KV
cache. Then every (item, choice) row continues from a copy of its item's cache
rows; rows are sorted by continuation length and run in batches within a token
budget (right-padded: pads after the real tokens cannot change them under a
causal mask), so there is little padding.

The generic task format is JSONL, one item a line:
`{"context": str, "choices": [str, ...], "label": int}` (optional "id").
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.eval.results import mean_and_stderr
from lmforge.fileio import iter_json_lines, write_text_atomic
from lmforge.generation import context_length_of
from lmforge.model.transformer import KVCache
from lmforge.tokenizer import Tokenizer


@dataclass
class MCItem:
    context: str
    choices: list[str]
    label: int
    id: str = ""


NORMALISATIONS = ("none", "chars", "bytes")
# Metric name per normalisation, as lm-evaluation-harness names them.
METRIC_NAMES = {"none": "acc", "chars": "acc_norm", "bytes": "acc_bytes"}


@dataclass
class MCResult:
    """Per-item log-likelihoods and the accuracies derived from them."""

    loglikelihoods: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    choices: list[list[str]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.labels)

    def predictions(self, norm: str = "none") -> list[int]:
        """Index of the best choice per item; `norm` divides by characters or UTF-8 bytes."""
        if norm not in NORMALISATIONS:
            raise ValueError(f"norm = {norm!r} is not one of {NORMALISATIONS}")
        preds = []
        for lls, choices in zip(self.loglikelihoods, self.choices, strict=True):
            if norm == "chars":
                scores = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
            elif norm == "bytes":
                scores = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices, strict=True)]
            else:
                scores = list(lls)
            # First maximum on ties, like numpy's argmax in lm-eval.
            preds.append(max(range(len(scores)), key=lambda i: (scores[i], -i)))
        return preds

    def correct(self, norm: str = "none") -> list[int]:
        return [int(p == y) for p, y in zip(self.predictions(norm), self.labels, strict=True)]

    def accuracy(self, norm: str = "none") -> float:
        c = self.correct(norm)
        return sum(c) / max(len(c), 1)


def mean_stderr(values: list[int] | list[float]) -> float:
    """Standard error of a mean: sample standard deviation (n - 1) / sqrt(n)."""
    return mean_and_stderr(values)[1]


# ----------------------------------------------------------------------------- data


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: strip, WikiHow `[title]` → '. ', drop other [tags], '  ' → ' '."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: str | Path, limit: int = 0) -> list[MCItem]:
    """HellaSwag items from the shared JSONL (`hellaswag_val.jsonl.gz`) or its folder.

    The context is `activity_label: ctx` as in lm-eval's task. The shared mirror
    has only the joined `ctx` (lm-eval capitalises `ctx_b`, which this file cannot
    split off), so absolute accuracies can differ slightly from published
    HellaSwag figures; comparisons on this file are like for like.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "hellaswag_val.jsonl.gz"
    items = []
    for lineno, rec in iter_json_lines(path):
        try:
            ctx = hellaswag_preprocess(f"{rec['activity_label']}: {rec['ctx']}")
            choices = [hellaswag_preprocess(e) for e in rec["endings"]]
            label = int(rec["label"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: not a HellaSwag record ({exc!r})") from None
        items.append(MCItem(ctx, choices, label, str(rec.get("row", lineno - 1))))
        if limit and len(items) >= limit:
            break
    return items


def load_mc_jsonl(path: str | Path, limit: int = 0) -> list[MCItem]:
    """Items of the generic format; a bad line raises naming the file, line and field."""
    path = Path(path)
    items = []
    for lineno, rec in iter_json_lines(path):
        items.append(_mc_item(rec, f"{path}:{lineno}", str(lineno)))
        if limit and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _mc_item(rec: Any, where: str, default_id: str) -> MCItem:
    """One `{context, choices, label[, id]}` record, checked field by field."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with context, choices, label")
    if not isinstance(rec.get("context"), str):
        raise ValueError(f"{where}: field 'context' must be a string")
    choices = rec.get("choices")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) for c in choices)
    ):
        raise ValueError(f"{where}: field 'choices' must be a list of ≥ 2 strings")
    label = rec.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: field 'label' must be an integer")
    if not 0 <= label < len(choices):
        raise ValueError(f"{where}: field 'label' = {label} is not in 0..{len(choices) - 1}")
    return MCItem(rec["context"], choices, label, str(rec.get("id", default_id)))


def write_mc_jsonl(items: Iterable[MCItem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [
        {"id": it.id, "context": it.context, "choices": it.choices, "label": it.label}
        for it in items
    ]
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return path


# ----------------------------------------------------------------------------- requests


@dataclass
class _Encoded:
    """Requests sharing one context: choices `first..first+len(continuations)` of item `index`."""

    index: int
    first: int
    context: list[int]
    continuations: list[list[int]]


def encode_request(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HF model builds them (see module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx) :]
    if not context:
        ctx = [tok.eot_id]
    return ctx, cont


def _encode_item(
    tok: Tokenizer, item: MCItem, index: int, delimiter: str, context_length: int
) -> list[_Encoded]:
    """One shared-context request group per item, or one per choice where truncation bites.

    lm-eval keeps the last `context_length + 1` tokens of each (context + choice)
    request, so when that cuts the context, choices of different lengths see
    different contexts and cannot share one.
    """
    pairs = [encode_request(tok, item.context, delimiter + c) for c in item.choices]
    ctx = pairs[0][0]  # encode(context): the same for every choice
    conts = [p[1] for p in pairs]
    for j, c in enumerate(conts):
        if len(c) > context_length:
            raise ValueError(
                f"item {item.id or index}: choice {j} has {len(c)} tokens, more than the "
                f"context of {context_length}"
            )
    if len(ctx) + max(len(c) for c in conts) <= context_length + 1:
        return [_Encoded(index, 0, ctx, conts)]
    return [
        _Encoded(index, j, ctx[-(context_length + 1 - len(c)) :], [c]) for j, c in enumerate(conts)
    ]


# ----------------------------------------------------------------------------- scoring


def _groups(encoded: list[_Encoded], max_tokens: int) -> Iterator[list[_Encoded]]:
    """Items with equal context length, batched so their contexts stay within the token budget."""
    by_len: dict[int, list[_Encoded]] = defaultdict(list)
    for e in encoded:
        by_len[len(e.context)].append(e)
    for ctx_len in sorted(by_len, reverse=True):
        group = by_len[ctx_len]
        per_batch = max(1, max_tokens // ctx_len)
        for start in range(0, len(group), per_batch):
            yield group[start : start + per_batch]


# A continuation joins a batch only if at least this long relative to the batch's longest:
# fewer, larger batches against less padding. Swept on 200 HellaSwag items (1 CPU
# thread, 5.4M-parameter model): 0 (one batch per context length) 18.8 s, 0.5 12.4 s,
# 0.7 14.5 s, 0.85 16.8 s.
PAD_RATIO = 0.5


@torch.no_grad()
def _score_group(
    model: nn.Module, batch: list[_Encoded], pad_id: int, max_tokens: int, device: torch.device
) -> list[list[float]]:
    """Summed log-likelihood of every continuation of every item in `batch` (same context length).

    The contexts run once, as one batch, filling a KV cache. Each (item, choice)
    row then continues from a copy of its item's cache rows; rows are sorted by
    continuation length and batched within the token budget, so little is padded.
    """
    ctx = torch.tensor([e.context for e in batch], device=device)  # (B, Tc)
    B, Tc = ctx.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(model.cfg, B, Tc, device, dtype)  # type: ignore[arg-type]
    # The context's last logits predict every choice's first token.
    first = F.log_softmax(model(ctx, cache=cache)[:, -1].float(), dim=-1)  # (B, V)
    rows = [(b, j, c) for b, e in enumerate(batch) for j, c in enumerate(e.continuations)]
    rows.sort(key=lambda r: -len(r[2]))
    scores = [[0.0] * len(e.continuations) for e in batch]
    start = 0
    while start < len(rows):
        width = len(rows[start][2])  # longest continuation of this chunk (rows sorted)
        end = start + 1
        # Close the chunk at the token budget, or where a row would be mostly padding.
        while (
            end < len(rows)
            and (end - start + 1) * width <= max_tokens
            and len(rows[end][2]) >= PAD_RATIO * width
        ):
            end += 1
        chunk = rows[start:end]
        start = end
        item = torch.tensor([r[0] for r in chunk], device=device)
        x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for i, (_b, _j, c) in enumerate(chunk):
            x[i, : len(c)] = torch.tensor(c)
        x = x.to(device)
        logp = first[item].gather(-1, x[:, :1])  # (R, 1)
        if width > 1:
            # A continuation's last token is only a target, never an input: Tc + width - 1.
            rows_cache = KVCache.empty(model.cfg, len(chunk), Tc + width - 1, device, dtype)  # type: ignore[arg-type]
            for layer in range(len(cache.keys)):
                rows_cache.keys[layer][:, :, :Tc] = cache.keys[layer][item]
                rows_cache.values[layer][:, :, :Tc] = cache.values[layer][item]
            rows_cache.length = Tc
            # Output at continuation position j - 1 predicts continuation token j.
            out = F.log_softmax(model(x[:, :-1], cache=rows_cache).float(), dim=-1)
            logp = torch.cat([logp, out.gather(-1, x[:, 1:, None]).squeeze(-1)], dim=1)
        lengths = torch.tensor([len(r[2]) for r in chunk], device=device)
        valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
        sums = logp.masked_fill(~valid, 0.0).sum(dim=1).double().cpu().tolist()
        for (b, j, _c), total in zip(chunk, sums, strict=True):
            scores[b][j] = total
    return scores


def score_items(
    model: nn.Module,
    tok: Tokenizer,
    items: list[MCItem],
    delimiter: str = " ",
    max_batch_tokens: int = 16384,
    device: str | torch.device | None = None,
) -> MCResult:
    """Log-likelihood of every choice of every item; see the module docstring."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError("score_items needs an lmforge Transformer (model.cfg)")
    if cfg.objective != "causal":
        raise ValueError("multiple-choice scoring needs a causal model (model.objective = causal)")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    encoded = [
        enc
        for i, it in enumerate(items)
        for enc in _encode_item(tok, it, i, delimiter, cfg.context_length)
    ]
    lls: list[list[float]] = [[0.0] * len(it.choices) for it in items]
    was_training = model.training
    model.eval()
    try:
        for batch in _groups(encoded, max_batch_tokens):
            for e, scores in zip(
                batch, _score_group(model, batch, tok.pad_id, max_batch_tokens, device), strict=True
            ):
                lls[e.index][e.first : e.first + len(scores)] = scores
    finally:
        model.train(was_training)
    return MCResult(
        loglikelihoods=lls,
        labels=[it.label for it in items],
        choices=[list(it.choices) for it in items],
    )


@torch.no_grad()
def score_items_reference(
    model: nn.Module, tok: Tokenizer, items: list[MCItem], delimiter: str = " "
) -> MCResult:
    """One forward pass per (item, choice), no cache and no batching: the slow, obvious way.

    Kept as the reference the fast path is tested against, and as the baseline of
    `benchmarks/eval_speed.py`.
    """
    ctx_len = context_length_of(model)
    device = next(model.parameters()).device
    lls = []
    for it in items:
        row = []
        for c in it.choices:
            ctx, cont = encode_request(tok, it.context, delimiter + c)
            seq = (ctx + cont)[-(ctx_len + 1) :]
            x = torch.tensor([seq[:-1]], device=device)
            logp = F.log_softmax(model(x).float()[0, -len(cont) :], dim=-1)
            row.append(float(logp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum()))
        lls.append(row)
    return MCResult(lls, [it.label for it in items], [list(it.choices) for it in items])
