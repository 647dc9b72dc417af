"""Sampling from a model: the token loop with the KV cache, stop ids and stop strings, streaming.

`generate` is the token-level loop (a (B, T) batch in, (B, T + n) ids out);
`complete` is the text-level one that every user-facing caller goes through: it
stops at stop ids and at stop strings (found in the decoded text, so a stop
string split across tokens is caught), cuts the stop string from the text,
drops special tokens from it and streams each row's text as it grows. What to
sample is one `SamplingParams` (`lmforge.model.sampling`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.model.decode import Decoder
from lmforge.model.sampling import (
    SamplingParams,
    process_logits,
    row_generators,
    sample_next,
    sampling_params,
    seen_mask,
)
from lmforge.model.transformer import KVCache, Transformer

__all__ = [
    "Completion",
    "StreamDecoder",
    "complete",
    "decode_text",
    "filter_logits",
    "generate",
    "sample_next",
]

# Called with each new (B,) column; may return a (B,) bool tensor of rows the caller ends.
OnToken = Callable[[torch.Tensor], "torch.Tensor | None"]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k and outside the nucleus of mass top_p."""
    return process_logits(logits, SamplingParams(top_k=top_k, top_p=top_p))


def generate(
    model: Transformer,
    prompt: torch.Tensor | Sequence[int],
    max_new_tokens: int | None = None,
    *,
    params: SamplingParams | None = None,
    use_cache: bool = True,
    on_token: OnToken | None = None,
    row_seeds: Sequence[int] | None = None,
    **options: Any,
) -> torch.Tensor:
    """Continue `prompt` ((B, T) or a list of ids); returns (B, T + n) ids.

    Sampling follows `params` (a `SamplingParams`), with `max_new_tokens` and
    keyword options (`temperature=`, `top_k=`, `seed=`, `stop_ids=`, ...) replacing
    its fields. A (B, T) tensor is a batch of equal-length prompts, continued
    together; row r samples from its own generator seeded `seed + r` (or
    `row_seeds[r]`), so a row's text does not depend on the other rows.
    A row ends when it emits a stop id or when `on_token` (which receives each
    new (B,) column, for streaming) returns True for it; an ended row repeats the
    first stop id (0 without stop ids) until every row has ended.
    With `use_cache`, keys and values are kept per layer and each step feeds one
    token (through `Decoder`'s one-token forward for a plain model); the result
    equals recomputing the whole sequence every step. When the sequence would
    outgrow the context, it falls back to recomputing over the last
    `context_length` tokens (a sliding window).
    """
    p = sampling_params(params, max_new_tokens, **options)
    idx = prompt if isinstance(prompt, torch.Tensor) else torch.tensor([list(prompt)])
    if idx.dim() == 1:
        idx = idx[None]
    was_training = model.training
    model.eval()
    try:
        # inference_mode: no autograd bookkeeping at all (no version counters, no view
        # tracking), which matters at a hundred small ops per token.
        with torch.inference_mode():
            out = _generate(model, idx, p, use_cache, on_token, row_seeds)
    finally:
        model.train(was_training)
    return out.clone()  # an ordinary tensor: callers may modify it or use it in autograd


def _first_logits(
    model: Transformer, idx: torch.Tensor, total: int, use_cache: bool
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
    """Logits after the prompt, and a one-token step function when the KV cache applies."""
    B = idx.size(0)
    ctx = model.cfg.context_length
    if not use_cache or total > ctx:
        return model(idx[:, -ctx:])[:, -1], None
    if Decoder.supports(model):
        decoder = Decoder(model, B, total)
        return decoder.prefill(idx), decoder.step
    # A wrapped model or adapters: the general forward, same cache.
    param = next(model.parameters())
    cache = KVCache.empty(model.cfg, B, total, param.device, param.dtype)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens[:, None], cache=cache)[:, -1]

    return model(idx, cache=cache)[:, -1], step


