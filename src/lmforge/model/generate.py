"""Sampling from a model: temperature, top-k, top-p, stop tokens, streaming, KV cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.model.decode import Decoder
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

    A (B, T) tensor is a batch of equal-length prompts, continued together.
    Rows that emit a stop id keep emitting it until every row has stopped.
    `on_token` receives each new (B,) column as it is produced (streaming).
    With `use_cache`, keys and values are kept per layer and each step feeds one
    token (through `Decoder`'s one-token forward for a plain model); the result
    equals recomputing the whole sequence every step. When the sequence would
    outgrow the context, it falls back to recomputing over the last
    `context_length` tokens (a sliding window).
    """
    idx = prompt if isinstance(prompt, torch.Tensor) else torch.tensor([list(prompt)])
    if idx.dim() == 1:
        idx = idx[None]
    was_training = model.training
    model.eval()
    try:
        # inference_mode: no autograd bookkeeping at all (no version counters, no view
        # tracking), which matters at a hundred small ops per token.
        with torch.inference_mode():
            out = _generate(
                model,
                idx,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                seed,
                stop_ids,
                use_cache,
                on_token,
            )
    finally:
        model.train(was_training)
    return out.clone()  # an ordinary tensor: callers may modify it or use it in autograd


def _generate(
    model: Transformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop_ids: Sequence[int],
    use_cache: bool,
    on_token: Callable[[torch.Tensor], None] | None,
) -> torch.Tensor:
    device = next(model.parameters()).device
    idx = idx.to(device)
    B, T = idx.shape
    ctx = model.cfg.context_length
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(list(stop_ids), device=device, dtype=idx.dtype)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # Every id lands in one preallocated buffer: no concatenation per token.
    out = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=device)
    out[:, :T] = idx
    step: Callable[[torch.Tensor], torch.Tensor] | None = None
    if use_cache and T + max_new_tokens <= ctx:
        if Decoder.supports(model):
            decoder = Decoder(model, B, T + max_new_tokens)
            logits = decoder.prefill(idx)
            step = decoder.step
        else:  # a wrapped model or adapters: the general forward, same cache
            dtype = next(model.parameters()).dtype
            cache = KVCache.empty(model.cfg, B, T + max_new_tokens, device, dtype)
            logits = model(idx, cache=cache)[:, -1]

            def step(tokens: torch.Tensor) -> torch.Tensor:
                return model(tokens[:, None], cache=cache)[:, -1]
    else:
        logits = model(idx[:, -ctx:])[:, -1]
    n = T + max_new_tokens
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        if stop.numel():
            nxt = torch.where(done, stop[0], nxt)
            done |= torch.isin(nxt, stop)
        out[:, T + i] = nxt
        if on_token is not None:
            on_token(nxt)
        if stop.numel() and bool(done.all()):
            n = T + i + 1
            break
        if i + 1 < max_new_tokens:
            if step is not None:
                logits = step(nxt)
            else:
                logits = model(out[:, max(0, T + i + 1 - ctx) : T + i + 1])[:, -1]
    return out[:, :n]


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
