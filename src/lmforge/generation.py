"""Batched generation and sentence splitting, shared by evaluation and fine-tuning.

Both `lmforge.eval` and `lmforge.finetune` generate text from prompts (test
outputs, generation metrics, bias probes) and split text into sentences
(ROUGE-Lsum, the creative-writing task); this module sits below both so
neither imports the other for it.

Generation batches prompts of equal token length through the core `generate`
(which takes a (B, T) tensor), so no padding and no attention mask are needed and
results equal generating each prompt alone.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from lmforge.model.generate import generate


def context_length_of(model: nn.Module, context_length: int | None = None) -> int:
    """`context_length` if given, else the model's `cfg.context_length`."""
    if context_length:
        return context_length
    cfg = getattr(model, "cfg", None)
    if cfg is None or not getattr(cfg, "context_length", 0):
        raise ValueError("pass context_length: the model has no cfg.context_length")
    return int(cfg.context_length)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> str:
    """One sentence per line (for ROUGE-Lsum): break after . ! ? followed by a capital or digit."""
    return "\n".join(
        s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()
    )


def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = 0,
    stop_ids: Sequence[int] = (),
    batch_size: int = 32,
) -> list[list[int]]:
    """New token ids for each prompt (stop token and what follows removed).

    Prompts are grouped by token length and each group runs as (B, T) batches
    through `generate` with the KV cache; a prompt longer than the context keeps
    its last `context_length - max_new_tokens` tokens so the cache always fits.
    Greedy when `temperature` is 0; sampled otherwise, prompt i from seed + i, so a
    prompt's text does not depend on how the prompts were batched.
    """
    ctx = context_length_of(model)
    if max_new_tokens >= ctx:
        raise ValueError(f"max_new_tokens = {max_new_tokens} must be below the context ({ctx})")
    keep = ctx - max_new_tokens
    trimmed = [list(p)[-keep:] for p in prompts]
    if any(not p for p in trimmed):
        raise ValueError("every prompt needs at least one token")
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(trimmed):
        by_len[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    stops = set(stop_ids)
    for length in sorted(by_len, reverse=True):
        rows = by_len[length]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            x = torch.tensor([trimmed[i] for i in chunk])
            y = generate(
                model,  # type: ignore[arg-type]
                x,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                row_seeds=None if seed is None else [seed + i for i in chunk],
                stop_ids=list(stop_ids),
            )
            for r, i in enumerate(chunk):
                new = y[r, length:].tolist()
                cut = next((j for j, t in enumerate(new) if t in stops), len(new))
                out[i] = new[:cut]
    return out
