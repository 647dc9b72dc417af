"""Generation metrics (BLEU, chrF, ROUGE) and the generation tasks that use them.

The metrics are computed by the reference libraries themselves, never
re-implemented: sacrebleu for BLEU (Papineni et al. 2002) and chrF (Popović
2015), with sacrebleu's signature recorded so a figure can be reproduced
(Post 2018, "A Call for Clarity in Reporting BLEU Scores"); rouge-score (Google's
re-implementation of Lin 2004) for ROUGE-1/2/L/Lsum with the Porter stemmer.

ROUGE-Lsum treats newlines as sentence boundaries. rouge-score can split
sentences itself only with NLTK's punkt data (`split_summaries=True`), which is
not available offline, so `split_sentences` (`lmforge.generation`) puts one
sentence per line before scoring; texts that already have newlines keep them.

Hypotheses come from `lmforge.generation.generate_batch` (batched, KV cache),
which fine-tuning shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.generation import context_length_of as context_length_of
from lmforge.generation import generate_batch as generate_batch
from lmforge.generation import split_sentences as split_sentences
from lmforge.model.generate import decode_text
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
    from lmforge.eval.registry import fewshot_indices
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
