"""`lmforge finetune` and `lmforge chat` (registered through `cli.EXTRA_COMMAND_MODULES`)."""

from __future__ import annotations

import argparse
import sys

from lmforge.cli_args import add_checkpoint_arg, add_command, add_device_arg, add_recipe_arg
from lmforge.model.sampling import CHAT_DEFAULTS, add_sampling_arguments


def cmd_finetune(args, overrides) -> int:
    """Fine-tune a checkpoint or HF model folder on a task (instruction, chat, summarization,
    translation, code-docstring, creative, text), fully or with LoRA; --resume auto continues a run.

    Examples:
      lmforge finetune finetune-multi30k
      lmforge finetune --checkpoint runs/quickstart --task code-docstring --method lora
      lmforge finetune --checkpoint runs/sft --objective dpo --train prefs.jsonl
    """
    from lmforge.config import load_config
    from lmforge.finetune.finetune import finetune

    extra = list(overrides)
    if args.checkpoint:
        extra.append(f"finetune.init={args.checkpoint}")
    if args.task:
        extra.append(f"finetune.task={args.task}")
    if args.method:
        extra.append(f"finetune.method={args.method}")
    if args.objective:
        extra.append(f"finetune.objective={args.objective}")
    for name in ("train", "val", "test"):
        files = getattr(args, name)
        if files:
            extra.append(f"finetune.{name}_files=[{', '.join(files)}]")
    cfg = load_config(args.recipe, extra)
    summary = finetune(cfg, args.out or None, resume=args.resume)
    figures = {k: v for k, v in summary.items() if k.startswith("val_") or k == "loss"}
    print("done: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if isinstance(v, float)))
    if "test" in summary:
        print("test: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["test"].items()))
    print(
        f"model: {summary['checkpoint']}  (try: lmforge chat --checkpoint {summary['checkpoint']})"
    )
    return 0


def cmd_chat(args, overrides) -> int:
    """Chat with a fine-tuned checkpoint in the terminal: the chat template, streamed replies,
    and the conversation kept as history. Type /reset to forget it, /exit (or Ctrl-D) to quit.
    """
    from lmforge.finetune.chat import chat_loop
    from lmforge.model.sampling import sampling_from_args
    from lmforge.model_source import load_model

    params = sampling_from_args(args)
    # A run folder resolves to its fine-tuned stage (lmforge.model_source).
    model, tok, _cfg = load_model(args.checkpoint, device=args.device)
    chat_loop(model, tok, system=args.system, params=params, read=input, write=sys.stdout.write)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "finetune", cmd_finetune, raw=True)
    add_recipe_arg(p, default=None)
    add_checkpoint_arg(p, required=False, what="to start from")
    p.add_argument(
        "--task",
        default="",
        help="instruction|chat|summarization|translation|code-docstring|creative|text",
    )
    p.add_argument("--method", default="", choices=["", "full", "lora"])
    p.add_argument(
        "--objective",
        default="",
        choices=["", "sft", "dpo", "simpo"],
        help="sft (default), or preference tuning on {prompt, chosen, rejected} records",
    )
    p.add_argument(
        "--train", nargs="+", help="training data files (JSONL/CSV/Parquet/parallel prefix)"
    )
    p.add_argument("--val", nargs="+", help="validation data files")
    p.add_argument("--test", nargs="+", help="test data files (scored after training)")
    p.add_argument("--out", default="", help="run folder (default: output.dir)")
    p.add_argument("--resume", default="", help="'auto' or a checkpoint path")

    p = add_command(sub, "chat", cmd_chat)
    add_checkpoint_arg(p)
    p.add_argument("--system", default="", help="system prompt")
    add_sampling_arguments(p, CHAT_DEFAULTS)
    add_device_arg(p)
