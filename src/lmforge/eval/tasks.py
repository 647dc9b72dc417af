"""Named evaluation tasks → `Result`s, and the in-loop hook factory.

| task          | data (default)                              | metrics                                  |
|---------------|---------------------------------------------|------------------------------------------|
| ppl           | text sources (files, folders, JSONL `text`) | loss, perplexity, bits_per_byte          |
| hellaswag     | shared `hellaswag/hellaswag_val.jsonl.gz`   | acc, acc_norm, acc_bytes                 |
| mc            | JSONL `{context, choices, label}`           | acc, acc_norm, acc_bytes                 |
| translation   | parallel text prefix (shared multi30k val)  | bleu, chrf (sacrebleu)                   |
| summarization | SciTLDR-style JSONL (shared scitldr dev)    | rouge1, rouge2, rougeL, rougeLsum        |
| creative      | JSONL `{prompt, continuation, style?}` (built-in test split of the books) | perplexity, distinct_n, self_bleu, repetition_4 (`eval.creative`) |

Generation tasks prompt in the chat format of the fine-tuning task of the same
name (`lmforge.finetune.tasks`).

Every task is an `EvalTask` in the `TASKS` registry; `lmforge eval`, the eval
stage of `lmforge run` and the in-loop hook (`make_eval_hook`) all reach it by
name through `lmforge.eval.evaluate`. A new task is one file,
``lmforge/eval/task_NAME.py``, that ends with ``register_task(EvalTask(...))``:
it is found and imported with this module (keep torch imports inside its
functions, so `lmforge --help` stays light).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.eval.registry import (  # noqa: F401  (the registry, re-exported)
    LM_EVAL_PREFIX,
    TASKS,
    EvalTask,
    TaskOptions,
    check_task,
    default_data,
    fewshot_indices,
    register_task,
    run_task,
)
from lmforge.eval.results import Result
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is imported by the tasks that run, not by `lmforge --help`
    from torch import nn

    from lmforge.config import Config


def _ppl(model: nn.Module, tok: Tokenizer, opts: TaskOptions) -> list[Result]:
    from lmforge.eval.intrinsic import evaluate_texts, read_texts

    data = opts.data or []
    texts = opts.texts if opts.texts is not None else read_texts(data, limit=opts.limit)
    try:
        res = evaluate_texts(
            model, tok, texts, stride=opts.stride or None, max_batch_tokens=opts.batch_tokens
        )
    except ValueError as exc:  # e.g. a character the char tokenizer has never seen
        raise ValueError(f"ppl on {', '.join(data)}: {exc}") from None
    from lmforge.generation import context_length_of

    ctx = context_length_of(model)
    masked = getattr(model.cfg, "objective", "causal") == "masked"  # type: ignore[union-attr]
    settings = {
        "data": data,
        "stride": opts.stride or max(1, ctx // 2),
        "context_length": ctx,
        "tokens": res.n_tokens,
        "bytes": res.n_bytes,
        "pseudo_perplexity": masked,
    }
    return [
        Result("ppl", "loss", res.loss, res.n_texts, res.loss_stderr(), settings=settings),
        Result(
            "ppl",
            "perplexity",
            res.perplexity,
            res.n_texts,
            res.perplexity_stderr(),
            settings=settings,
        ),
        Result(
            "ppl",
            "bits_per_byte",
            res.bits_per_byte,
            res.n_texts,
            stderr=res.bits_per_byte_stderr(),
            settings=settings,
        ),
    ]


def _multiple_choice(
    model: nn.Module, tok: Tokenizer, task: str, opts: TaskOptions
) -> list[Result]:
    from lmforge.eval.multiple_choice import (
        METRIC_NAMES,
        load_hellaswag,
        load_mc_jsonl,
        mean_stderr,
        score_items,
    )

    data = opts.data or []
    load = load_hellaswag if task == "hellaswag" else load_mc_jsonl
    items = [it for spec in data for it in load(spec, limit=opts.limit)]
    if opts.limit:
        items = items[: opts.limit]
    if opts.num_fewshot:
        items = with_fewshot(items, opts.num_fewshot, opts.seed)
    res = score_items(model, tok, items, max_batch_tokens=opts.batch_tokens)
    settings = {"data": data, "num_fewshot": opts.num_fewshot, "delimiter": " "}
    out = []
    for norm, metric in METRIC_NAMES.items():
        correct = res.correct(norm)
        out.append(
            Result(
                task,
                metric,
                sum(correct) / len(correct),
                len(correct),
                mean_stderr(correct),
                settings=settings,
            )
        )
    return out


def with_fewshot(items: list, k: int, seed: int) -> list:
    """Multiple-choice items whose contexts start with k solved items, as lm-eval lays
    them out: each shot is its context, " ", its correct choice; shots and the item are
    separated by a blank line."""
    from lmforge.eval.multiple_choice import MCItem

    out = []
    for i, it in enumerate(items):
        shots = [items[j] for j in fewshot_indices(len(items), i, k, seed)]
        solved = "".join(f"{s.context} {s.choices[s.label]}\n\n" for s in shots)
        out.append(MCItem(solved + it.context, it.choices, it.label, it.id))
    return out


def run_lm_eval(model: nn.Module, tok: Tokenizer, name: str, opts: TaskOptions) -> list[Result]:
    """A task of lm-evaluation-harness through the lmforge model adapter: its prompts,
    few-shot sampling and metrics; the numbers as lm-eval reports them."""
    import lm_eval

    from lmforge.eval.lm_eval_bridge import run_lm_eval_tasks

    out = run_lm_eval_tasks(
        model,  # type: ignore[arg-type]  # an lmforge Transformer, as every task takes
        tok,
        [name],
        opts.lm_eval_include or None,
        num_fewshot=opts.num_fewshot or None,
        limit=opts.limit or None,
    )
    if name not in out["results"]:
        raise ValueError(f"lm-eval ran no task named {name!r} (groups are not supported)")
    metrics = out["results"][name]
    n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
    settings = {
        "lm_eval_version": lm_eval.__version__,
        "num_fewshot": opts.num_fewshot,
        "include": opts.lm_eval_include,
    }
    results = []
    for key, value in metrics.items():
        metric, _, filter_name = key.partition(",")
        if "_stderr" in metric or not isinstance(value, int | float) or metric == "alias":
            continue
        stderr = metrics.get(f"{metric}_stderr,{filter_name}")
        stderr = float(stderr) if isinstance(stderr, int | float) else None
        label = metric if filter_name in ("", "none") else f"{metric}[{filter_name}]"
        results.append(
            Result(LM_EVAL_PREFIX + name, label, float(value), n, stderr, settings=settings)
        )
    return results


def _generation(model: nn.Module, tok: Tokenizer, task: str, opts: TaskOptions) -> list[Result]:
    from lmforge.eval.generation import evaluate_generation, finetune_task, output_records

    out = []
    for spec in opts.data or []:
        gen_task = finetune_task(
            tok, task, spec, limit=opts.limit, num_fewshot=opts.num_fewshot, seed=opts.seed
        )
        metrics, hyps = evaluate_generation(
            model,
            tok,
            gen_task,
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_k=opts.top_k,
            top_p=opts.top_p,
            seed=opts.seed,
        )
        for mv in metrics:
            settings = {"data": spec, **mv.settings}
            out.append(
                Result(task, mv.name, mv.value, mv.n, mv.stderr, mv.ci_low, mv.ci_high, settings)
            )
        out[-len(metrics)].outputs = output_records(gen_task, hyps)  # saved by write_eval_json
    return out


def make_eval_hook(
    tok: Tokenizer,
    tasks: list[str] | str,
    every: int = 1,
    **options: Any,
) -> Callable[[nn.Module, int], dict[str, float]]:
    """A `Trainer(..., eval_hooks=[...])` hook: runs `tasks` at every `every`-th evaluation step.

    Returns metrics named `<task>/<metric>` (e.g. `hellaswag/acc_norm`,
    `ppl/bits_per_byte`), which the trainer logs beside the validation loss.
    Keep `limit` small: the hook runs inside the training loop. Options are the
    fields of `TaskOptions`.
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    for name in names:
        check_task(name)
    opts = TaskOptions(**options)

    def hook(model: nn.Module, step: int) -> dict[str, float]:
        from lmforge.eval.evaluate import evaluate_model

        if every > 1 and step % every:
            return {}
        return {f"{r.task}/{r.metric}": r.value for r in evaluate_model(model, tok, names, opts)}

    return hook


