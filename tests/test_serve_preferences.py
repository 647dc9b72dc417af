"""A study's votes become a preference file (`lmforge serve --export-preferences`)."""

from __future__ import annotations

import json

from lmforge.cli import main
from lmforge.serve.preferences import preference_records
from lmforge.serve.store import Store, StudySettings

# Votes per prompt, as the canonical outcome: "a" prefers model A's text.
VOTES = {
    0: ["a", "a", "b"],  # kept: A, agreement 2/3
    1: ["b", "b", "b"],  # kept: B, agreement 1
    2: ["tie", "tie", "both_bad"],  # no decision
    3: ["a", "b", "tie"],  # split
    4: ["a", "tie", "tie"],  # A by one vote among three: agreement 1/3
}


def study(tmp_path):
    store = Store(tmp_path / "serve.sqlite")
    prompts = [f"prompt {i}" for i in VOTES]
    outputs = {(p, m): f"text of model {m} for prompt {p}" for p in VOTES for m in (0, 1)}
    sid = store.create_study(
        "pairs", prompts, [("A", "a/ckpt"), ("B", "b/ckpt")], StudySettings(), outputs
    )
    items = {r["prompt_idx"]: r["id"] for r in store.query("SELECT id, prompt_idx FROM items")}
    annotators = [store.annotator(store.add_annotator(sid, f"ann{k}")) for k in range(3)]
    for prompt, outcomes in VOTES.items():
        for k, (ann, outcome) in enumerate(zip(annotators, outcomes, strict=True)):
            item = items[prompt]
            a_left = store.left_is_a(ann.id, item)
            choice = {"a": "left" if a_left else "right", "b": "right" if a_left else "left"}
            store.record_vote(ann, item, f"v{prompt}-{k}", choice.get(outcome, outcome))
    return store, sid


def test_votes_become_weighted_pairs_and_the_rest_is_counted(tmp_path):
    store, sid = study(tmp_path)
    records, counts = preference_records(store, sid)
    assert counts == {"kept": 2, "no_decision": 1, "split": 1, "low_agreement": 1}
    by_prompt = {r["prompt"]: r for r in records}
    first, second = by_prompt["prompt 0"], by_prompt["prompt 1"]
    assert first["chosen"] == "text of model 0 for prompt 0"
    assert first["rejected"] == "text of model 1 for prompt 0"
    assert first["weight"] == round(2 / 3, 6) and first["votes"] == {
        "a": 2, "b": 1, "tie": 0, "both_bad": 0
    }  # fmt: skip
    assert second["chosen"] == "text of model 1 for prompt 1" and second["weight"] == 1.0
    assert second["models"] == {"chosen": "B", "rejected": "A"}
    strict, counts = preference_records(store, sid, min_agreement=0.7, weighted=False)
    assert [r["prompt"] for r in strict] == ["prompt 1"] and strict[0]["weight"] == 1.0
    assert counts["low_agreement"] == 2


def test_the_cli_writes_the_file_and_refuses_an_empty_export(tmp_path, capsys):
    store, sid = study(tmp_path)
    store.close()
    runs = tmp_path / "runs"
    runs.mkdir()
    out = tmp_path / "prefs.jsonl"
    db = str(tmp_path / "serve.sqlite")
    argv = ["serve", "--runs", str(runs), "--db", db, "--export-preferences", str(sid)]
    assert main([*argv, "--out", str(out)]) == 0
    assert "wrote 2 preference pairs" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["prompt"] for r in rows} == {"prompt 0", "prompt 1"}
    assert main([*argv, "--out", str(out), "--min-agreement", "1.01"]) == 1
    assert "min_agreement" in capsys.readouterr().err
    assert main([*argv]) == 1 and "needs --out" in capsys.readouterr().err
