"""Sampling from a model: temperature, top-k, top-p, stop tokens, streaming, KV cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.model.transformer import KVCache, Transformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k and outside the nucleus of mass top_p (Holtzman et al. 2020)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, V) logits → (B,) token ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Continue `prompt` ((B, T) or a list of ids); returns (B, T + n) ids.

    Rows that emit a stop id keep emitting it until every row has stopped.
    `on_token` receives each new (B,) column as it is produced (streaming).
    With `use_cache`, keys and values are kept per layer and each step feeds one
    token; the result equals recomputing the whole sequence every step. When the
    sequence would outgrow the context, it falls back to recomputing over the
    last `context_length` tokens (a sliding window).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    idx = prompt if isinstance(prompt, torch.Tensor) else torch.tensor([list(prompt)])
    idx = idx.to(device)
    if idx.dim() == 1:
        idx = idx[None]
    ctx = model.cfg.context_length
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(list(stop_ids), device=device, dtype=idx.dtype)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=device)
    cache = None
    if use_cache and idx.size(1) + max_new_tokens <= ctx:
        dtype = next(model.parameters()).dtype
        cache = KVCache.empty(model.cfg, idx.size(0), idx.size(1) + max_new_tokens, device, dtype)
    logits = model(idx if cache is not None else idx[:, -ctx:], cache=cache)[:, -1]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        if stop.numel():
            nxt = torch.where(done, stop[0], nxt)
            done |= torch.isin(nxt, stop)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        if stop.numel() and bool(done.all()):
            break
        if i + 1 < max_new_tokens:
            if cache is not None:
                logits = model(nxt[:, None], cache=cache)[:, -1]
            else:
                logits = model(idx[:, -ctx:])[:, -1]
    model.train(was_training)
    return idx


class StreamDecoder:
    """Turns ids arriving one by one into text pieces, holding back incomplete UTF-8."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still arriving
            return ""
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece
