"""Sub-commands `lmforge plan` and `lmforge scale` (registered from `cli.EXTRA_COMMAND_MODULES`)."""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from lmforge.config import load_config, parse_overrides
from lmforge.energy import GRID_KG_PER_KWH, PUE
from lmforge.fileio import read_json_lines
from lmforge.plan import (
    Costs,
    Hardware,
    PlanError,
    cpu_device,
    find_device,
    format_plan,
    format_presets,
    list_presets,
    load_law,
    make_plan,
    model_config,
    parse_gpus,
    parse_quantity,
    recommend,
)


def cmd_plan(args, overrides) -> int:
    """Parameters, FLOPs, memory, time, cost and CO2 of a training run; or the compute-optimal
    model for a budget.

    Examples:
      lmforge plan --list
      lmforge plan --preset llama-8b --gpus 8xH100 --tokens 1T
      lmforge plan --budget '$500' --gpu H100
      lmforge plan --preset gpt2-124m --gpu cpu --tokens 10M --dtype fp32
      lmforge plan shakespeare-char --model.n_layers=6 --gpu cpu --hours 1
    """
    try:
        return _plan(args, overrides)
    except PlanError as exc:
        raise ValueError(str(exc)) from None


def _plan(args, overrides) -> int:
    if args.list:
        rows = list_presets(args.vocab)
        print(json.dumps(rows, indent=1) if args.json else format_presets(rows))
        return 0
    count, name = 1, args.gpu or ""
    if args.gpus:
        count, gname = parse_gpus(args.gpus)
        name = gname or name
    if not name:
        name = "cpu"
    device = cpu_device(args.dtype) if name.lower() == "cpu" else find_device(name)
    hw = Hardware(device, count=count, nodes=args.nodes, dtype=args.dtype)
    target: dict[str, Any] = {}
    for key in ("tokens", "flops", "hours", "budget"):
        value = getattr(args, key)
        if value:
            target[key] = parse_quantity(value, f"--{key}")
    common: dict[str, Any] = dict(
        mfu=_mfu(args, hw),
        costs=Costs(args.price, args.power_w, args.pue, args.grid),
        fsdp=None if args.fsdp == "auto" else args.fsdp == "on",
    )
    has_model = bool(args.preset or args.recipe or overrides)
    if not has_model:
        if not target or "tokens" in target:
            raise PlanError(
                "give a model (--preset or a recipe) or a budget (--budget/--hours/--flops)"
            )
        law = load_law(args.law) if args.law else None
        plan = recommend(
            hw,
            vocab_size=args.vocab or 32000,
            seq_len=args.seq_len or 2048,
            micro_batch=args.micro_batch,
            law=law,
            **target,
            **common,
        )
    else:
        cfg = _model_from_args(args, overrides)
        plan = make_plan(cfg, hw, args.seq_len, args.micro_batch, **target, **common, tp=args.tp)
    print(json.dumps(asdict(plan), indent=1) if args.json else format_plan(plan))
    return 0


def _mfu(args, hw: Hardware) -> float:
    """--mfu as a fraction, or the median MFU logged by a finished run (--measured RUN_DIR).

    A run's MFU is relative to the peak it measured or assumed (summary.json's
    `peak_flops`); on CPU, whose peak this command measures again, the run's achieved
    FLOP/s are carried over instead, so a different peak reading does not change the time.
    """
    if args.measured:
        import numpy as np

        path = Path(args.measured)
        run_dir = path if path.is_dir() else path.parent
        path = path / "metrics.jsonl" if path.is_dir() else path
        values = [r["mfu"] for r in read_json_lines(path) if r.get("mfu")]
        if not values:
            raise PlanError(f"{path}: no MFU records")
        mfu = float(np.median(values))
        summary = run_dir / "summary.json"
        if hw.device.name == "cpu" and summary.exists():
            run_peak = float(json.loads(summary.read_text()).get("peak_flops") or 0.0)
            if run_peak and hw.peak_per_device:
                mfu *= run_peak / hw.peak_per_device
        return mfu
    mfu = args.mfu
    if mfu and mfu > 1:
        mfu /= 100  # "40" means 40%
    return mfu or 0.0


def _model_from_args(args, overrides):
    if args.recipe:
        extra = [f"model.preset={args.preset}"] if args.preset else []
        cfg = load_config(args.recipe, extra + overrides).model
        return replace(cfg, vocab_size=args.vocab or cfg.vocab_size or 32000)
    fields: dict[str, Any] = dict(parse_overrides(overrides).get("model", {}))
    return model_config(args.preset, vocab_size=args.vocab, **fields)


