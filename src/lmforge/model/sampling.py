"""Sampling options, and the one function that turns logits into the next token.

Every caller (the CLI's `generate` and `chat`, the run's samples, evaluation,
the web app) describes how to sample with one `SamplingParams` and goes through
`process_logits` / `sample_next`. The filters apply in the order of HF
`generate` (so the same settings mean the same distribution there and here):

1. repetition penalty over every token already in the prompt or the output
   (CTRL, Keskar et al. 2019): a positive logit is divided by the penalty, a
   negative one multiplied, so a penalty > 1 always makes a seen token less likely;
2. temperature;
3. top-k;
4. top-p, the nucleus of mass p (Holtzman et al. 2020);
5. min-p: drop tokens less likely than `min_p` × the most likely one
   (Nguyen et al. 2024, "Min P Sampling").

Each filter keeps at least the most likely token. Temperature 0 is greedy (the
repetition penalty still applies, as in HF). Seeded sampling draws from one
`torch.Generator` per batch row, never from the global RNG, so a prompt gives
the same text alone or inside a batch, and a request never disturbs another.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads on first use: the CLI's parser builds without it
    import torch

# name → (check, what the value must be); checked in one place for the CLI, the web app and Python.
RANGES: dict[str, tuple[Any, str]] = {
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v >= 0, ">= 0 (0 is greedy)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 keeps every token)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1 is no penalty)"),
}


@dataclass(frozen=True)
class SamplingParams:
    """How to sample a continuation; the defaults sample plainly from the model."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()  # texts that end the reply (cut from the returned text)
    stop_ids: tuple[int, ...] = ()  # token ids that end the reply (end-of-text, end-of-turn)
    seed: int | None = None  # None: a fresh random seed per request

    def __post_init__(self) -> None:
        # Lists from YAML, JSON or argparse become tuples: the object stays hashable.
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        for name, (ok, what) in RANGES.items():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"sampling: {name} = {value!r} must be {what}")

    def with_stop_ids(self, ids: Sequence[int]) -> SamplingParams:
        """These params with `ids` added to the stop ids (order kept, no duplicates)."""
        return replace(self, stop_ids=tuple(dict.fromkeys([*self.stop_ids, *ids])))


# `lmforge chat`'s defaults (turn n of a conversation uses seed + n).
CHAT_DEFAULTS = SamplingParams(max_new_tokens=200, temperature=0.7, top_p=0.9, seed=0)


def sampling_params(
    params: SamplingParams | None = None, max_new_tokens: int | None = None, **options: Any
) -> SamplingParams:
    """`params` (or the defaults) with `max_new_tokens` and keyword `options` replacing fields."""
    known = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown sampling options {unknown} (known: {sorted(known)})")
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    return replace(params or SamplingParams(), **options)


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, V) logits → fp32 logits with filtered tokens at -inf, in HF `generate`'s order.

    `seen` is a (B, V) bool mask of the tokens already in each row (prompt and
    output), for the repetition penalty.
    """
    import torch

    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        rp = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * rp, logits / rp), logits)
    if params.temperature <= 0:
        return logits
    logits = logits / params.temperature
    vocab = logits.size(-1)
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # Ascending order: drop the low tail whose whole mass is at most 1 - top_p (the
        # most likely token always stays). Written as HF does, so masks agree exactly.
        sorted_logits, order = torch.sort(logits, dim=-1)
        tail = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - params.top_p
        tail[:, -1] = False
        logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        drop = probs < params.min_p * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def row_generators(
    batch: int, seed: int | None, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per row: row r draws from seed + r (a fresh random seed when None)."""
    import torch

    gens = []
    for r in range(batch):
        g = torch.Generator(device=device)
        if seed is None:
            g.seed()  # from the OS, not from (and not advancing) the global RNG
        else:
            g.manual_seed(seed + r)
        gens.append(g)
    return gens


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """(B, V) logits → (B,) next token ids: greedy at temperature 0, else one draw per row."""
    import torch

    logits = process_logits(logits, params, seen)
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if generators is None:
        generators = row_generators(probs.size(0), params.seed, probs.device)
    draws = [
        torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)
    ]  # per row, so a row's draw never depends on the other rows of the batch
    return torch.cat(draws)


def seen_mask(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T) ids → (B, V) bool mask of the tokens present in each row."""
    import torch

    mask = torch.zeros(ids.size(0), vocab_size, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids.long(), True)


def add_sampling_arguments(parser: argparse.ArgumentParser, defaults: SamplingParams) -> None:
    """The sampling flags of `lmforge generate` and `lmforge chat`, with their defaults."""
    g = parser.add_argument_group("sampling")
    d = defaults
    g.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        type=int,
        default=d.max_new_tokens,
        help="the longest reply, in tokens (default %(default)s)",
    )
    g.add_argument(
        "--temperature", type=float, default=d.temperature, help="0 = greedy (default %(default)s)"
    )
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 = off (default %(default)s)")
    g.add_argument(
        "--top-p", type=float, default=d.top_p, help="nucleus mass; 1 = off (default %(default)s)"
    )
    g.add_argument(
        "--min-p",
        type=float,
        default=d.min_p,
        help="drop tokens below min-p × the top one (default %(default)s)",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=d.repetition_penalty,
        help="> 1 discourages repeats; 1 = off (default %(default)s)",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop text (\\n = newline); repeatable",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"same seed, same text (default {'random' if d.seed is None else d.seed})",
    )


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """`SamplingParams` from the flags of `add_sampling_arguments`; a bad value names its flag."""
    values = {
        name: getattr(args, name)
        for name in (
            "max_new_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "seed",
        )
    }
    for name, (ok, what) in RANGES.items():
        if not ok(values[name]):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {values[name]} must be {what}")
    # A shell passes "\n" as two characters: read it (and "\t") as the writer meant it.
    stop = tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop or ())
    return SamplingParams(**values, stop=stop)
