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
same token length run together as one batch: the contexts go through the model
filling a KV cache, the cache is repeated once per choice, and all the choices of
all those items run as a second batch on top of it (right-padded: pads after the
real tokens cannot change them under a causal mask). Groups are processed in
order of length, so batches are dense.

The generic task format is JSONL, one item a line:
`{"context": str, "choices": [str, ...], "label": int}` (optional "id").
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.eval.intrinsic import context_length_of
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
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


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
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ctx = hellaswag_preprocess(f"{rec['activity_label']}: {rec['ctx']}")
                choices = [hellaswag_preprocess(e) for e in rec["endings"]]
                label = int(rec["label"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: not a HellaSwag record ({exc!r})") from None
            items.append(MCItem(ctx, choices, label, str(rec.get("row", lineno - 1))))
            if limit and len(items) >= limit:
                break
    return items


def load_mc_jsonl(path: str | Path, limit: int = 0) -> list[MCItem]:
    """Items of the generic format; a bad line raises naming the file, line and field."""
    path = Path(path)
    items = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: malformed JSON ({exc.msg})") from None
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
                raise ValueError(
                    f"{where}: field 'label' = {label} is not in 0..{len(choices) - 1}"
                )
            items.append(MCItem(rec["context"], choices, label, str(rec.get("id", lineno))))
            if limit and len(items) >= limit:
                break
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def write_mc_jsonl(items: Iterable[MCItem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for it in items:
            rec = {"id": it.id, "context": it.context, "choices": it.choices, "label": it.label}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
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
    """Items with equal context length and choice count, longest first, batched by a token budget."""
    by_shape: dict[tuple[int, int], list[_Encoded]] = defaultdict(list)
    for e in encoded:
        by_shape[(len(e.context), len(e.continuations))].append(e)
    for (ctx_len, n_choices), group in sorted(by_shape.items(), key=lambda kv: -kv[0][0]):
        group.sort(key=lambda e: -max(len(c) for c in e.continuations))
        batch: list[_Encoded] = []
        width = 0  # padded width of the batch: its first (longest) item sets it
        for e in group:
            if not batch:
                width = ctx_len + max(len(c) for c in e.continuations)
            elif width * n_choices * (len(batch) + 1) > max_tokens:
                yield batch
                batch = []
                width = ctx_len + max(len(c) for c in e.continuations)
            batch.append(e)
        if batch:
            yield batch


@torch.no_grad()
def _score_group(
    model: nn.Module, batch: list[_Encoded], pad_id: int, device: torch.device
) -> list[list[float]]:
    """Summed log-likelihood of every continuation of every item in `batch` (same context length)."""
    n_choices = len(batch[0].continuations)
    ctx = torch.tensor([e.context for e in batch], device=device)  # (B, Tc)
    B, Tc = ctx.shape
    conts = [c for e in batch for c in e.continuations]
    Te = max(len(c) for c in conts)
    dtype = next(model.parameters()).dtype
    # The last token of a continuation is only a target, never an input: Tc + Te - 1 positions.
    cache = KVCache.empty(model.cfg, B, Tc + Te - 1, device, dtype)  # type: ignore[arg-type]
    last = model(ctx, cache=cache)[:, -1:].float()  # (B, 1, V): predicts each choice's first token
    x = torch.full((B * n_choices, Te), pad_id, dtype=torch.long)
    for r, c in enumerate(conts):
        x[r, : len(c)] = torch.tensor(c)
    x = x.to(device)
    logits = last.repeat_interleave(n_choices, dim=0)  # (B·n, 1, V)
    if Te > 1:
        # One cache row per (item, choice), sharing the item's context keys and values.
        big = KVCache(
            [k.repeat_interleave(n_choices, dim=0) for k in cache.keys],
            [v.repeat_interleave(n_choices, dim=0) for v in cache.values],
            length=cache.length,
        )
        # Continuation position j is predicted by the context's last logits (j = 0)
        # or by the output at continuation position j - 1.
        logits = torch.cat([logits, model(x[:, :-1], cache=big).float()], dim=1)  # (B·n, Te, V)
    logp = F.log_softmax(logits, dim=-1).gather(-1, x[..., None]).squeeze(-1)  # (B·n, Te)
    lengths = torch.tensor([len(c) for c in conts], device=device)
    valid = torch.arange(Te, device=device)[None, :] < lengths[:, None]
    sums = (logp * valid).sum(dim=1).double().cpu().tolist()
    return [sums[i * n_choices : (i + 1) * n_choices] for i in range(B)]


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
                batch, _score_group(model, batch, tok.pad_id, device), strict=True
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