def cmd_scale(args, overrides) -> int:
    """Fit a scaling law L(N, D) = E + A/N^α + B/D^β on your data and predict a larger run.

    Trains an iso-FLOP ladder of small models (each a `pretrain` run under OUT/rungs/),
    fits the law with bootstrap intervals, predicts a held-out larger rung, trains it,
    and writes OUT/scale.json and OUT/scale.png. Rerunning skips finished rungs.
    """
    from lmforge.scale import scale

    cfg = load_config(args.recipe, overrides)
    budgets = [parse_quantity(b, "--budgets") for b in args.budgets.split(",")]
    report = scale(
        cfg,
        args.out,
        budgets,
        predict_flops=parse_quantity(args.predict_flops, "--predict-flops")
        if args.predict_flops
        else 0.0,
        bootstrap_samples=args.bootstrap,
        held_out=args.held_out,
    )
    h = report["held_out"]
    b = report["bootstrap"]["prediction"]
    print(
        f"held-out rung {h['name']}: predicted {h['predicted']:.4f} "
        f"(90% interval {b['p05']:.4f}–{b['p95']:.4f}), measured {h['val_loss']:.4f}, "
        f"error {100 * h['relative_error']:+.2f}%; {report['wall_s'] / 60:.1f} min in all; "
        f"{args.out}/scale.json, {args.out}/scale.png"
    )
    return 0


def _help(fn: Any) -> str:
    return inspect.getdoc(fn) or ""


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help=_help(cmd_plan).splitlines()[0],
        description=_help(cmd_plan),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_plan)
    p.add_argument("recipe", nargs="?", default="", help="recipe whose model to plan (optional)")
    p.add_argument("--list", action="store_true", help="list the model presets")
    p.add_argument("--preset", default="", help="model preset (see --list)")
    p.add_argument(
        "--gpu",
        default="",
        help="device type: H100, H200, A100-80, A100-40, L40S, A10, RTX4090, cpu",
    )
    p.add_argument("--gpus", default="", help="COUNTxTYPE per node, e.g. 8xH100")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument(
        "--seq-len", type=int, default=0, help="sequence length (default: the model's context)"
    )
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per device per micro-step")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size when the preset has none")
    p.add_argument("--tokens", default="", help="target: training tokens (1T, 300B, 2.5e9)")
    p.add_argument("--flops", default="", help="target: training FLOPs (1e21)")
    p.add_argument("--hours", default="", help="target: wall-clock hours")
    p.add_argument("--budget", default="", help="target: money, e.g. '$500'")
    p.add_argument("--mfu", type=float, default=0.0, help="model FLOP utilisation (0.4 or 40)")
    p.add_argument("--measured", default="", help="run folder or metrics.jsonl: use its median MFU")
    p.add_argument("--price", type=float, default=None, help="$ per device-hour")
    p.add_argument(
        "--power-w", type=float, default=None, help="watts per device (default: board power)"
    )
    p.add_argument("--pue", type=float, default=PUE, help="data-centre power usage effectiveness")
    p.add_argument(
        "--grid", type=float, default=GRID_KG_PER_KWH, help="grid intensity, kg CO2e per kWh"
    )
    p.add_argument(
        "--fsdp",
        choices=["auto", "on", "off"],
        default="auto",
        help="shard weights/grads/optimizer over devices (auto: when >1 device)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size within a node (FSDP across the groups); "
        "without it, the plan suggests one when FSDP alone does not fit",
    )
    p.add_argument(
        "--law", default="", help="scale.json from `lmforge scale`: size with the fitted law"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("scale", help=_help(cmd_scale).splitlines()[0], description=_help(cmd_scale))
    p.set_defaults(func=cmd_scale)
    p.add_argument("recipe", nargs="?", default="shakespeare-char", help="recipe naming the data")
    p.add_argument("--out", default="runs/scale", help="output folder")
    p.add_argument(
        "--budgets", default="3e10,1e11,3e11", help="comma-separated ladder budgets (FLOPs)"
    )
    p.add_argument(
        "--predict-flops", default="", help="held-out rung budget (default 3× the largest)"
    )
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits for the intervals")
    p.add_argument(
        "--held-out",
        choices=["optimal", "larger"],
        default="optimal",
        help="held-out shape: compute-optimal by the fit, or larger than every rung",
    )
