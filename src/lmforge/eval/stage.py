"""The eval stage: `lmforge eval`, and every model of a run scored on `eval.tasks` inside
`lmforge run` (through the same `lmforge.eval.evaluate` as the command), with samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.config import Config
from lmforge.eval.cli import register
from lmforge.stages import Stage, StageContext


def recipe_task_options(cfg: Config, run_dir: Path) -> Any:
    """Task name → its options inside `lmforge run` (`eval.limit`, then the task's own
    `recipe_options`: ppl scores the run's held-out documents, creative the test split
    the fine-tuning used)."""
    from lmforge.eval.tasks import TASKS, TaskOptions

    made: dict[str, TaskOptions] = {}  # the same for every model (ppl reads its texts once)

    def options(task: str) -> TaskOptions:
        if task not in made:
            opts = TaskOptions(limit=cfg.eval.limit)
            spec = TASKS.get(task)
            if spec is not None and spec.recipe_options is not None:
                opts = spec.recipe_options(cfg, run_dir, opts)
            made[task] = opts
        return made[task]

    return options


def _sampler(cfg: Config, samples: dict[str, list[str]]) -> Any:
    """An `evaluate(on_model=...)` callback: `eval.samples` texts from each model; a
    fine-tuned model is asked through its chat template and stops at the end of its turn."""
    from lmforge.finetune.chat import is_chat_checkpoint, sample_texts
    from lmforge.model.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=cfg.eval.sample_tokens,
        temperature=cfg.eval.temperature,
        top_k=cfg.eval.top_k,
        seed=0,
    )
    prompts = cfg.eval.prompts or [""]
    asked = [prompts[i % len(prompts)] for i in range(cfg.eval.samples)]

    def sample(name: str, ckpt: str | Path, model: Any, tok: Any) -> None:
        label = name.split(":")[0]
        chat = is_chat_checkpoint(ckpt) or (label == "finetuned" and cfg.finetune.task != "text")
        samples[label] = sample_texts(model, tok, asked, params, chat)

    return sample


def run_eval(ctx: StageContext) -> dict[str, Any]:
    from lmforge.eval.evaluate import evaluate
    from lmforge.eval.results import format_table, write_eval_json
    from lmforge.fileio import write_json_atomic
    from lmforge.train.dist import print0

    cfg, folder = ctx.cfg, ctx.folder("eval")
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = {f"{label}: {ckpt}": ckpt for label, ckpt in ctx.model_checkpoints().items()}
    samples: dict[str, list[str]] = {}
    runs = evaluate(
        checkpoints,
        list(cfg.eval.tasks),
        recipe_task_options(cfg, ctx.run_dir),
        on_model=_sampler(cfg, samples),
    )
    write_eval_json(folder / "eval.json", runs, {"tasks": cfg.eval.tasks, "limit": cfg.eval.limit})
    write_json_atomic(folder / "samples.json", samples)
    print0(format_table(runs))
    return {
        "results": {
            r.checkpoint.split(":")[0]: {f"{x.task}/{x.metric}": x.value for x in r.results}
            for r in runs
        }
    }


STAGE = Stage("eval", ("eval",), ("pretrain", "finetune"), run_eval, "eval", register=register)
