"""`lmforge eval`: evaluate one or more checkpoints on named tasks, side by side."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from lmforge.cli_args import add_checkpoint_arg, add_command, add_device_arg
from lmforge.eval.results import format_table, write_eval_json
from lmforge.eval.tasks import TASKS, TaskOptions

PER_TASK = ("data", "texts")  # TaskOptions fields set per task, not by a flag


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    """Evaluate checkpoints on tasks (ppl, hellaswag, mc, translation, summarization, creative).

    Writes eval.json. Several --checkpoint and --task flags may be given; results print as one
    table with a column per checkpoint. Examples:

      lmforge eval --checkpoint runs/quickstart --task hellaswag --limit 500
      lmforge eval --checkpoint A --checkpoint B --task ppl --data notes.txt
      lmforge eval --checkpoint A --task mc --data my_task.jsonl
      lmforge eval --checkpoint A --task ppl --data ppl=notes.txt --task hellaswag
      lmforge eval --checkpoint A --task hellaswag --num-fewshot 5 --limit 500
      lmforge eval --checkpoint A --task lm-eval:my_task --lm-eval-include tasks/
    """
    from lmforge.eval.evaluate import evaluate

    if overrides:
        raise ValueError(f"lmforge eval takes no config overrides (got {overrides})")
    data = _data_per_task(args.data or [], args.task)
    # Every option of the command but --data is the TaskOptions field of the same name.
    opts = TaskOptions(
        **{f.name: getattr(args, f.name) for f in fields(TaskOptions) if f.name not in PER_TASK}
    )
    runs = evaluate(
        {str(ckpt): ckpt for ckpt in args.checkpoint},
        args.task,
        lambda task: replace(opts, data=data.get(task)),
        device=args.device,
        timings=True,
    )
    settings = {
        "tasks": args.task,
        "data": data,
        **{k: v for k, v in vars(opts).items() if k not in PER_TASK},
    }
    out = Path(args.out) if args.out else Path(args.checkpoint[0]) / "eval.json"
    write_eval_json(out, runs, settings)
    print(format_table(runs))
    for run in runs:
        for r in run.results:
            if "signature" in r.settings:
                print(f"{r.task} {r.metric} sacrebleu signature: {r.settings['signature']}")
                break
    print(f"wrote {out}")
    return 0


def _data_per_task(specs: list[str], tasks: list[str]) -> dict[str, list[str]]:
    """`--data PATH` goes to every task; `--data TASK=PATH` only to TASK."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name in TASKS:
            if name not in tasks:
                raise ValueError(f"--data {spec}: task {name!r} is not among --task {tasks}")
            out.setdefault(name, []).append(path)
        else:
            for task in tasks:
                out.setdefault(task, []).append(spec)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "eval", cmd_eval, raw=True)
    add_checkpoint_arg(p, repeatable=True)
    p.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="TASK",
        help=f"{', '.join(TASKS)}, or lm-eval:NAME (any lm-evaluation-harness task); repeatable",
    )
    p.add_argument(
        "--num-fewshot",
        type=int,
        default=0,
        help="solved examples before each item (mc, hellaswag, translation, summarization, lm-eval)",
    )
    p.add_argument(
        "--lm-eval-include",
        default="",
        metavar="DIR",
        help="folder of lm-eval task YAML for lm-eval:NAME (local data: there is no hub)",
    )
    p.add_argument(
        "--data",
        action="append",
        metavar="[TASK=]PATH",
        help="data source (default per task); TASK= restricts it to one task; repeatable",
    )
    p.add_argument("--limit", type=int, default=0, help="first N items/texts (0 = all)")
    p.add_argument("--stride", type=int, default=0, help="ppl window stride (0 = half the context)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per scoring batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    p.add_argument("--out", default="", help="eval.json path (default: in the first checkpoint)")