# ----------------------------------------------------------------------------- built-in tasks


RECIPE_PPL_BATCH_TOKENS = 8192


def _ppl_in_recipe(cfg: Config, run_dir: Path, opts: TaskOptions) -> TaskOptions:
    """Inside `lmforge run`, ppl scores the held-out documents of the run's corpus."""
    from lmforge.eval.intrinsic import held_out_texts

    texts = held_out_texts(cfg.data.sources, cfg.data.split, cfg.data.val_fraction, opts.limit)
    # Scored in batches of `evaluate_texts`' default size, as the run's eval always has,
    # so figures of runs before and after stay comparable to the last bit.
    return replace(opts, texts=texts, batch_tokens=RECIPE_PPL_BATCH_TOKENS)


def _creative(model: nn.Module, tok: Tokenizer, opts: TaskOptions) -> list[Result]:
    from lmforge.eval.creative import run_creative

    return run_creative(model, tok, opts.data, opts)


def _creative_in_recipe(cfg: Config, run_dir: Path, opts: TaskOptions) -> TaskOptions:
    from lmforge.eval.creative import run_options

    return run_options(cfg, run_dir)


def _task_fn(fn: Callable[..., list[Result]], name: str) -> Callable[..., list[Result]]:
    return lambda model, tok, opts: fn(model, tok, name, opts)


for _task in (
    EvalTask("ppl", _ppl, recipe_options=_ppl_in_recipe),
    EvalTask(
        "hellaswag",
        _task_fn(_multiple_choice, "hellaswag"),
        default_data=("hellaswag/hellaswag_val.jsonl.gz",),
    ),
    EvalTask("mc", _task_fn(_multiple_choice, "mc")),
    EvalTask("translation", _task_fn(_generation, "translation"), default_data=("multi30k/val",)),
    EvalTask(
        "summarization",
        _task_fn(_generation, "summarization"),
        default_data=("scitldr/dev.jsonl",),
    ),
    EvalTask("creative", _creative, needs_data=False, recipe_options=_creative_in_recipe),
):
    register_task(_task)


def _discover_task_modules() -> None:
    """Import every `lmforge/eval/task_*.py`: each registers its task (one file per task).
    Such a module imports torch only inside its functions, so `--help` stays light."""
    import lmforge.eval

    for info in pkgutil.iter_modules(lmforge.eval.__path__):
        if info.name.startswith("task_"):
            importlib.import_module(f"lmforge.eval.{info.name}")


_discover_task_modules()
