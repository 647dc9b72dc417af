"""The masked-LM objective: BERT-style corruption of token windows, and pseudo-perplexity.

A model with ``objective: masked`` attends in both directions (see
`lmforge.model.transformer`), so predicting the next token would be trivial. It
learns instead to fill in corrupted positions (Devlin et al. 2019, §3.1):

- 15% of the (non-special) positions of each window are selected;
- of those, 80% become ``<|mask|>``, 10% a uniformly random ordinary token, and
  10% keep their token;
- the loss is cross-entropy on the selected positions only (targets -100 elsewhere).

The corruption of window ``g`` of the run is drawn from ``(seed, g)`` alone, where
``g`` is the loader's global sample index. So, like `shards.TokenLoader`, a resumed
run sees exactly the batches an uninterrupted one would, and the masks do not
depend on the world size.

Validation loss is the same masked cross-entropy on the loader's sequential
validation windows, with masks drawn from ``(seed, VALIDATION, window)``: fixed
across evaluations, so the curve is comparable from step to step. Its
exponential is not a perplexity of the text; for that use
:func:`pseudo_perplexity` (Salazar et al. 2020): mask each position in turn,
score the true token given everything else, and average over positions:
``PPPL = exp(-(1/N) Σ_t log P(w_t | W without t))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.shards import SampleBatches, TokenLoader, TokenStream
from lmforge.tokenizer import Tokenizer

MASK_PROB = 0.15  # Devlin et al. 2019: 15% of positions are prediction targets
MASK_TOKEN_FRACTION = 0.8  # of those, 80% → <|mask|>
RANDOM_TOKEN_FRACTION = 0.1  # 10% → a random token; the remaining 10% stay unchanged
_VALIDATION = 1  # a separate RNG stream for validation masks


def mask_window(
    tokens: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    ordinary_ids: np.ndarray,
    mask_prob: float = MASK_PROB,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt one window of token ids (T,); returns (inputs, targets), targets -100 where unscored.

    Special tokens (end-of-text, pad, ...) are never selected, as BERT never
    selects [CLS] or [SEP]. At least one position is selected when any is
    eligible, so every window contributes to the loss.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    eligible = np.isin(tokens, ordinary_ids)
    selected = (rng.random(tokens.shape) < mask_prob) & eligible
    if not selected.any() and eligible.any():
        selected[rng.choice(np.flatnonzero(eligible))] = True
    action = rng.random(tokens.shape)  # < 0.8 mask; < 0.9 random; else keep
    random_ids = ordinary_ids[rng.integers(0, ordinary_ids.size, size=tokens.shape)]
    inputs = tokens.copy()
    to_mask = selected & (action < MASK_TOKEN_FRACTION)
    to_random = (
        selected
        & (action >= MASK_TOKEN_FRACTION)
        & (action < MASK_TOKEN_FRACTION + RANDOM_TOKEN_FRACTION)
    )
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids[to_random]
    targets = np.where(selected, tokens, -100)
    return inputs, targets


def ordinary_token_ids(tok: Tokenizer) -> np.ndarray:
    """Every id that is not a special token: the candidates for masking and random replacement."""
    special = set(tok.specials.values())
    return np.array([i for i in range(tok.vocab_size) if i not in special], dtype=np.int64)


class MaskedBatches(SampleBatches):
    """Wraps a `TokenLoader` so its windows come out BERT-corrupted: a `BatchSource` for `Trainer`."""

    def __init__(
        self, loader: TokenLoader, tok: Tokenizer, seed: int, mask_prob: float = MASK_PROB
    ):
        self.loader = loader
        self.seed = seed
        self.mask_id = tok.mask_id
        self.ordinary = ordinary_token_ids(tok)
        self.mask_prob = mask_prob

    def samples(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The same global sample numbering as TokenLoader.batch, so masks follow the windows.
        xs, ys = [], []
        for g in range(first, first + n):
            window = self.loader.sample(g)[:-1]  # T tokens; no shift for a masked LM
            rng = np.random.Generator(np.random.PCG64([self.seed, g]))
            x, y = mask_window(window, rng, self.mask_id, self.ordinary, self.mask_prob)
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def validation(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Masked versions of `TokenLoader.sequential`, with masks fixed per window."""
        window = 0
        for x, _y in self.loader.sequential(n_tokens, batch_size):
            xs, ys = [], []
            for row in x.numpy():
                rng = np.random.Generator(np.random.PCG64([self.seed, _VALIDATION, window]))
                xi, yi = mask_window(row, rng, self.mask_id, self.ordinary, self.mask_prob)
                xs.append(xi)
                ys.append(yi)
                window += 1
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


