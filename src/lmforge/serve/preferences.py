"""A study's votes as a preference file: what `lmforge finetune` tunes on with DPO or SimPO.

One record per (prompt, pair of models) that the annotators decided:
``{"prompt", "chosen", "rejected", "weight", "votes": {"a", "b", "tie", "both_bad"},
"models": {"chosen", "rejected"}, "study", "prompt_idx"}``.

How votes become records, as a user would choose (`lmforge serve --export-preferences`):

- "A" and "B" votes decide; a tie or "both bad" prefers neither text, so an item with
  only those is dropped (``no_decision``). DPO needs a better and a worse answer.
- An item whose A and B votes are equal is dropped (``split``).
- **Agreement** is the winner's share of the item's votes, ties included ("both bad"
  left out: it says nothing about the order of the two). Items below `min_agreement`
  are dropped (``low_agreement``); the default 0.5 keeps every item with a majority.
- **weight** is that agreement, for trainers that weigh pairs: an item decided 3 to 0
  counts more than one decided 2 to 1. `weighted=False` writes weight 1 for every pair.

The counts of kept and dropped items, by reason, come back with the records.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lmforge.fileio import write_text_atomic
from lmforge.serve.store import Store


def preference_records(
    store: Store, study_id: int, min_agreement: float = 0.5, weighted: bool = True
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(records, counts) for study `study_id`; see the module docstring."""
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement = {min_agreement} must be within [0, 1]")
    study = store.study(study_id)
    if study is None:
        raise ValueError(f"there is no study {study_id}")
    prompts = store.prompts(study_id)
    outputs = {
        (r["prompt_idx"], r["model_idx"]): r["text"]
        for r in store.query(
            "SELECT prompt_idx, model_idx, text FROM outputs WHERE study_id = ?", (study_id,)
        )
    }
    labels = {m["idx"]: m["label"] for m in study.models}
    tallies: dict[tuple[int, int, int], Counter] = {}
    for v in store.votes(study_id):
        key = (v["prompt_idx"], v["model_a"], v["model_b"])
        tallies.setdefault(key, Counter())[v["outcome"]] += 1
    records: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    for (prompt_idx, model_a, model_b), votes in sorted(tallies.items()):
        a, b, tie = votes["a"], votes["b"], votes["tie"]
        if a + b == 0:
            counts["no_decision"] += 1
            continue
        if a == b:
            counts["split"] += 1
            continue
        agreement = max(a, b) / (a + b + tie)
        if agreement < min_agreement:
            counts["low_agreement"] += 1
            continue
        win, lose = (model_a, model_b) if a > b else (model_b, model_a)
        records.append(
            {
                "prompt": prompts[prompt_idx],
                "chosen": outputs[(prompt_idx, win)],
                "rejected": outputs[(prompt_idx, lose)],
                "weight": round(agreement, 6) if weighted else 1.0,
                "votes": {k: votes[k] for k in ("a", "b", "tie", "both_bad")},
                "models": {"chosen": labels[win], "rejected": labels[lose]},
                "study": study_id,
                "prompt_idx": prompt_idx,
            }
        )
        counts["kept"] += 1
    return records, dict(counts)


def export_preferences(
    store: Store, study_id: int, out: str | Path, min_agreement: float = 0.5, weighted: bool = True
) -> dict[str, int]:
    """Write the study's preference records as JSONL at `out` (atomically); returns the counts."""
    records, counts = preference_records(store, study_id, min_agreement, weighted)
    if not records:
        raise ValueError(
            f"study {study_id}: no item has a preference to export ({counts or 'no votes yet'})"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return counts
