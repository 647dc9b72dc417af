"""The `lmforge` command: one sub-command per stage.

Every sub-command that takes a recipe also takes dotted overrides of any config
key, e.g. ``lmforge pretrain shakespeare-char --train.lr=3e-4 --model.n_layers=6``.
Help texts come from the docstrings of the command functions.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.config import ConfigError, builtin_recipes, dump_yaml, load_config
from lmforge.model.sampling import SamplingParams, add_sampling_arguments
from lmforge.model_source import CHECKPOINT_HELP

# Stage modules that add their own sub-commands: each has `register(subparsers)`.
EXTRA_COMMAND_MODULES: list[str] = [
    "lmforge.eval.cli",
    "lmforge.finetune.cli",
    "lmforge.data.cli",
    "lmforge.serve.cli",
    "lmforge.plan_cli",
    "lmforge.export.cli",
    "lmforge.bias.cli",
    "lmforge.doctor",
    "lmforge.sweep.cli",
    "lmforge.train.checkpoint_cli",
]


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
    return inspect.getdoc(fn) or ""


def summary_line(doc: str) -> str:
    """The first paragraph of a docstring as one line: a command's whole summary sentence."""
    first = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(first.split())


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


def cmd_tokenizer_train(args, overrides) -> int:
    """Train a tokenizer (byte-level BPE or char) on the recipe's data sources."""
    from lmforge.pretrain import run_dir_of, tokenizer_stage

    cfg = load_config(args.recipe, overrides)
    run_dir = Path(args.out) if args.out else run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage(cfg, run_dir, force=True)
    print(
        f"wrote {run_dir / 'tokenizer.json'} ({tok.kind}, vocabulary {tok.vocab_size}, hash {tok.hash})"
    )
    return 0


def cmd_tokenize(args, overrides) -> int:
    """Tokenise the recipe's data sources into train/val token shards."""
    from lmforge.pretrain import run_dir_of, tokenize_stage, tokenizer_stage

    cfg = load_config(args.recipe, overrides)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage(cfg, run_dir)
    out = tokenize_stage(cfg, tok, run_dir, force=True)
    print(f"token shards in {out}")
    return 0


def cmd_pretrain(args, overrides) -> int:
    """Pre-train a model (next-token objective) from a recipe; --resume auto continues a run."""
    from lmforge.pretrain import pretrain
    from lmforge.train.dist import dist_info
    from lmforge.train.launch import cpu_process_count, relaunch

    cfg = load_config(args.recipe, overrides)
    n = cpu_process_count(cfg)
    if n > 1:
        argv = ["pretrain", *([args.recipe] if args.recipe else [])]
        argv += [
            *(["--resume", args.resume] if args.resume else []),
            *(f"--{o}" for o in overrides),
        ]
        return relaunch(n, argv, cfg)
    summary = pretrain(cfg, resume=args.resume)
    if not dist_info().is_main:
        return 0  # under torchrun, rank 0 reports
    if "val_bpb" in summary:
        print(
            f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, "
            f"val {summary['val_bpb']:.3f} bits/byte (unigram baseline {summary['unigram_bpb']:.3f})"
        )
    elif "val_pppl" in summary:  # masked LM
        print(
            f"done: step {summary['step']}, masked val loss {summary['val_loss']:.4f}, "
            f"pseudo-perplexity {summary['val_pppl']:.2f} (unigram baseline {summary['unigram_ppl']:.2f})"
        )
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
    from lmforge.pretrain import load_model

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


def cmd_report(args, overrides) -> int:
    """(Re)build the report card (report.html, report.md) of a run folder."""
    from lmforge.report import write_report

    paths = write_report(Path(args.run))
    print(f"wrote {paths['html']} and {paths['markdown']}")
    return 0


def cmd_compare(args, overrides) -> int:
    """Put several runs side by side: key metrics, and the config keys that differ."""
    from lmforge.report import compare_runs

    out = compare_runs(args.runs, args.out)
    print(f"wrote {out}")
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

    def add(name: str, fn: Callable, **kw) -> argparse.ArgumentParser:
        doc = _help(fn)
        p = sub.add_parser(name, help=summary_line(doc) or None, description=doc, **kw)
        p.set_defaults(func=fn)
        return p

    p = add("config", cmd_config)
    p.add_argument("recipe", nargs="?", default="quickstart", help="recipe file or built-in name")
    add("recipes", cmd_recipes)

    tk = sub.add_parser("tokenizer", help="Tokenizer commands: `lmforge tokenizer train`.")
    tk_sub = tk.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    doc = _help(cmd_tokenizer_train)
    p = tk_sub.add_parser("train", help=summary_line(doc), description=doc)
    p.set_defaults(func=cmd_tokenizer_train)
    p.add_argument("recipe", nargs="?", default="quickstart")
    p.add_argument("--out", default="", help="folder for tokenizer.json (default: the run folder)")

    p = add("tokenize", cmd_tokenize)
    p.add_argument("recipe", nargs="?", default="quickstart")

    p = add("pretrain", cmd_pretrain)
    p.add_argument("recipe", nargs="?", default="quickstart")
    p.add_argument(
        "--resume", default="", help="'auto' (newest valid checkpoint of the run) or a path"
    )

    p = add("generate", cmd_generate)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
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
    p.add_argument("--device", default="cpu")

    add("quickstart", cmd_quickstart)

    p = add("run", cmd_run)
    p.add_argument("recipe", help="recipe file or built-in name (see `lmforge recipes`)")
    p.add_argument("--only", default="", metavar="STAGE", help="run just this stage")
    p.add_argument(
        "--from", dest="start_from", default="", metavar="STAGE", help="rerun from this stage on"
    )

    p = add("report", cmd_report)
    p.add_argument("run", help="run folder")

    p = add("compare", cmd_compare)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="compare.html", help="HTML file to write")

    for module in EXTRA_COMMAND_MODULES:
        importlib.import_module(module).register(sub)
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
