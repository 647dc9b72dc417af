"""The bias steps of `lmforge prepare` (stage 3, after deduplication and mixing).

Importing this module registers them, and the packaged CrowS-Pairs sentences as the
decontamination set ``crows_pairs``, in `lmforge.data.registry` (which lists this
module among its plug-ins): `data` never imports `bias`.

Order: counterfactual augmentation (``prepare.cda_ratio`` > 0), then term
statistics (``prepare.bias_statistics``), so the statistics describe the
documents as they are written. Both run after deduplication because a
counterfactual copy is a near-duplicate of its original by design.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lmforge.bias.lexicon import Lexicon, load_lexicon
from lmforge.config import PrepareConfig
from lmforge.data.registry import register_builder, register_eval_set
from lmforge.data.report import register_report_section
from lmforge.data.steps import DropHook, Step

_LEXICONS: dict[str, Lexicon] = {}  # one parsed lexicon per worker process


def lexicon_for(cfg: PrepareConfig) -> Lexicon:
    if cfg.bias_lexicon not in _LEXICONS:
        _LEXICONS[cfg.bias_lexicon] = load_lexicon(cfg.bias_lexicon or None)
    return _LEXICONS[cfg.bias_lexicon]


def bias_steps(cfg: PrepareConfig, on_drop: DropHook | None = None) -> list[Step]:
    from lmforge.bias.cda import CounterfactualAugmentStep
    from lmforge.bias.stats import BiasStatisticsStep

    steps: list[Step] = []
    if cfg.cda_ratio > 0:
        steps.append(
            CounterfactualAugmentStep(
                lexicon_for(cfg),
                cfg.cda_ratio,
                cfg.cda_mode,
                cfg.cda_axes,
                cfg.cda_names,
                cfg.seed,
                on_drop,
            )
        )
    if cfg.bias_statistics:
        steps.append(BiasStatisticsStep(lexicon_for(cfg), cfg.bias_window, on_drop))
    return steps


def report_markdown(section: dict[str, Any]) -> str:
    """The ``bias`` section of data_report.md: the term statistics ("" without them)."""
    from lmforge.bias.stats import render_markdown

    return render_markdown(section["statistics"]) if "statistics" in section else ""


@register_report_section("bias", report_markdown)
def report_section(cfg: PrepareConfig, steps: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The ``bias`` section of data_report.json from the merged step statistics.

    The raw co-occurrence counters (thousands of keys) move out of the step's entry
    in the report's step table into this summary.
    """
    from lmforge.bias.stats import summarize

    section: dict[str, Any] = {}
    if "bias_statistics" in steps:
        st = steps["bias_statistics"]
        section["statistics"] = summarize(st["counters"], lexicon_for(cfg), cfg.bias_window)
        st["counters"] = {}
    if "cda" in steps:
        c = steps["cda"]["counters"]
        top = sorted(
            ((k.split(":", 1)[1], v) for k, v in c.items() if k.startswith("swap:")),
            key=lambda kv: -kv[1],
        )
        section["cda"] = {
            "ratio": cfg.cda_ratio,
            "mode": cfg.cda_mode,
            "axes": cfg.cda_axes,
            "names": cfg.cda_names,
            **{k: v for k, v in c.items() if not k.startswith("swap:")},
            "top_swaps": dict(top[:20]),
        }
    return section or None


def crows_pairs_texts() -> Iterator[str]:
    """Both sentences of each packaged CrowS-Pairs pair (a decontamination set)."""
    from lmforge.bias.pairs import load_crows_pairs  # imports torch: only when used

    for pair in load_crows_pairs():
        yield from pair.sentences


register_builder("post_dedup", bias_steps)
register_eval_set("crows_pairs", crows_pairs_texts)
register_eval_set("crows-pairs", crows_pairs_texts)
