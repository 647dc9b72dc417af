"""The `lmforge` command: one sub-command per stage.

Every sub-command that takes a recipe also takes dotted overrides of any config
key, e.g. ``lmforge pretrain shakespeare-char --train.lr=3e-4 --model.n_layers=6``.
Help texts come from the docstrings of the command functions.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.config import ConfigError, builtin_recipes, dump_yaml, load_config

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
    """Generate text from a checkpoint, streaming tokens as they come."""
    import torch

    from lmforge.model.generate import StreamDecoder, generate
    from lmforge.pretrain import load_model

    model, tok, _cfg = load_model(args.checkpoint, device=args.device)
    prompt_ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]
    stop = [tok.eot_id] if args.stop_at_eot else []
    stop += [tok.encode(s)[0] for s in args.stop or [] if tok.encode(s)]
    for n in range(args.num_samples):
        decoder = StreamDecoder(tok.decode)
        sys.stdout.write(args.prompt)

        def emit(col: torch.Tensor, decoder=decoder) -> None:
            sys.stdout.write(decoder.push(int(col[0])))
            sys.stdout.flush()

        generate(
            model,
            prompt_ids,
            args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=None if args.seed is None else args.seed + n,
            stop_ids=stop,
            on_token=emit,
        )
        sys.stdout.write("\n" + ("-" * 40 + "\n" if n + 1 < args.num_samples else ""))
    return 0


def cmd_quickstart(args, overrides) -> int:
    """Run the built-in default recipe: the Python standard library as corpus, pre-train,
    fine-tune (code → docstring), evaluate, audit bias, export and report, on CPU, in minutes.

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable, **kw) -> argparse.ArgumentParser:
        doc = _help(fn)
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc, **kw)
        p.set_defaults(func=fn)
        return p

    p = add("config", cmd_config)
    p.add_argument("recipe", nargs="?", default="quickstart", help="recipe file or built-in name")
    add("recipes", cmd_recipes)

    tk = sub.add_parser("tokenizer", help="tokenizer commands")
    tk_sub = tk.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    p = tk_sub.add_parser(
        "train", help=_help(cmd_tokenizer_train), description=_help(cmd_tokenizer_train)
    )
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
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stop", action="append", help="stop text (its first token); repeatable")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        rest, overrides = _split_overrides(argv)
        args = parser.parse_args(rest)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        from lmforge.malloc import tune_malloc

        tune_malloc()
        return int(args.func(args, overrides) or 0)
    except ConfigError as exc:
        print(f"lmforge: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. disk full while writing metrics or outputs
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"lmforge: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
