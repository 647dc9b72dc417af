"""The `lmforge` command: one sub-command per stage.

The stages add their own sub-commands (`lmforge.stages.register_commands` loops
over the registry); this module adds the few that belong to no stage (config,
recipes, generate, quickstart, run) and turns every error into one line.

Every sub-command that takes a recipe also takes dotted overrides of any config
key, e.g. ``lmforge pretrain shakespeare-char --train.lr=3e-4 --model.n_layers=6``.
Help texts come from the docstrings of the command functions.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.cli_args import (
    add_checkpoint_arg,
    add_command,
    add_device_arg,
    add_recipe_arg,
    command_doc,
    summary_line,
)
from lmforge.config import ConfigError, builtin_recipes, dump_yaml, load_config
from lmforge.model.sampling import SamplingParams, add_sampling_arguments
from lmforge.stages import register_commands

__all__ = ["build_parser", "main", "summary_line"]


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` (or `--section.key value`) overrides from the rest."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in name and not name.startswith("."):
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv):
                overrides.append(f"{name}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"override {arg} needs a value")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _help(fn: Callable) -> str:
    return command_doc(fn)


def _whole_summaries(sub: argparse._SubParsersAction) -> None:
    """Set every command's one-line help to its docstring's first paragraph.

    Commands register their own parsers (`register(subparsers)`), often with the
    docstring's first *line*, which cuts a wrapped sentence in half; this pass
    replaces it, for nested commands too (`lmforge tokenizer train`).
    """
    for action in sub._choices_actions:
        parser = sub.choices[action.dest]
        fn = parser.get_default("func")
        if fn is not None and inspect.getdoc(fn):
            action.help = summary_line(inspect.getdoc(fn) or "")
        for nested in parser._subparsers._group_actions if parser._subparsers else []:
            if isinstance(nested, argparse._SubParsersAction):
                _whole_summaries(nested)


# ----------------------------------------------------------------------------- commands


def cmd_config(args, overrides) -> int:
    """Print the fully resolved config of a recipe (with overrides applied)."""
    cfg = load_config(args.recipe, overrides)
    print(dump_yaml(cfg), end="")
    return 0


def cmd_recipes(args, overrides) -> int:
    """List the built-in recipes."""
    for name in builtin_recipes():
        print(name)
    return 0


def cmd_generate(args, overrides) -> int:
    """Generate text from a checkpoint, streaming it as it comes.

    A fine-tuned checkpoint gets the prompt as a user turn of its chat template and
    stops at the end of its reply (--template none continues the raw prompt instead).
    """
    from dataclasses import replace

    from lmforge.finetune.chat import chat_params, is_chat_checkpoint
    from lmforge.finetune.tasks import prompt_ids
    from lmforge.model.generate import complete
    from lmforge.model.sampling import sampling_from_args
    from lmforge.model_source import load_model

    params = sampling_from_args(args)
    model, tok, _cfg = load_model(args.checkpoint, device=args.device)
    chat = args.template == "chat" or (
        args.template == "auto" and is_chat_checkpoint(args.checkpoint)
    )
    if chat:
        ids, params = prompt_ids(tok, [("user", args.prompt)]), chat_params(tok, params)
    else:
        ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]
        params = params.with_stop_ids([tok.eot_id]) if args.stop_at_eot else params
    for n in range(args.num_samples):
        sys.stdout.write("" if chat else args.prompt)
        seed = None if params.seed is None else params.seed + n
        complete(
            model,
            tok,
            [ids],
            replace(params, seed=seed),
            lambda _row, piece: (sys.stdout.write(piece), sys.stdout.flush()),
        )
        sys.stdout.write("\n" + ("-" * 40 + "\n" if n + 1 < args.num_samples else ""))
    return 0


def cmd_quickstart(args, overrides) -> int:
    """Run the built-in default recipe: the Python standard library as corpus, pre-train,
    fine-tune (code → docstring), evaluate, audit bias, export and report, on CPU (about
    7–8 minutes on two CPU cores).

    Same as `lmforge run quickstart`; a rerun skips finished stages.
    """
    from lmforge.quickstart import quickstart

    t0 = time.perf_counter()
    quickstart(overrides)
    print(f"quickstart finished in {time.perf_counter() - t0:.0f}s")
    return 0


def cmd_run(args, overrides) -> int:
    """Run every stage of a recipe into one run folder; finished stages are skipped and an
    interrupted run resumes. A changed setting reruns only the stages that depend on it.
    """
    from lmforge.run import run_recipe

    run_recipe(args.recipe, overrides, only=args.only, start_from=args.start_from)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train language models end to end. Any recipe key can be overridden "
        "with --section.key=value.",
    )
    from lmforge import __version__

    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (anywhere on the command line; or LMFORGE_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = add_command(sub, "config", cmd_config)
    p.add_argument("recipe", nargs="?", default="quickstart", help="recipe file or built-in name")
    add_command(sub, "recipes", cmd_recipes)

    p = add_command(sub, "generate", cmd_generate)
    add_checkpoint_arg(p)
    p.add_argument("--prompt", default="")
    add_sampling_arguments(p, SamplingParams(max_new_tokens=200, temperature=0.8))
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument(
        "--template",
        default="auto",
        choices=["auto", "chat", "none"],
        help="chat template: auto = when the checkpoint was fine-tuned with one",
    )
    p.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false")
    add_device_arg(p)

    add_command(sub, "quickstart", cmd_quickstart)

    p = add_command(sub, "run", cmd_run)
    add_recipe_arg(p, optional=False)
    p.add_argument("--only", default="", metavar="STAGE", help="run just this stage")
    p.add_argument(
        "--from", dest="start_from", default="", metavar="STAGE", help="rerun from this stage on"
    )

    register_commands(sub)
    _whole_summaries(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


def _where(exc: BaseException) -> str:
    """The file an error is about (OSError's file name), else the lmforge line it came from."""
    if isinstance(exc, OSError) and exc.filename:
        return str(exc.filename)
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "lmforge" in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


def _deliberate(exc: Exception) -> bool:
    """An error lmforge raised on purpose (its message is written for the user), rather
    than one escaping from a bug or a library."""
    import traceback

    if type(exc).__module__.startswith("lmforge"):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    raised_here = bool(frames) and f"{os.sep}lmforge{os.sep}" in frames[-1].filename
    return raised_here and type(exc) in (ValueError, RuntimeError)


def _report(exc: Exception) -> int:
    """One line on stderr for an error; the exit code. lmforge's own errors already name
    the file and what to do; anything else also says where it came from and how to see more."""
    if getattr(exc, "reported", False):  # already on stderr (a rank's RankFailure)
        return 1
    if isinstance(exc, ConfigError):
        print(f"lmforge: config error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError) and not type(exc).__module__.startswith("lmforge"):
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"lmforge: error: {exc.strerror or _one_line(exc)}{where}", file=sys.stderr)
        return 1
    if _deliberate(exc):
        print(f"lmforge: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    where = _where(exc)
    print(
        f"lmforge: error: {type(exc).__name__}: {_one_line(exc)}"
        f"{f' ({where})' if where else ''}; run with --debug for the traceback",
        file=sys.stderr,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error ends in one line on stderr and exit code 1 (2 for a
    usage or config error, 130 for Ctrl-C); ``--debug`` (or LMFORGE_DEBUG=1) also prints
    the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LMFORGE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser()
        rest, overrides = _split_overrides(argv)
        args = parser.parse_args(rest)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        from lmforge.malloc import tune_malloc

        tune_malloc()
        return int(args.func(args, overrides) or 0)
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc()
        return _report(exc)


if __name__ == "__main__":
    raise SystemExit(main())