def _generate(
    model: Transformer,
    idx: torch.Tensor,
    p: SamplingParams,
    use_cache: bool,
    on_token: OnToken | None,
    row_seeds: Sequence[int] | None,
) -> torch.Tensor:
    device = next(model.parameters()).device
    idx = idx.to(device)
    B, T = idx.shape
    ctx = model.cfg.context_length
    if row_seeds is None:
        gens = row_generators(B, p.seed, device)
    else:
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in row_seeds]
    stop = torch.tensor(p.stop_ids, device=device, dtype=idx.dtype)
    fill = p.stop_ids[0] if p.stop_ids else 0
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # Every id lands in one preallocated buffer: no concatenation per token.
    out = torch.empty(B, T + p.max_new_tokens, dtype=idx.dtype, device=device)
    out[:, :T] = idx
    logits, step = _first_logits(model, idx, T + p.max_new_tokens, use_cache)
    seen = seen_mask(idx, logits.size(-1)) if p.repetition_penalty != 1.0 else None
    n = T + p.max_new_tokens
    for i in range(p.max_new_tokens):
        nxt = sample_next(logits, p, seen, gens)
        nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
        if stop.numel():
            done |= torch.isin(nxt, stop)
        out[:, T + i] = nxt
        if seen is not None:
            seen.scatter_(1, nxt[:, None].long(), True)
        if on_token is not None:
            ended = on_token(nxt)
            if ended is not None:
                done |= ended.to(device)
        if bool(done.all()):
            n = T + i + 1
            break
        if i + 1 < p.max_new_tokens:
            if step is not None:
                logits = step(nxt)
            else:
                logits = model(out[:, max(0, T + i + 1 - ctx) : T + i + 1])[:, -1]
    return out[:, :n]


class StreamDecoder:
    """Turns ids arriving one by one into text pieces.

    Holds back incomplete UTF-8, and any tail of the text that could be the start
    of a stop string, so a stop string never reaches the stream; `skip_ids`
    (special tokens) never reach the text. `stopped` turns True once a stop
    string has appeared; `text` is then everything before it.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        skip_ids: Iterable[int] = (),
        stops: Sequence[str] = (),
    ):
        self.decode = decode
        self.skip = set(skip_ids)
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped or token in self.skip:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still arriving
            return ""
        # A stop string can only end in the new text: search from where it could start.
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        hits = [k for k in (text.find(s, start) for s in self.stops) if k >= 0]
        self.text = text
        if hits:
            self.stopped = True
            self.text = text[: min(hits)]
            return self._emit(len(self.text))
        return self._emit(len(text) - self._held_back(text))

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        return max(
            (j for s in self.stops for j in range(len(s) - 1, 0, -1) if text.endswith(s[:j])),
            default=0,
        )

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def flush(self) -> str:
        """The text held back at the end (a stop string's start, an unfinished character)."""
        if not self.stopped and self.ids:
            self.text = self.decode(self.ids)
        return self._emit(len(self.text))


@dataclass
class Completion:
    """One row's result: its new ids (without the stop id) and its text.

    `finish_reason` is "stop_id" (it emitted `stop_id`: end-of-text, end-of-turn or
    another given id), "stop" (a stop string appeared) or "length".
    """

    ids: list[int]
    text: str  # special tokens removed, cut before a stop string
    finish_reason: str
    stop_id: int | None = None


def complete(
    model: Transformer,
    tok: Any,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    on_text: Callable[[int, str], object] | None = None,
) -> list[Completion]:
    """Sample a continuation of each (equal-length) prompt; `on_text(row, piece)` streams it.

    `tok` is the model's tokenizer (`decode` and `specials`): its special tokens
    are dropped from the text, and `params.stop` strings end a row as soon as they
    appear in its decoded text.
    """
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("complete() takes prompts of one token length; group them first")
    specials = set(tok.specials.values())
    streams = [StreamDecoder(tok.decode, specials, params.stop) for _ in prompts]
    rows = [Completion([], "", "length") for _ in prompts]
    ended = [False] * len(prompts)
    stop_ids = set(params.stop_ids)

    def on_token(col: torch.Tensor) -> torch.Tensor:
        for r, token in enumerate(col.tolist()):
            if ended[r]:
                continue
            if token in stop_ids:
                ended[r] = True
                rows[r].finish_reason, rows[r].stop_id = "stop_id", token
                continue
            rows[r].ids.append(token)
            piece = streams[r].push(token)
            if piece and on_text is not None:
                on_text(r, piece)
            if streams[r].stopped:
                ended[r] = True
                rows[r].finish_reason = "stop"
        return torch.tensor(ended)

    generate(model, torch.tensor([list(p) for p in prompts]), params=params, on_token=on_token)
    for r, stream in enumerate(streams):
        tail = stream.flush()
        if tail and on_text is not None:
            on_text(r, tail)
        rows[r].text = stream.text
    return rows


def decode_text(tok: Any, ids: Sequence[int]) -> str:
    """Ids → text without special tokens (what a reader of samples should see)."""
    specials = set(tok.specials.values())
    return tok.decode([t for t in ids if t not in specials])
