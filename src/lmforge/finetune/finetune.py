"""The fine-tuning stage: starting point → task data → the shared training loop → metrics.

Starting points (``finetune.init``):

- an lmforge checkpoint or run folder (`lmforge.pretrain.load_model`);
- a HF `transformers` Llama / Qwen2 / GPT-2 folder (`lmforge.export.hf.load_hf_model`);
- nothing: a new model of shape ``model``, with a tokenizer from ``tokenizer.path``
  or trained on the task's training texts (translation from scratch).

Run folder layout (besides the loop's checkpoints/, metrics.jsonl, config.yaml)::

    tokenizer.json
    adapter/             LoRA only: adapter_model.safetensors + adapter_config.json (PEFT's format)
    merged/              LoRA only: a plain checkpoint with the adapter folded in
    test_outputs.jsonl   prompt, reference and generation per test example
    summary.json         final figures (train loss, val metrics, test metrics)

The final model loads with `lmforge.pretrain.load_model(run_dir)` (full) or
``load_model(run_dir / "merged")`` (LoRA); `finetuned_checkpoint` says which.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmforge.config import Config, ConfigError
from lmforge.fileio import write_text_atomic
from lmforge.finetune.data import PackedExamples, PackedLM
from lmforge.finetune.start import (  # noqa: F401  (re-exported for callers of finetune.finetune)
    finetuned_checkpoint,
    is_hf_folder,
    load_start,
    prepare_model,
    resolve_spec,
    save_lora_outputs,
    task_files,
)
from lmforge.finetune.tasks import (
    ChatTemplate,
    Example,
    TaskFormat,
    get_task,
    load_examples,
)
from lmforge.model.transformer import Transformer, count_params
from lmforge.tokenizer import (
    ASSISTANT,
    CHAT_TEMPLATE,
    END,
    Tokenizer,
)
from lmforge.train.checkpoint import unwrap
from lmforge.train.dist import print0

if TYPE_CHECKING:
    from lmforge.train.loop import Trainer


# ----------------------------------------------------------------------------- metrics


def score(metric: str, hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, default 13a tokenisation) or mean ROUGE F1 × 100."""
    if metric == "bleu":
        import sacrebleu

        return {
            "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
            "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        }
    if metric == "rouge":
        from rouge_score import rouge_scorer

        # use_stemmer needs no NLTK data; split_summaries would, and fails offline.
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for h, r in zip(hyps, refs, strict=True):
            for key, s in scorer.score(r, h).items():
                totals[key] += s.fmeasure
        return {k: 100 * v / max(len(hyps), 1) for k, v in totals.items()}
    return {}


def generation_prompt(ex: Example, tok: Tokenizer, room: int) -> list[int]:
    """The example's prompt (through '<|assistant|>'), cut to `room` tokens if needed."""
    ids = ex.ids[: ex.prompt_len]
    if len(ids) > room and ids[-1] != tok.specials[ASSISTANT]:  # the model's own template
        ids = ids[-room:]
    elif len(ids) > room:
        ids = [*ids[: room - 2], tok.specials[END], tok.specials[ASSISTANT]]
    return ids


def model_template(cfg: Config, tok: Tokenizer) -> tuple[ChatTemplate | None, tuple[int, ...]]:
    """An imported model's own chat template, and its end-of-turn token id to stop at."""
    t = cfg.tokenizer
    if not t.chat_template:
        return None, ()
    eos = tok.encode(t.eos_token) if t.eos_token else []
    return ChatTemplate(t.chat_template, t.bos_token, t.eos_token), tuple(
        eos if len(eos) == 1 else ()
    )


def finetune_seq_len(cfg: Config) -> int:
    """Tokens per packed row: finetune.seq_len, or the context up to 2048 (RoPE models)."""
    ctx, asked = cfg.model.context_length, cfg.finetune.seq_len
    if asked > ctx:
        raise ConfigError(f"finetune.seq_len = {asked} exceeds model.context_length = {ctx}")
    if cfg.model.position != "rope":  # learned positions: the checkpoint keeps the table
        return ctx
    return asked or min(ctx, 2048)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tok: Tokenizer,
    examples: list[Example],
    max_new_tokens: int,
    extra_stop: tuple[int, ...] = (),
) -> list[str]:
    """Greedy answers (up to '<|end|>') to each example's prompt.

    Uses `lmforge.generation.generate_batch`: prompts of equal length run as
    one batch with the KV cache, no padding, so each answer is what a lone greedy
    decode gives.
    """
    from lmforge.generation import generate_batch
    from lmforge.model.generate import decode_text

    model = unwrap(model)
    ctx = int(model.cfg.context_length)  # type: ignore[union-attr,arg-type]
    prompts = [generation_prompt(ex, tok, ctx - max_new_tokens) for ex in examples]
    new = generate_batch(
        model,
        prompts,
        max_new_tokens,
        temperature=0.0,
        stop_ids=[tok.specials[END], tok.eot_id, *extra_stop],
    )
    return [decode_text(tok, ids).strip() for ids in new]


