"""Generation metrics (BLEU, chrF, ROUGE) and batched generation with the KV cache.

The metrics are computed by the reference libraries themselves, never
re-implemented: sacrebleu for BLEU (Papineni et al. 2002) and chrF (Popović
2015), with sacrebleu's signature recorded so a figure can be reproduced
(Post 2018, "A Call for Clarity in Reporting BLEU Scores"); rouge-score (Google's
re-implementation of Lin 2004) for ROUGE-1/2/L/Lsum with the Porter stemmer.

ROUGE-Lsum treats newlines as sentence boundaries. rouge-score can split
sentences itself only with NLTK's punkt data (`split_summaries=True`), which is
not available offline, so `split_sentences` below puts one sentence per line
before scoring; texts that already have newlines keep them.

Generation batches prompts of equal token length through the core `generate`
(which takes a (B, T) tensor), so no padding and no attention mask are needed and
results equal generating each prompt alone.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.eval.intrinsic import context_length_of
from lmforge.model.generate import decode_text, generate
from lmforge.tokenizer import Tokenizer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class MetricValue:
    """One corpus-level figure with its uncertainty (a 95% interval or a standard error)."""

    name: str
    value: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None
    stderr: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- metrics


def _reference_streams(
    references: Sequence[Sequence[str]] | Sequence[str],
) -> list[list[str | None]]:
    """Per-hypothesis references → sacrebleu's reference streams (one list per reference slot).

    Every reference is used. A hypothesis with fewer references than the most has
    `None` in the streams it lacks, which sacrebleu skips for that segment (its
    documented way to score a variable number of references).
    """
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("BLEU/chrF need at least one reference per hypothesis")
    width = max((len(r) for r in refs), default=1)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def sacrebleu_score(
    name: str,
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]] | Sequence[str],
    n_bootstrap: int = 1000,
    **options: Any,
) -> MetricValue:
    """Corpus BLEU or chrF through sacrebleu, with its bootstrap 95% interval and signature.

    `options` go to `sacrebleu.metrics.BLEU`/`CHRF` (e.g. `tokenize="13a"`,
    `word_order=2` for chrF++). The point value is sacrebleu's corpus score.
    """
    from sacrebleu.metrics import BLEU, CHRF

    metrics = {"bleu": BLEU, "chrf": CHRF}
    if name not in metrics:
        raise ValueError(f"unknown sacrebleu metric {name!r} (known: bleu, chrf)")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    metric = metrics[name](**options)
    streams = _reference_streams(references)
    note = ""
    try:
        result = metric.corpus_score(list(hypotheses), streams, n_bootstrap=n_bootstrap)  # type: ignore[arg-type]
    except TypeError as exc:
        # sacrebleu 2.x mixes float and numpy float32 scores when some bootstrap resample
        # scores exactly 0 (tiny sets, near-empty outputs) and statistics.mean fails.
        note = f"no bootstrap interval (sacrebleu: {exc})"
        result = metric.corpus_score(list(hypotheses), streams)  # type: ignore[arg-type]
    out = MetricValue(name, float(result.score), len(hypotheses))
    if n_bootstrap > 1 and getattr(result, "_ci", None) is not None:
        # sacrebleu reports mean ± half-width of the 95% interval around the bootstrap mean.
        out.ci_low = float(result._mean - result._ci)
        out.ci_high = float(result._mean + result._ci)
    out.settings = {"signature": str(metric.get_signature()), "verbose": str(result)}
    if note:
        out.settings["note"] = note
    return out


def bleu(hypotheses, references, n_bootstrap: int = 1000, **options: Any) -> MetricValue:
    return sacrebleu_score("bleu", hypotheses, references, n_bootstrap, **options)


def chrf(hypotheses, references, n_bootstrap: int = 1000, **options: Any) -> MetricValue:
    return sacrebleu_score("chrf", hypotheses, references, n_bootstrap, **options)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> str:
    """One sentence per line (for ROUGE-Lsum): break after . ! ? followed by a capital or digit."""
    return "\n".join(
        s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()
    )


def rouge_scores(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]] | Sequence[str],
    rouge_types: Sequence[str] = ROUGE_TYPES,
    sentence_split: bool = True,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, MetricValue]:
    """Mean F1 × 100 of each ROUGE type over the examples (rouge-score, Porter stemmer).

    Several references per example take the best: for each ROUGE type, the
    reference with the highest F1 (rouge-score's `score_multi`, as rouge-score
    users do for multi-reference sets such as SciTLDR).
    The 95% interval is a percentile bootstrap over examples.
    """
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=True)
    prep = split_sentences if sentence_split else (lambda s: s)
    per_type: dict[str, list[float]] = {t: [] for t in rouge_types}
    for hyp, ref in zip(hypotheses, references, strict=True):
        refs = [ref] if isinstance(ref, str) else list(ref)
        scores = scorer.score_multi([prep(r) for r in refs], prep(hyp))
        for t in rouge_types:
            per_type[t].append(scores[t].fmeasure * 100)
    out = {}
    for t, values in per_type.items():
        mv = MetricValue(t, sum(values) / max(len(values), 1), len(values))
        if n_bootstrap > 1 and values:
            mv.ci_low, mv.ci_high = bootstrap_ci(values, n_bootstrap, seed)
        mv.settings = {
            "library": "rouge-score",
            "use_stemmer": True,
            "sentence_split": sentence_split,
            "aggregate": "mean F1 x100",
        }
        out[t] = mv
    return out


def bootstrap_ci(
    values: Sequence[float], n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993)."""
    x = torch.tensor(list(values), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (n_bootstrap, len(x)), generator=g)
    means = x[idx].mean(dim=1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- generation


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


@dataclass
class GenerationTask:
    """Prompts (token ids) with their references, and the metrics that score them."""

    name: str
    prompts: list[list[int]]
    references: list[list[str]]
    metrics: tuple[str, ...]  # among bleu, chrf, rouge
    sources: list[str] = field(default_factory=list)


def output_records(task: GenerationTask, hypotheses: Sequence[str]) -> list[dict[str, Any]]:
    """One record per example, as saved beside eval.json: source, references, hypothesis."""
    sources = task.sources or [""] * len(hypotheses)
    return [
        {"index": i, "source": src, "references": refs, "hypothesis": hyp}
        for i, (src, refs, hyp) in enumerate(zip(sources, task.references, hypotheses, strict=True))
    ]


def finetune_task(
    tok: Tokenizer, task_name: str, spec: str, limit: int = 0, num_fewshot: int = 0, seed: int = 0
) -> GenerationTask:
    """Prompts in the chat format the fine-tuning task trains on, ending with '<|assistant|>'.

    Uses `lmforge.finetune.tasks` (the same record → turns mapping as training),
    so the model sees exactly the prompt layout it was fine-tuned on. Every gold
    target of a record is kept as a reference (SciTLDR has several per paper).
    With `num_fewshot` k, k other records of the set (`eval.tasks.fewshot_indices`)
    come first as solved exchanges: earlier turns of the same conversation.
    """
    from lmforge.eval.tasks import fewshot_indices
    from lmforge.finetune.tasks import get_task, prompt_ids, read_records

    task = get_task(task_name)
    metric = {"bleu": ("bleu", "chrf"), "rouge": ("rouge",)}.get(task.metric)
    if metric is None:
        raise ValueError(f"task {task_name!r} is not a generation task (metric {task.metric})")
    records = list(read_records(spec, limit=limit))
    conversations = [task.to_turns(rec) for rec in records]
    prompts, refs, sources = [], [], []
    for i, (rec, turns) in enumerate(zip(records, conversations, strict=True)):
        question = [t for t in turns if t[0] != "assistant"]
        shots = fewshot_indices(len(records), i, num_fewshot, seed)
        solved = [t for j in shots for t in conversations[j] if t[0] != "system"]
        prompts.append(prompt_ids(tok, solved + question))
        target = rec.data.get("target")
        if isinstance(target, list) and all(isinstance(t, str) for t in target) and target:
            refs.append([t.strip() for t in target])
        else:
            refs.append([task.reference(rec) if task.reference else turns[-1][1]])
        sources.append(question[-1][1])
    if not prompts:
        raise ValueError(f"{spec}: no records")
    return GenerationTask(task_name, prompts, refs, metric, sources)


def evaluate_generation(
    model: nn.Module,
    tok: Tokenizer,
    task: GenerationTask,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[list[MetricValue], list[str]]:
    """Generate for every prompt and score; returns the metrics and the generated texts."""
    from lmforge.tokenizer import END

    stop = [tok.eot_id, tok.specials[END]]
    new = generate_batch(
        model, task.prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, batch_size
    )
    hyps = [decode_text(tok, ids).strip() for ids in new]
    metrics: list[MetricValue] = []
    settings = {
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy" if temperature <= 0 else "sampled",
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
    }
    for name in ("bleu", "chrf"):
        if name in task.metrics:  # every reference of every example (`_reference_streams`)
            mv = sacrebleu_score(name, hyps, task.references)
            mv.settings.update(settings)
            metrics.append(mv)
    if "rouge" in task.metrics:
        for mv in rouge_scores(hyps, task.references).values():
            mv.settings.update(settings)
            metrics.append(mv)
    return metrics, hyps
