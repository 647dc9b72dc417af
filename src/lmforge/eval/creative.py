"""Evaluation of open-ended writing: held-out perplexity and the diversity of samples.

Records are those of the `creative` fine-tuning task (``{prompt, continuation,
style?}``), prompted in its chat format (`lmforge.finetune.tasks`).

- **perplexity / loss / bits_per_byte** of the held-out continuation given its
  prompt: only the continuation's tokens are scored (not the prompt, not the
  closing ``<|end|>``), so a model that was never taught the chat format (a
  pre-trained base) is not charged for it beyond the context it sees. The standard
  error treats items as the sampled unit (`intrinsic.ratio_stderr`).
- **distinct_1/2/3**: unique n-grams / all n-grams over all samples together (Li et
  al. 2016, "A Diversity-Promoting Objective Function"), on whitespace words.
- **self_bleu**: each sample scored by sacrebleu's sentence BLEU against all the
  other samples as references, averaged (Zhu et al. 2018, "Texygen"); higher means
  the samples resemble one another more.
- **repetition_4**: within one sample, the share of its word 4-grams that repeat an
  earlier 4-gram of the same sample, averaged over samples (degenerate loops score
  near 1).

One continuation is sampled per prompt with the given temperature / top-k / top-p
and seed; the samples are saved (``eval_outputs.jsonl`` beside ``eval.json``) for
reading and for an arena study.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.eval.intrinsic import IntrinsicResult
from lmforge.eval.results import Result, mean_and_stderr
from lmforge.generation import context_length_of
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmforge.config import Config
    from lmforge.eval.registry import TaskOptions

TASK = "creative"


@dataclass
class CreativeItem:
    prompt_ids: list[int]  # the chat prompt, ending with '<|assistant|>'
    prompt: str  # the user turn as text
    continuation: str


# ----------------------------------------------------------------------------- metrics


def words(text: str) -> list[str]:
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, over all texts together (nan if none)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sacrebleu sentence BLEU of each text against all the others (nan below two texts)."""
    from sacrebleu.metrics import BLEU

    if len(texts) < 2:
        return float("nan")
    metric = BLEU(effective_order=True)
    scores = [
        metric.sentence_score(t, [o for j, o in enumerate(texts) if j != i]).score
        for i, t in enumerate(texts)
    ]
    return sum(scores) / len(scores)


def repetition_rate(text: str, n: int = 4) -> float | None:
    """Share of the text's word n-grams that repeat an earlier one (None if it has none)."""
    grams = ngrams(words(text), n)
    if not grams:
        return None
    return (len(grams) - len(set(grams))) / len(grams)


def diversity(samples: Sequence[str], settings: dict[str, Any]) -> list[Result]:
    """distinct-1/2/3, self-BLEU, 4-gram repetition and length of a set of samples."""
    n = len(samples)
    out = [
        Result(TASK, f"distinct_{k}", distinct_n(samples, k), n, settings=settings)
        for k in (1, 2, 3)
    ]
    out.append(Result(TASK, "self_bleu", self_bleu(samples), n, settings=settings))
    reps = [r for r in (repetition_rate(s) for s in samples) if r is not None]
    mean, se = mean_and_stderr(reps)
    out.append(Result(TASK, "repetition_4", mean, len(reps), se, settings=settings))
    mean, se = mean_and_stderr([float(len(words(s))) for s in samples])
    out.append(Result(TASK, "length_words", mean, n, se, settings=settings))
    return out


# ----------------------------------------------------------------------------- scoring


def load_items(tok: Tokenizer, data: list[str] | None, limit: int = 0) -> list[CreativeItem]:
    """Items from JSONL specs, or (none given) the test split of the built-in examples."""
    from lmforge.finetune.tasks import Record, get_task, prompt_ids, read_records

    task = get_task(TASK)
    if data:
        recs = [r for spec in data for r in read_records(spec, limit=limit)]
    else:
        from lmforge.finetune.creative import creative_records

        recs = [
            Record(r, "built-in creative test", i + 1)
            for i, r in enumerate(creative_records()["test"])
        ]
    items = []
    for rec in recs[: limit or None]:
        user, (_, continuation) = task.to_turns(rec)
        items.append(CreativeItem(prompt_ids(tok, [user]), user[1], continuation))
    if not items:
        raise ValueError(f"{', '.join(data or ['built-in creative test'])}: no records")
    return items


def continuation_nll(
    model: nn.Module, tok: Tokenizer, items: Sequence[CreativeItem], batch_size: int = 16
) -> IntrinsicResult:
    """Negative log-likelihood of each continuation's tokens given its prompt.

    A pair longer than the context keeps the end of its prompt; a continuation that
    alone fills the context is cut (and its bytes counted as cut). Rows are padded on
    the right, which a causal model never attends to from an earlier position.
    """
    ctx = context_length_of(model)
    rows = []
    for it in items:
        cont = tok.encode(it.continuation)[: ctx - 1]
        prompt = it.prompt_ids[-(ctx - len(cont)) :]
        rows.append((prompt + cont, len(prompt), len(tok.decode(cont).encode("utf-8"))))
    res = IntrinsicResult()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for ids, _, _ in chunk)
            x = torch.tensor([ids + [tok.pad_id] * (width - len(ids)) for ids, _, _ in chunk])
            logp = F.log_softmax(model(x[:, :-1]).float(), dim=-1)
            for r, (ids, n_prompt, n_bytes) in enumerate(chunk):
                targets = torch.tensor(ids[n_prompt:])
                scored = logp[r, n_prompt - 1 : len(ids) - 1].gather(1, targets[:, None])
                nll = float(-scored.double().sum())
                res.nll += nll
                res.n_tokens += len(targets)
                res.n_bytes += n_bytes
                res.n_texts += 1
                res.per_text_nll.append(nll)
                res.per_text_tokens.append(len(targets))
                res.per_text_bytes.append(n_bytes)
    return res


def sample_continuations(
    model: nn.Module, tok: Tokenizer, items: Sequence[CreativeItem], opts: TaskOptions
) -> list[str]:
    """One continuation per prompt, stopped at '<|end|>' or end-of-text."""
    from lmforge.generation import generate_batch
    from lmforge.tokenizer import END

    new = generate_batch(
        model,
        [it.prompt_ids for it in items],
        opts.max_new_tokens,
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        seed=opts.seed,
        stop_ids=[tok.eot_id, tok.specials[END]],
    )
    return [tok.decode(ids).strip() for ids in new]


def run_creative(
    model: nn.Module, tok: Tokenizer, data: list[str] | None, opts: TaskOptions
) -> list[Result]:
    """Perplexity of the held-out continuations, then the diversity of sampled ones."""
    items = load_items(tok, data, opts.limit)
    res = continuation_nll(model, tok, items)
    source = data or ["built-in creative test"]
    settings: dict[str, Any] = {"data": source, "tokens": res.n_tokens, "bytes": res.n_bytes}
    out = [
        Result(
            TASK,
            "perplexity",
            res.perplexity,
            res.n_texts,
            res.perplexity_stderr(),
            settings=settings,
        ),
        Result(TASK, "loss", res.loss, res.n_texts, res.loss_stderr(), settings=settings),
        Result(
            TASK,
            "bits_per_byte",
            res.bits_per_byte,
            res.n_texts,
            res.bits_per_byte_stderr(),
            settings=settings,
        ),
    ]
    samples = sample_continuations(model, tok, items, opts)
    decoding = {
        "data": source,
        "max_new_tokens": opts.max_new_tokens,
        "decoding": "greedy" if opts.temperature <= 0 else "sampled",
        "temperature": opts.temperature,
        "top_k": opts.top_k,
        "top_p": opts.top_p,
        "seed": opts.seed,
    }
    diverse = diversity(samples, decoding)
    diverse[0].outputs = [
        {"index": i, "source": it.prompt, "references": [it.continuation], "hypothesis": s}
        for i, (it, s) in enumerate(zip(items, samples, strict=True))
    ]
    return out + diverse


def run_options(cfg: Config, run_dir: Path) -> TaskOptions:
    """`lmforge run`'s options: the test split the fine-tuning used, eval.* sampling settings."""
    from lmforge.eval.registry import TaskOptions
    from lmforge.finetune.start import resolve_spec

    built = run_dir / "finetune" / "task_data" / "test.jsonl"
    data: list[str] | None = None
    if cfg.finetune.task == TASK and cfg.finetune.test_files:
        data = [resolve_spec(s) for s in cfg.finetune.test_files]
    elif cfg.finetune.task == TASK and built.exists():
        data = [str(built)]
    return TaskOptions(
        data=data,
        limit=cfg.eval.limit,
        max_new_tokens=cfg.eval.sample_tokens,
        temperature=cfg.eval.temperature,
        top_k=cfg.eval.top_k,
        seed=0,
    )
