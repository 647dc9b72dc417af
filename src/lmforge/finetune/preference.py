"""Preference tuning: DPO (Rafailov et al. 2023) and SimPO (Meng et al. 2024).

Data: JSONL (or CSV / Parquet) records ``{prompt, chosen, rejected}`` with text fields,
or ``{chosen: [messages], rejected: [messages]}`` (optionally with ``prompt`` as a list
of messages too). Both answers are rendered through the chat template after the same
prompt; the log-probability of an answer is summed over its final assistant turn (its
content and closing ``<|end|>``), never over the prompt.

Each pair becomes two rows of ``seq_len + 1`` tokens (chosen, rejected), padded at the
end. A micro-batch of ``train.micro_batch_size`` rows holds half as many pairs (chosen
rows first), so tokens/s compares with plain training of the same model.

The losses, per pair, with policy log-probabilities π and reference ones ρ::

    DPO:    z = β((π_c − ρ_c) − (π_r − ρ_r))             rewards β(π − ρ)
    SimPO:  z = β(π_c/|c| − π_r/|r|) − γ                 rewards β π/|y|
    loss = −(1 − ε) log σ(z) − ε log σ(−z)               (ε = pref_label_smoothing)

DPO's reference log-probabilities are those of the starting model. They are computed
once, before training, in fp32 and eval mode, and cached in the run folder
(``ref_logps.safetensors``, keyed by a hash of the starting weights and the encoded
pairs): a resumed or repeated run reads them back, and training keeps no second copy of
the model. The batches carry them to the loss: the last column of the target tensor holds
each row's reference log-probability as the bit pattern of a float64 (`PairSource`), so
the shared training loop runs unchanged.

Logged with every training log line (metrics.jsonl): the loss, ``reward_acc`` (the share of
pairs whose chosen reward exceeds the rejected one), ``reward_chosen``, ``reward_rejected``
and ``reward_margin`` (means over the pairs since the last line); with each evaluation,
the same on the validation pairs (``val_reward_acc``, ...).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config, ConfigError
from lmforge.fileio import atomic_path, write_text_atomic
from lmforge.finetune.data import IGNORE, truncate_example
from lmforge.finetune.tasks import (
    ROLE_TOKENS,
    Example,
    Record,
    RecordError,
    Turns,
    encode_turns,
    read_records,
)
from lmforge.shards import EpochOrder, SampleBatches
from lmforge.tokenizer import Tokenizer
from lmforge.train.dist import all_reduce_sum
from lmforge.train.loop import Trainer

REF_CACHE = "ref_logps.safetensors"
STAT_NAMES = ("reward_acc", "reward_chosen", "reward_rejected", "reward_margin")


# ----------------------------------------------------------------------------- records


def _messages(rec: Record, key: str) -> Turns:
    value = rec.data[key]
    if not isinstance(value, list) or not value:
        raise RecordError(f"{rec.where()}: field '{key}' should be text or a list of messages")
    turns: Turns = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
            raise RecordError(f"{rec.where()}: {key}[{i}] needs 'role' and text 'content'")
        if m.get("role") not in ROLE_TOKENS:
            raise RecordError(
                f"{rec.where()}: {key}[{i}].role = {m.get('role')!r} is not one of "
                f"{sorted(ROLE_TOKENS)}"
            )
        turns.append((m["role"], m["content"]))
    return turns


def pair_turns(rec: Record) -> tuple[Turns, Turns]:
    """The chosen and the rejected conversation of a preference record."""
    for key in ("chosen", "rejected"):
        if rec.data.get(key) is None:
            raise RecordError(
                f"{rec.where()}: record has no field '{key}' (preference data needs "
                "prompt, chosen, rejected; or chosen and rejected message lists)"
            )
    prompt: Turns = []
    if isinstance(rec.data.get("prompt"), list):
        prompt = _messages(rec, "prompt")
    elif rec.data.get("prompt") is not None:
        prompt = [("user", rec.text("prompt"))]
    out = []
    for key in ("chosen", "rejected"):
        if isinstance(rec.data[key], list):
            turns = prompt + _messages(rec, key)
        elif not prompt:
            raise RecordError(f"{rec.where()}: record has no field 'prompt' for text '{key}'")
        else:
            # An empty answer (a model that stopped at once) is still an answer: its <|end|>.
            turns = [*prompt, ("assistant", rec.text(key, allow_empty=True))]
        if turns[-1][0] != "assistant":
            raise RecordError(f"{rec.where()}: '{key}' does not end with an assistant turn")
        out.append(turns)
    return out[0], out[1]


def encode_answer(tok: Tokenizer, turns: Turns) -> Example:
    """Ids of a conversation; only its final assistant turn (and that turn's <|end|>) trained."""
    ids, trained, prompt_len = encode_turns(tok, turns)
    trained = [t and i >= prompt_len for i, t in enumerate(trained)]
    return Example(ids, trained, prompt_len)


def load_pairs(tok: Tokenizer, specs: list[str], limit: int = 0) -> list[tuple[Example, Example]]:
    """(chosen, rejected) examples of every record of every file (file:line on a bad one)."""
    out: list[tuple[Example, Example]] = []
    for spec in specs:
        for rec in read_records(spec):
            chosen, rejected = pair_turns(rec)
            out.append((encode_answer(tok, chosen), encode_answer(tok, rejected)))
            if limit and len(out) >= limit:
                return out
    return out


# ----------------------------------------------------------------------------- batches


def _rows(examples: list[Example], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) arrays (n, width): one example a row, padded (labels -100) at the end."""
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    for r, ex in enumerate(examples):
        row, trained = (ex.ids, ex.trained) if len(ex.ids) <= width else truncate_example(ex, width)
        ids[r, : len(row)] = row
        labels[r, : len(row)] = [i if t else IGNORE for i, t in zip(row, trained, strict=True)]
    return ids, labels


class PairSource(SampleBatches):
    """A `BatchSource` of preference pairs, deterministic from (seed, step, rank).

    `batch` returns ``x`` (rows, seq_len) and ``y`` (rows, seq_len + 1): the targets
    (-100 where masked) and, in the last column, each row's reference log-probability
    as float64 bits. Pair ``g`` of the run lies in epoch ``g // n_pairs``; each epoch
    visits the pairs in an order drawn from (seed, epoch), so a resumed run sees the
    batches an uninterrupted one would.
    """

    rows_per_sample = 2  # a pair: its chosen and its rejected row

    def __init__(self, pairs: list[tuple[Example, Example]], seq_len: int, pad_id: int, seed=0):
        if not pairs:
            raise ValueError("no preference pairs to train on")
        width = seq_len + 1
        self.seq_len, self.seed, self.n_pairs = seq_len, seed, len(pairs)
        self.truncated = sum(len(e.ids) > width for p in pairs for e in p)
        c_ids, c_lab = _rows([c for c, _ in pairs], width, pad_id)
        r_ids, r_lab = _rows([r for _, r in pairs], width, pad_id)
        self.ids = np.stack([c_ids, r_ids], axis=1)  # (n_pairs, 2, width)
        self.labels = np.stack([c_lab, r_lab], axis=1)
        self.ref = np.zeros((self.n_pairs, 2), dtype=np.float64)  # filled by `reference_logps`
        self._pair = EpochOrder(self.n_pairs, seed)

    def rows(self, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x and y of `pairs`: all chosen rows, then all rejected rows."""
        ids = torch.from_numpy(self.ids[pairs].transpose(1, 0, 2).reshape(-1, self.seq_len + 1))
        lab = torch.from_numpy(self.labels[pairs].transpose(1, 0, 2).reshape(-1, self.seq_len + 1))
        ref = torch.from_numpy(np.ascontiguousarray(self.ref[pairs].T).reshape(-1, 1))
        return ids[:, :-1], torch.cat([lab[:, 1:], ref.view(torch.int64)], dim=1)

    def samples(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows([self._pair(first + i) for i in range(n)])

    def sequential(self, batch_pairs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.n_pairs, batch_pairs):
            yield self.rows(list(range(i, min(i + batch_pairs, self.n_pairs))))


# ----------------------------------------------------------------------------- the loss


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled tokens, and how many there are."""
    lp = -F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return lp.view(labels.shape).sum(1), (labels != IGNORE).sum(1)


@dataclass(frozen=True)
class PreferenceLoss:
    """DPO's or SimPO's loss on per-sequence log-probabilities (see the module docstring)."""

    objective: str = "dpo"
    beta: float = 0.1
    gamma: float = 0.0  # SimPO only
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> PreferenceLoss:
        fc = cfg.finetune
        beta = fc.dpo_beta if fc.objective == "dpo" else fc.simpo_beta
        return cls(fc.objective, beta, fc.simpo_gamma, fc.pref_label_smoothing)

    def __call__(self, logps, ref_logps, lengths):
        """(per-pair loss, chosen rewards, rejected rewards); inputs hold chosen rows first."""
        if self.objective == "dpo":
            rewards = self.beta * (logps - ref_logps)
            z_shift = 0.0
        else:
            rewards = self.beta * logps / lengths.clamp(min=1)
            z_shift = self.gamma
        chosen, rejected = rewards.chunk(2)
        z = chosen - rejected - z_shift
        eps = self.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return loss, chosen, rejected


class PreferenceLM(nn.Module):
    """Wraps a `Transformer` so that ``model(x, y)`` is the preference loss of a `PairSource`
    batch (mean over its pairs); ``model(x)`` is the plain model. Sums the reward statistics
    of what it sees, for training and evaluation apart, until `take_stats`.
    """

    def __init__(self, module: nn.Module, loss: PreferenceLoss):
        super().__init__()
        self.module = module
        self.loss = loss
        self.cfg = getattr(module, "cfg", None)
        self.stats: dict[bool, torch.Tensor] = {}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        if targets is None or cache is not None:
            return self.module(idx, targets, cache)
        labels = targets[:, :-1]
        ref = targets[:, -1].contiguous().view(torch.float64).float()
        logps, lengths = sequence_logps(self.module(idx), labels)
        loss, chosen, rejected = self.loss(logps, ref, lengths)
        with torch.no_grad():
            row = torch.stack(
                [
                    torch.tensor(float(len(loss)), device=loss.device),
                    (chosen > rejected).float().sum(),
                    chosen.sum(),
                    rejected.sum(),
                ]
            )
            self.stats[self.training] = self.stats.get(self.training, 0) + row
        return loss.mean()

    def take_stats(self, training: bool, prefix: str = "") -> dict[str, float]:
        """Means since the last call (summed over ranks); {} when nothing was seen."""
        row = self.stats.pop(training, None)
        if row is None:
            return {}
        n, acc, chosen, rejected = all_reduce_sum(row.clone()).tolist()
        n = max(n, 1.0)
        values = (acc / n, chosen / n, rejected / n, (chosen - rejected) / n)
        return {prefix + k: v for k, v in zip(STAT_NAMES, values, strict=True)}


# ----------------------------------------------------------------------------- reference


def cache_key(model: nn.Module, sources: list[PairSource]) -> str:
    """sha256 of the starting weights and the encoded pairs (ids and loss masks)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    for src in sources:
        h.update(src.ids.tobytes())
        h.update(src.labels.tobytes())
    return h.hexdigest()


@torch.no_grad()
def reference_logps(model: nn.Module, source: PairSource, batch_pairs: int) -> np.ndarray:
    """(n_pairs, 2) float64 log-probabilities of the chosen and rejected answers under `model`."""
    out = np.zeros((source.n_pairs, 2), dtype=np.float64)
    device = next(model.parameters()).device
    for i, (x, y) in enumerate(source.sequential(batch_pairs)):
        logps, _ = sequence_logps(model(x.to(device)), y[:, :-1].to(device))
        chosen, rejected = logps.double().cpu().chunk(2)
        out[i * batch_pairs : i * batch_pairs + len(chosen)] = torch.stack(
            [chosen, rejected], 1
        ).numpy()
    return out


def attach_reference(
    model: nn.Module, sources: dict[str, PairSource], run_dir: Path, batch_pairs: int, log=print
) -> bool:
    """Fill each source's `ref` from the run's cache, or compute (fp32, eval mode) and cache
    them. Returns whether the cache was used."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = run_dir / REF_CACHE
    key = cache_key(model, list(sources.values()))
    if path.exists():
        with safe_open(str(path), "np") as fh:
            stored = (fh.metadata() or {}).get("key")
        if stored == key:
            arrays = load_file(str(path))
            for name, src in sources.items():
                src.ref = arrays[name]
            log(f"reference log-probabilities: read from {path}")
            return True
        log(f"reference log-probabilities: {path} is for other weights or data; recomputing")
    was_training = model.training
    model.eval()
    for src in sources.values():
        src.ref = reference_logps(model, src, batch_pairs)
    model.train(was_training)
    with atomic_path(path) as tmp:
        refs = {name: src.ref for name, src in sources.items()}
        save_file(refs, str(tmp), metadata={"key": key})
    log(
        f"reference log-probabilities: computed for {sum(s.n_pairs for s in sources.values())} pairs"
    )
    return False


# ----------------------------------------------------------------------------- the trainer


class _MetricsWithRewards:
    """The loop's metrics log, with the reward statistics joined to each training record."""

    def __init__(self, log: Any, lm: PreferenceLM):
        self.log, self.lm = log, lm

    def write(self, record: dict[str, Any]) -> None:
        if "loss" in record:
            record = {**record, **self.lm.take_stats(training=True)}
        self.log.write(record)

    def truncate_after(self, step: int) -> None:
        self.log.truncate_after(step)


class PreferenceTrainer(Trainer):
    """`Trainer` whose logs and evaluations carry the reward statistics of a `PreferenceLM`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.metrics = _MetricsWithRewards(self.metrics, self._lm())  # type: ignore[assignment]

    def _lm(self) -> PreferenceLM:
        # The module that computes (under bf16-pure a copy of the master, under DDP wrapped).
        return next(m for m in self.train_model.modules() if isinstance(m, PreferenceLM))

    def evaluate(self) -> dict[str, float]:
        out = super().evaluate()
        out.update(self._lm().take_stats(training=False, prefix="val_"))
        return out


def check_config(cfg: Config) -> None:
    t = cfg.train
    if t.micro_batch_size % 2:
        raise ConfigError(
            f"train.micro_batch_size = {t.micro_batch_size} must be even for "
            f"finetune.objective = {cfg.finetune.objective}: each pair is two rows"
        )
    if not cfg.finetune.init and not cfg.tokenizer.path:
        raise ConfigError(
            f"finetune.objective = {cfg.finetune.objective} needs a model to start from: "
            "set finetune.init (--checkpoint) to a checkpoint, run folder or HF model folder"
        )


# ----------------------------------------------------------------------------- the stage


def finetune_preference(cfg: Config, run_dir: Path, resume: str = "") -> dict[str, Any]:
    """`finetune` for ``finetune.objective`` dpo / simpo (called by it after its setup)."""
    import json
    import time
    from dataclasses import replace

    from lmforge.finetune.start import load_start, prepare_model, resolve_spec, save_lora_outputs
    from lmforge.finetune.tasks import get_task
    from lmforge.train.dist import print0

    fc = cfg.finetune
    check_config(cfg)
    if not fc.train_files:
        raise ConfigError(f"finetune.train_files is empty (objective '{fc.objective}' needs pairs)")
    train_specs = [resolve_spec(s) for s in fc.train_files]
    model, tok, cfg = load_start(cfg, run_dir, train_specs, get_task("chat"))
    tok.save(run_dir / "tokenizer.json")
    t0 = time.perf_counter()
    seq_len, seed = cfg.model.context_length, cfg.train.seed
    sources = {
        "train": PairSource(
            load_pairs(tok, train_specs, fc.max_examples), seq_len, tok.pad_id, seed
        )
    }
    val_specs = [resolve_spec(s) for s in fc.val_files]
    if val_specs:
        sources["val"] = PairSource(
            load_pairs(tok, val_specs, fc.max_examples), seq_len, tok.pad_id, seed
        )
    pairs_per_micro = cfg.train.micro_batch_size // 2
    if fc.objective == "dpo":  # before LoRA: the reference is the starting model
        attach_reference(model, sources, run_dir, pairs_per_micro, log=print0)
    train, val = sources["train"], sources.get("val")
    print0(
        f"finetune {fc.objective}: {train.n_pairs:,} train / {val.n_pairs if val else 0:,} val "
        f"pairs of {seq_len} tokens ({train.truncated} answers truncated) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    info = prepare_model(model, cfg)
    cfg = replace(cfg, model=model.cfg)  # apply_lora may untie the head
    trainer = PreferenceTrainer(
        cfg,
        PreferenceLM(model, PreferenceLoss.from_config(cfg)),
        run_dir,
        train,
        val_data=(lambda: val.sequential(pairs_per_micro)) if val is not None else None,
        extra_files={"tokenizer.json": tok.to_json().encode("utf-8")},
    )
    summary = trainer.fit(resume=resume)
    summary.update(objective=fc.objective, train_pairs=train.n_pairs, **info)
    summary.pop("adapted", None)
    if not trainer.dist.is_main:
        return summary
    if fc.method == "lora":
        save_lora_outputs(model, trainer, cfg, tok, run_dir)
    summary["checkpoint"] = str(run_dir / "merged" if fc.method == "lora" else run_dir)
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary
