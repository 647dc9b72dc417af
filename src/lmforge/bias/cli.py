"""`lmforge bias`: audit checkpoints (CrowS-Pairs, minimal pairs, probes) and text data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmforge.cli_args import add_checkpoint_arg, add_command


def cmd_bias(args: argparse.Namespace, overrides: list[str]) -> int:
    """Bias audit: CrowS-Pairs and other minimal pairs, template probes, data statistics.

    Several --checkpoint flags compare runs side by side (each against the first,
    with paired bootstrap intervals); results go to bias.json. Examples:

      lmforge bias --checkpoint runs/base --checkpoint runs/cda
      lmforge bias --checkpoint runs/a --pairs crows_pairs --pairs mine=pairs.jsonl
      lmforge bias --data docs/ --data more.jsonl        # data-side statistics only
      lmforge bias --data a.jsonl --data b.jsonl --balance gender   # source weights
      lmforge bias --dump-lexicon words.yaml             # edit, then --lexicon words.yaml
    """
    from lmforge.bias.lexicon import dump_lexicon, load_lexicon

    if overrides:
        raise ValueError(f"lmforge bias takes no config overrides (got {overrides})")
    lexicon = load_lexicon(args.lexicon or None)
    if args.dump_lexicon:
        dump_lexicon(lexicon, args.dump_lexicon)
        print(f"wrote {args.dump_lexicon}")
        return 0
    if not args.checkpoint and not args.data:
        raise ValueError("lmforge bias needs --checkpoint (model audit) and/or --data (statistics)")
    report: dict[str, Any] = {}
    if args.checkpoint:
        from lmforge.bias.audit import bias_audit, format_report
        from lmforge.bias.probes import load_probe_spec

        report = bias_audit(
            args.checkpoint,
            args.pairs or ["crows_pairs"],
            limit=args.limit,
            probes=not args.no_probes,
            lexicon=lexicon,
            spec=load_probe_spec(args.probes or None),
            axes=args.axis or None,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            device=args.device,
        )
        print(format_report(report), end="")
    if args.data:
        from lmforge.bias.stats import bias_statistics, render_markdown
        from lmforge.data.sources import iter_documents

        stats = bias_statistics(iter_documents(args.data), lexicon, args.window)
        report.setdefault("lmforge_bias", 1)
        report["data"] = {"sources": args.data, "statistics": stats}
        print(render_markdown(stats), end="")
        if args.balance:
            from lmforge.bias.stats import balancing_weights

            bal = balancing_weights(stats, args.balance)
            report["data"]["balancing_weights"] = bal
            print(
                f"{args.balance}: {bal['group']} share {bal['share_before']:.3f} → "
                f"{bal['share_after']:.3f} with source weight factors "
                + ", ".join(f"{k} ×{v:.3g}" for k, v in bal["weights"].items())
            )
    from lmforge.bias.audit import write_bias_json

    if args.out:
        out = Path(args.out)
    elif args.checkpoint:
        out = Path(args.checkpoint[0]) / "bias.json"
    else:
        out = Path("bias.json")
    write_bias_json(out, report)
    print(f"wrote {out}")
    return 0


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "bias", cmd_bias, raw=True)
    add_checkpoint_arg(p, required=False, repeatable=True)
    p.add_argument(
        "--pairs",
        action="append",
        metavar="crows_pairs|[NAME=]PATH",
        help="minimal-pairs benchmark: crows_pairs (default) or a CSV/JSONL file; repeatable",
    )
    p.add_argument("--limit", type=int, default=0, help="first N sets per benchmark (0 = all)")
    p.add_argument("--no-probes", action="store_true", help="skip the template probes")
    p.add_argument("--probes", default="", help="YAML/JSON probe spec (subjects, templates)")
    p.add_argument("--axis", action="append", help="probe axis (gender, religion, ...); repeatable")
    p.add_argument(
        "--samples", type=int, default=3, help="continuations per prompt: 1 greedy + N−1 sampled"
    )
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", action="append", help="text source for data statistics; repeatable")
    p.add_argument("--window", type=int, default=0, help="co-occurrence window (0 = sentence)")
    p.add_argument(
        "--balance",
        default="",
        metavar="AXIS",
        help="with --data: source weight factors that balance a two-group axis (e.g. gender)",
    )
    p.add_argument("--lexicon", default="", help="YAML/JSON word lists (see --dump-lexicon)")
    p.add_argument("--dump-lexicon", default="", metavar="FILE", help="write the word lists")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="bias.json path (default: in the first checkpoint)")


def load_bias_json(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("lmforge_bias") != 1:
        raise ValueError(f"{path}: not an lmforge bias.json")
    return data
