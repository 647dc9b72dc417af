"""Packed fine-tuning batches, deterministic from (seed, step, rank).

Short examples are packed greedily into rows of ``seq_len + 1`` tokens (in an
order shuffled once from the seed); each example ends with the end-of-text token.
`PackedLM` derives per-token example ids from those end-of-text tokens and hands
them to `Transformer.forward(doc_ids=...)`, which blocks attention across
examples and restarts positions, so a packed row trains exactly as the examples
would one by one (tested) at a fraction of the padding.

Targets are -100 wherever the loss is masked: prompts, role tokens, the
end-of-text separators, and the padding at the end of a row.

Row ``g`` of the run (``g = step · global_batch + ...``, as in `shards.TokenLoader`)
lies in epoch ``g // n_rows``; each epoch visits every row once in an order drawn
from ``(seed, epoch)``. A resumed run therefore sees the batches an uninterrupted
one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from lmforge.finetune.tasks import Example
from lmforge.shards import EpochOrder, SampleBatches

IGNORE = -100


def pack_examples(
    examples: list[Example], seq_len: int, pad_id: int, seed: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of (ids, labels), each (n_rows, seq_len + 1), and how many examples were truncated.

    labels[t] = ids[t] where the loss applies, else -100; targets are labels shifted by one.
    """
    width = seq_len + 1
    order = np.arange(len(examples))
    if shuffle:
        order = np.random.Generator(np.random.PCG64([seed, 7919])).permutation(len(examples))
    rows_ids: list[list[int]] = []
    rows_lab: list[list[int]] = []
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    truncated = 0
    for k in order:
        ex = examples[int(k)]
        ids, trained = ex.ids, ex.trained
        if len(ids) > width:
            truncated += 1
            ids, trained = truncate_example(ex, width)
        if cur_ids and len(cur_ids) + len(ids) > width:
            rows_ids.append(cur_ids)
            rows_lab.append(cur_lab)
            cur_ids, cur_lab = [], []
        cur_ids = cur_ids + ids
        cur_lab = cur_lab + [i if t else IGNORE for i, t in zip(ids, trained, strict=True)]
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_lab.append(cur_lab)
    ids_arr = np.full((len(rows_ids), width), pad_id, dtype=np.int64)
    lab_arr = np.full((len(rows_ids), width), IGNORE, dtype=np.int64)
    for r, (ids, lab) in enumerate(zip(rows_ids, rows_lab, strict=True)):
        ids_arr[r, : len(ids)] = ids
        lab_arr[r, : len(lab)] = lab
    return ids_arr, lab_arr, truncated


def truncate_example(ex: Example, width: int) -> tuple[list[int], list[bool]]:
    """Cut an example to `width` tokens, shortening the prompt's last turn before the response.

    The response (what the loss is on) and the turn markers around it stay whole when
    they fit; otherwise, and for plain text, the end is cut (keeping the end-of-text).
    """
    ids, trained = ex.ids, ex.trained
    over = len(ids) - width
    # prompt_len counts through '<|assistant|>'; the two tokens before it are '<|end|><|assistant|>'.
    keep_prompt = ex.prompt_len - 2 - over
    if ex.prompt_len >= 3 and keep_prompt >= 1:
        cut = slice(keep_prompt, ex.prompt_len - 2)
        return ids[: cut.start] + ids[cut.stop :], trained[: cut.start] + trained[cut.stop :]
    return ids[: width - 1] + ids[-1:], trained[: width - 1] + trained[-1:]


class PackedExamples(SampleBatches):
    """A `BatchSource` for `Trainer`: deterministic (x, y) micro-batches of packed rows."""

    def __init__(
        self,
        examples: list[Example],
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if not examples:
            raise ValueError("no fine-tuning examples to train on")
        self.seq_len, self.seed = seq_len, seed
        self.ids, self.labels, self.truncated = pack_examples(
            examples, seq_len, pad_id, seed, shuffle
        )
        self.n_rows = len(self.ids)
        self.n_examples = len(examples)
        self.n_target_tokens = int((self.labels != IGNORE).sum())
        self._row = EpochOrder(self.n_rows, seed)

    def _rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self.ids[rows])
        labels = torch.from_numpy(self.labels[rows])
        return ids[:, :-1], labels[:, 1:]

    def samples(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows([self._row(first + i) for i in range(n)])

    def sequential(
        self, batch_size: int, max_tokens: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rows in order (validation): all, or the first `max_tokens` worth."""
        n = self.n_rows if not max_tokens else max(1, min(self.n_rows, max_tokens // self.seq_len))
        for i in range(0, n, batch_size):
            yield self._rows(list(range(i, min(i + batch_size, n))))

    @property
    def epoch_steps_tokens(self) -> int:
        return self.n_rows * self.seq_len


def doc_ids_from_eot(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) example ids: each example runs up to and including its end-of-text token."""
    ends = (idx == eot_id).long()
    return torch.cumsum(ends, dim=1) - ends  # the end-of-text token belongs to its own example


class PackedLM(nn.Module):
    """Wraps a `Transformer` so `model(x, y)` keeps packed examples apart.

    The wrapped model sits at `.module`, so `train.checkpoint.unwrap` (and hence
    checkpoints) see the plain `Transformer` and its usual parameter names.
    """

    def __init__(self, module: nn.Module, eot_id: int):
        super().__init__()
        self.module = module
        self.eot_id = eot_id
        self.cfg = getattr(module, "cfg", None)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        if cache is not None:
            return self.module(idx, targets, cache)
        return self.module(idx, targets, doc_ids=doc_ids_from_eot(idx, self.eot_id))