def metric_hook(
    task: TaskFormat,
    tok: Tokenizer,
    examples: list[Example],
    max_new_tokens: int,
    extra_stop: tuple[int, ...] = (),
) -> Callable[[nn.Module, int], dict[str, float]]:
    """An `eval_hooks` callable: the task metric on a fixed set of validation examples."""

    def hook(model: nn.Module, _step: int) -> dict[str, float]:
        if task.metric == "loss" or not examples:
            return {}
        hyps = generate_answers(model, tok, examples, max_new_tokens, extra_stop)
        return {
            f"val_{k}": v
            for k, v in score(task.metric, hyps, [e.reference for e in examples]).items()
        }

    return hook


def perplexity_hook(model: nn.Module, _step: int) -> dict[str, float]:
    return {}


# ----------------------------------------------------------------------------- the stage


def finetune(cfg: Config, run_dir: str | Path | None = None, resume: str = "") -> dict[str, Any]:
    """Fine-tune per `cfg.finetune` into `run_dir` (default `output.dir`); returns the summary."""
    from lmforge.hardware import pick_device
    from lmforge.train.dist import init_distributed

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    init_distributed(pick_device(cfg.train.device))
    run_dir = Path(run_dir or cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = _with_finetune_budget(cfg)
    fc = cfg.finetune
    if fc.objective != "sft":
        from lmforge.finetune.preference import finetune_preference

        return finetune_preference(cfg, run_dir, resume)
    task = get_task(fc.task)
    files = task_files(cfg, run_dir)
    model, tok, cfg = load_start(cfg, run_dir, files["train"], task)
    tok.save(run_dir / "tokenizer.json")
    data = _SftData.load(cfg, task, tok, files)

    info = prepare_model(model, cfg)
    cfg = replace(cfg, model=model.cfg)  # apply_lora may untie the head
    print0(
        f"model: {info['total_params'] / 1e6:.2f}M parameters, {info['trainable_params'] / 1e6:.3f}M "
        f"trainable ({fc.method})"
    )
    trainer = _sft_trainer(cfg, model, tok, task, data, run_dir)
    cfg = trainer.cfg
    summary = trainer.fit(resume=resume)
    if "val_loss" in summary:
        summary["val_ppl"] = math.exp(min(summary["val_loss"], 50.0))
    summary.update(
        task=task.name,
        train_examples=len(data.train_ex),
        epochs=trainer.step * cfg.train.tokens_per_step / max(data.train.epoch_steps_tokens, 1),
        **info,
    )
    summary.pop("adapted", None)
    if not trainer.dist.is_main:
        return summary

    if fc.method == "lora":
        save_lora_outputs(model, trainer, cfg, tok, run_dir)
    if data.test_ex and task.metric != "loss":
        summary["test"] = _test_scores(
            model, tok, task, data.test_ex, data.extra_stop, fc.max_new_tokens, run_dir
        )
    summary["checkpoint"] = str(finetuned_checkpoint(run_dir))
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def _with_finetune_budget(cfg: Config) -> Config:
    """`cfg` with the finetune section's step budget, learning rate and batch in `train`."""
    fc = cfg.finetune
    return replace(
        cfg,
        train=replace(
            cfg.train,
            max_steps=fc.max_steps or cfg.train.max_steps,
            lr=fc.lr or cfg.train.lr,
            tokens_per_step=fc.tokens_per_step or cfg.train.tokens_per_step,
            # Fine-tuning (full or LoRA) uses AdamW even when pre-training used Muon: the
            # finetune section has one learning rate, and Muon's has not been tuned here.
            optimizer="adamw",
        ),
    )


@dataclass
class _SftData:
    """A task's examples, and the packed rows the trainer reads."""

    train_ex: list[Example]
    val_ex: list[Example]
    test_ex: list[Example]
    train: PackedExamples
    val: PackedExamples | None
    seq_len: int
    extra_stop: tuple[int, ...]

    @classmethod
    def load(
        cls, cfg: Config, task: TaskFormat, tok: Tokenizer, files: dict[str, list[str]]
    ) -> _SftData:
        fc = cfg.finetune
        t0 = time.perf_counter()
        lang = (fc.source_lang, fc.target_lang)
        template, extra_stop = model_template(cfg, tok)
        train_ex, val_ex, test_ex = (
            load_examples(task, tok, files[split], *lang, limit=fc.max_examples, template=template)
            for split in ("train", "val", "test")
        )
        seq_len = finetune_seq_len(cfg)
        train = PackedExamples(train_ex, seq_len, tok.pad_id, cfg.train.seed)
        val = (
            PackedExamples(val_ex, seq_len, tok.pad_id, cfg.train.seed, shuffle=False)
            if val_ex
            else None
        )
        print0(
            f"finetune {task.name}: {len(train_ex):,} train / {len(val_ex):,} val / "
            f"{len(test_ex):,} test examples; {train.n_rows:,} packed rows of {seq_len} tokens "
            f"({train.n_target_tokens:,} target tokens, {train.truncated} truncated) "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        return cls(train_ex, val_ex, test_ex, train, val, seq_len, extra_stop)


def _sft_trainer(
    cfg: Config, model: Transformer, tok: Tokenizer, task: TaskFormat, data: _SftData, run_dir: Path
) -> Trainer:
    """The `Trainer` of a supervised fine-tuning, its `cfg` the one its checkpoints record."""
    from lmforge.train.loop import Trainer

    fc = cfg.finetune
    hooks = []
    metric_examples = data.val_ex[: fc.eval_examples] if task.metric != "loss" else []
    if metric_examples:
        hooks.append(metric_hook(task, tok, metric_examples, fc.max_new_tokens, data.extra_stop))
    val = data.val
    trainer = Trainer(
        # The trainer sizes its micro-batches from the context: rows are seq_len long.
        replace(cfg, model=replace(cfg.model, context_length=data.seq_len)),
        PackedLM(model, tok.eot_id),
        run_dir,
        data.train,
        val_data=(
            (lambda: val.sequential(cfg.train.micro_batch_size, cfg.train.eval_tokens))
            if val is not None
            else None
        ),
        eval_hooks=hooks,
        extra_files={"tokenizer.json": tok.to_json().encode("utf-8")},
        # Samplers read it to prompt through the template and stop at the end of a turn.
        extra_state={"chat_template": CHAT_TEMPLATE} if task.name != "text" else None,
    )
    # What its checkpoints record: the model keeps its own context, and the rows' length.
    trainer.cfg = replace(cfg, finetune=replace(fc, seq_len=data.seq_len))
    return trainer


def _test_scores(
    model: Transformer,
    tok: Tokenizer,
    task: TaskFormat,
    test_ex: list[Example],
    extra_stop: tuple[int, ...],
    max_new_tokens: int,
    run_dir: Path,
) -> dict[str, Any]:
    """Score generated answers on the test split; the outputs go to test_outputs.jsonl."""
    t_test = time.perf_counter()
    hyps = generate_answers(model, tok, test_ex, max_new_tokens, extra_stop)
    refs = [e.reference for e in test_ex]
    scores = score(task.metric, hyps, refs)
    scores["n"] = len(test_ex)
    scores["seconds"] = time.perf_counter() - t_test
    lines = []
    for ex, h in zip(test_ex, hyps, strict=True):
        prompt = tok.decode(ex.ids[: ex.prompt_len])
        lines.append(json.dumps({"prompt": prompt, "reference": ex.reference, "output": h}) + "\n")
    write_text_atomic(run_dir / "test_outputs.jsonl", "".join(lines))
    print0(
        f"test ({len(test_ex)} examples): " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
    )
    return scores


def finetune_stage(
    cfg: Config, pretrained_checkpoint: str | Path, run_dir: str | Path
) -> dict[str, Any]:
    """Quickstart / `lmforge run` hook: fine-tune `pretrained_checkpoint` on `cfg.finetune`.

    Resumes an interrupted fine-tuning in `run_dir` automatically.
    """
    cfg = replace(cfg, finetune=replace(cfg.finetune, init=str(pretrained_checkpoint)))
    return finetune(cfg, run_dir, resume="auto")


def param_summary(model: Transformer) -> dict[str, int]:
    return count_params(model.cfg)