@torch.no_grad()
def pseudo_log_likelihoods(
    model: nn.Module,
    tokens: torch.Tensor,
    mask_id: int,
    score: torch.Tensor | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """log P(w_t | W without t) for every position t of one sequence `tokens` (T,).

    Builds T copies of the sequence, copy t with position t replaced by the mask
    token (Salazar et al. 2020), and reads the log-probability of the true token
    there. `score` (T,) bool limits the positions scored (others return NaN).
    """
    T = tokens.numel()
    positions = torch.arange(T) if score is None else torch.nonzero(score).flatten()
    out = torch.full((T,), float("nan"))
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    for i in range(0, positions.numel(), batch_size):
        pos = positions[i : i + batch_size].to(device)
        x = tokens.expand(pos.numel(), T).clone()  # (n, T)
        rows = torch.arange(pos.numel(), device=device)
        x[rows, pos] = mask_id
        logits = model(x)  # (n, T, V)
        logp = torch.log_softmax(logits[rows, pos].float(), dim=-1)  # (n, V)
        out[pos.cpu()] = logp[rows, tokens[pos]].cpu()
    return out


@torch.no_grad()
def pseudo_perplexity(
    model: nn.Module,
    windows: Iterable[torch.Tensor],
    mask_id: int,
    ordinary_ids: np.ndarray | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Pseudo-perplexity of a masked LM over token windows (each (T,)).

    Special tokens are not scored when `ordinary_ids` is given (they are never
    masking targets in training). Returns ``pppl``, ``pll_per_token`` (mean
    natural-log pseudo-log-likelihood) and the number of positions scored.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    allowed = torch.from_numpy(ordinary_ids) if ordinary_ids is not None else None
    for window in windows:
        window = torch.as_tensor(window, dtype=torch.long)
        score = torch.isin(window, allowed) if allowed is not None else None
        pll = pseudo_log_likelihoods(model, window, mask_id, score, batch_size)
        pll = pll[~torch.isnan(pll)]
        total += float(pll.sum())
        count += pll.numel()
    model.train(was_training)
    mean = total / max(count, 1)
    return {"pppl": math.exp(-mean), "pll_per_token": mean, "pppl_tokens": float(count)}


def unigram_perplexity(
    stream: TokenStream, vocab_size: int, ids: np.ndarray | None = None
) -> float:
    """exp(entropy) of the split's token distribution (restricted to `ids` when given).

    The perplexity of a model that knows the exact unigram frequencies and
    ignores context: the baseline any masked LM must beat.
    """
    counts = stream.counts(vocab_size).astype(np.float64)
    if ids is not None:
        counts = counts[ids]
    p = counts[counts > 0] / counts.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def masked_sources(
    train: TokenLoader,
    val: TokenLoader,
    tok: Tokenizer,
    seed: int,
    eval_tokens: int,
    micro_batch_size: int,
    pppl_windows: int = 4,
) -> tuple[
    MaskedBatches,
    Callable[[], Iterable[Any]],
    list[Callable[[nn.Module, int], dict[str, float]]],
    float,
]:
    """Everything `pretrain` needs for a masked LM: train batches, validation batches,
    an eval hook that reports pseudo-perplexity on the first `pppl_windows`
    validation windows, and the unigram perplexity baseline of the validation split.
    """
    train_batches = MaskedBatches(train, tok, seed)
    val_batches = MaskedBatches(val, tok, seed)
    ordinary = ordinary_token_ids(tok)
    n = min(pppl_windows, val.n_windows)
    windows = [torch.from_numpy(val.stream.read(j * val.seq_len, val.seq_len)) for j in range(n)]

    def pppl_hook(model: nn.Module, step: int) -> dict[str, float]:
        return {"val_pppl": pseudo_perplexity(model, windows, tok.mask_id, ordinary)["pppl"]}

    baseline = unigram_perplexity(val.stream, tok.vocab_size, ordinary)
    return (
        train_batches,
        lambda: val_batches.validation(eval_tokens, micro_batch_size),
        [pppl_hook],
        baseline,
    )
