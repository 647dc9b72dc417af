"""The arena → DPO → arena loop through the real web app.

Scripted annotators with a known taste (they prefer the answer with more vowels,
and slip now and then) vote over HTTP in a study of two checkpoints of a tiny model; the
votes become a preference file (`lmforge serve --export-preferences`); `lmforge finetune
--finetune.objective=dpo` tunes the base checkpoint on it; a second study puts the tuned
model against the base, and the same annotators vote again. The slow test tunes with the
`arena-dpo` recipe of `lmforge run` and prints the tuned model's win rate with its 95%
interval (the figure in BENCHMARKS.md); the default-suite test checks the mechanics.
"""

from __future__ import annotations

import html
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import shakespeare_snippet, tiny_config
from serve_helpers import ORGANISER_TOKEN, csrf_of, field, sign_in

from lmforge.cli import main
from lmforge.serve import create_app
from lmforge.serve.security import SecuritySettings
from lmforge.serve.store import Store

ANNOTATORS = ("ann0", "ann1", "ann2")
SLIP = 0.1  # each annotator votes against their taste on 10% of the items


def vowels(text: str) -> int:
    return sum(text.count(v) for v in "aeiou")


def taste(left: str, right: str, rng: random.Random) -> str:
    """The annotators' rule: the answer with more (lower-case) vowels wins; equal counts tie.
    `rng` decides the slips."""
    diff = vowels(left) - vowels(right)
    choice = "tie" if diff == 0 else ("left" if diff > 0 else "right")
    if choice != "tie" and rng.random() < SLIP:
        choice = {"left": "right", "right": "left"}[choice]
    return choice


@dataclass
class Loop:
    """Sizes of one run of the loop."""

    pretrain_steps: int = 60
    prompts_1: int = 60  # prompts of the first study (base checkpoints)
    prompts_2: int = 80  # prompts of the second study (base vs tuned)
    max_tokens: int = 24
    dpo_steps: int = 40
    dpo_beta: float = 0.5
    dpo_lr: float = 3e-3
    via: str = "finetune"  # "finetune" (lmforge finetune) or "run" (the arena-dpo recipe)


def pretrain_base(root: Path, size: Loop) -> Path:
    """A tiny char model with two checkpoints (half way and at the end) in root/runs/base."""
    from lmforge.pretrain import pretrain

    corpus = shakespeare_snippet(root, n_chars=60_000)
    half = size.pretrain_steps // 2
    cfg = tiny_config(
        root / "tmp",
        f"train.max_steps={size.pretrain_steps}",
        f"train.checkpoint_every={half}",
        f"train.eval_every={half}",
        "model.context_length=96",
        "train.tokens_per_step=1536",
        "train.micro_batch_size=8",
        "train.lr=3e-3",
        f"output.dir={root / 'runs' / 'base'}",
        corpus=corpus,
    )
    pretrain(cfg)
    return root / "runs"


def prompts(n: int, offset: int) -> list[str]:
    """Short opening words of tinyshakespeare lines, as the studies' prompts."""
    from lmforge.paths import shared_data

    lines = (shared_data() / "tinyshakespeare" / "input.txt").read_text().splitlines()
    words = [" ".join(s.split()[:3]) for s in lines if len(s.split()) >= 3]
    return list(dict.fromkeys(words))[offset : offset + n]


def run_study(client, app, csrf, name, checkpoints, texts, size, seed) -> int:
    """Create a study (the app generates the outputs), invite the annotators, let them vote."""
    data = {
        "csrf": csrf,
        "name": name,
        "prompts_text": "\n".join(texts),
        "checkpoints": checkpoints,
        "max_tokens": str(size.max_tokens),
        "temperature": "1.0",
        "top_p": "1.0",
        "seed": str(seed),
        "prompt_format": "chat",
    }
    r = client.post("/studies", data=data, follow_redirects=False)
    assert r.status_code == 303, r.text[:500]
    study_id = int(r.headers["location"].rsplit("/", 1)[1])
    deadline = time.monotonic() + 300
    while (p := client.get(f"/api/studies/{study_id}/progress").json())["status"] == "generating":
        assert time.monotonic() < deadline, p
        time.sleep(0.1)
    assert p["status"] == "ready", p
    r = client.post(
        f"/studies/{study_id}/annotators", data={"csrf": csrf, "names": "\n".join(ANNOTATORS)}
    )
    links = dict(re.findall(r'value="http://testserver(/a/[^"]+)" data-name="([^"]+)"', r.text))
    assert sorted(links.values()) == sorted(ANNOTATORS)
    for link, name_ in links.items():
        vote_all(app, link, study_id, name_)
    return study_id


def vote_all(app, link: str, study_id: int, name: str) -> None:
    """One annotator votes on every item of the study, through the vote page, by `taste`.
    Whether they slip on an item depends on their name and the item alone, whatever the
    order the app serves the items in, so a run of the loop is repeatable."""
    with TestClient(app) as ann:
        page = ann.get(link, follow_redirects=True).text
        while 'name="item_id"' in page:
            sides = re.findall(
                r'<pre class="text response" id="response-[ab]">(.*?)</pre>', page, re.S
            )
            assert len(sides) == 2, page[:2000]
            left, right = (html.unescape(s) for s in sides)
            item = field(page, "item_id")
            form = {
                "csrf": csrf_of(page),
                "item_id": item,
                "vote_uid": field(page, "vote_uid"),
                "choice": taste(left, right, random.Random(f"{name}-{item}")),
            }
            r = ann.post(f"/arena/{study_id}/vote", data=form, follow_redirects=True)
            assert r.status_code == 200, r.text[:500]
            page = r.text


TRAIN = [  # the DPO schedule of the loop (both ways of tuning)
    "--train.warmup_steps=2",
    "--train.micro_batch_size=8",
    "--train.tokens_per_step=768",
    "--train.log_every=5",
    "--train.dtype=fp32",
    "--train.peak_flops=1e11",
    "--model.context_length=96",  # the base model's; 8 rows of 96 tokens per step
]


def tune(runs: Path, base: Path, prefs: Path, size: Loop) -> Path:
    """DPO on the exported votes, from the base checkpoint, into a run inside the runs folder:
    with `lmforge finetune`, or with the `arena-dpo` recipe of `lmforge run` (which also
    evaluates and writes the report card). Returns the run folder."""
    schedule = [
        f"--finetune.dpo_beta={size.dpo_beta}",
        f"--train.max_steps={size.dpo_steps}",
        f"--train.lr={size.dpo_lr}",
        f"--train.eval_every={size.dpo_steps}",
        f"--train.checkpoint_every={size.dpo_steps}",
        *TRAIN,
    ]
    run = runs / "tuned"
    if size.via == "finetune":
        argv = ["finetune", "--checkpoint", str(base), "--train", str(prefs), "--out", str(run)]
        assert main([*argv, "--finetune.objective=dpo", *schedule]) == 0
    else:
        assert (
            main(
                [
                    "run",
                    "arena-dpo",
                    f"--finetune.init={base}",
                    f"--finetune.train_files=[{prefs}]",
                    f"--output.dir={run}",
                    "--eval.samples=1",
                    "--eval.sample_tokens=8",
                    *schedule,
                ]
            )
            == 0
        )
    return run


def run_loop(root: Path, size: Loop, capsys) -> dict:
    """The whole loop; returns the second study's figures and the files it wrote."""
    from lmforge.report import arena_win_rates

    runs = pretrain_base(root, size)
    db = root / "serve.sqlite"
    security = SecuritySettings(allowed_hosts=["testserver"])
    app = create_app(runs, db_path=db, organiser_token=ORGANISER_TOKEN, security=security)
    with TestClient(app) as client:
        csrf = sign_in(client)
        page = client.get("/studies/new").text
        base_ckpts = sorted(re.findall(r'name="checkpoints" value="([^"]+)"', page))
        assert len(base_ckpts) == 2, base_ckpts  # half way and final
        first = run_study(
            client, app, csrf, "base checkpoints", base_ckpts, prompts(size.prompts_1, 0), size, 1
        )
        prefs = root / "study.jsonl"
        argv = ["serve", "--runs", str(runs), "--db", str(db)]
        code = main([*argv, "--export-preferences", str(first), "--out", str(prefs)])
        exported = capsys.readouterr()
        assert code == 0, exported.err
        tuned_run = tune(runs, runs / base_ckpts[1], prefs, size)
        page = client.get("/studies/new").text
        tuned = [c for c in re.findall(r'name="checkpoints" value="([^"]+)"', page) if "tuned" in c]
        assert len(tuned) == 1, tuned
        texts = prompts(size.prompts_2, size.prompts_1)
        second = run_study(
            client, app, csrf, "base vs tuned", [base_ckpts[1], tuned[0]], texts, size, 2
        )
        (tuned_run / "arena").mkdir()
        for study, name in ((first, "1-before"), (second, "2-after")):
            csv_text = client.get(f"/studies/{study}/export.csv").text
            (tuned_run / "arena" / f"{name}.csv").write_text(csv_text)
    assert main(["report", str(tuned_run)]) == 0
    store = Store(db)
    try:
        models = store.study(second).models
        votes = [
            (v["prompt_idx"], v["label_a"], v["label_b"], v["outcome"]) for v in store.votes(second)
        ]
    finally:
        store.close()
    label = {m["checkpoint"]: m["label"] for m in models}[tuned[0]]
    (row,) = arena_win_rates(votes)
    if row["model"] != label:  # quoted from the side of the winner: turn it round
        row = {
            **row,
            "win_rate": 1 - row["win_rate"],
            "low": 1 - row["high"],
            "high": 1 - row["low"],
        }
    return {
        "prefs": prefs,
        "exported": exported.out,
        "tuned_run": tuned_run,
        "votes": len(votes),
        "report": (tuned_run / "report.md").read_text(),
        **{k: row[k] for k in ("items", "win_rate", "low", "high")},
    }


def report(out: dict) -> str:
    return (
        f"tuned vs base: win rate {out['win_rate']:.3f} "
        f"[95% Wilson CI {out['low']:.3f}, {out['high']:.3f}] over {out['items']} items "
        f"({out['votes']} votes)"
    )


def test_loop_mechanics_votes_export_dpo_and_a_second_study(tmp_path, capsys):
    size = Loop(pretrain_steps=4, prompts_1=8, prompts_2=4, max_tokens=16, dpo_steps=2)
    out = run_loop(tmp_path, size, capsys)
    rows = [json.loads(line) for line in out["prefs"].read_text().splitlines()]
    assert rows and f"wrote {len(rows)} preference pairs" in out["exported"]
    for r in rows:  # one record per decided item, the majority's choice as "chosen"
        assert set(r["models"].values()) == {"base@2", "base@4"}
        assert r["votes"]["a"] != r["votes"]["b"] and 0.5 <= r["weight"] <= 1.0
    metrics = [json.loads(x) for x in (out["tuned_run"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r][-1] == 2
    assert out["votes"] == len(ANNOTATORS) * size.prompts_2
    assert out["items"] == size.prompts_2 and out["low"] <= out["win_rate"] <= out["high"]
    # The report card's human-evaluation section quotes both studies, each with its interval.
    section = out["report"].split("## Human evaluation")[1].split("\n## ")[0]
    assert "| 1-before |" in section and "| 2-after |" in section and "tuned" in section
    print(report(out))


@pytest.mark.slow
def test_the_tuned_model_wins_the_annotators_over(tmp_path, capsys):
    out = run_loop(tmp_path, Loop(via="run"), capsys)
    rows = [json.loads(line) for line in out["prefs"].read_text().splitlines()]
    agree = sum(vowels(r["chosen"]) > vowels(r["rejected"]) for r in rows) / len(rows)
    with capsys.disabled():
        print(f"\n{len(rows)} pairs exported, {agree:.0%} follow the taste; {report(out)}")
    assert agree > 0.8
    assert out["low"] > 0.5, report(out)


def test_an_empty_answer_is_a_pair_to_tune_on(tmp_path):
    """A model that stops at once leaves an empty output in a study; its pair still trains
    (the answer is then its closing <|end|> alone)."""
    from lmforge.finetune.preference import load_pairs
    from lmforge.tokenizer import train_char

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "ROMEO:", "chosen": "a rose", "rejected": ""}) + "\n")
    (pair,) = load_pairs(train_char(["ROMEO: a rose"]), [str(data)])
    chosen, rejected = pair
    assert sum(rejected.trained) == 1 and sum(chosen.trained) == len("a rose") + 1


def test_win_rates_count_each_item_once_by_its_majority():
    """`arena_win_rates` against a hand count and scipy's Wilson interval."""
    from scipy.stats import binomtest

    from lmforge.report import arena_win_rates

    votes = []
    # 12 items of "new" vs "old", 3 votes each, in both canonical orders of the pair:
    # items 0-8 won by "new" (2-1 or 3-0), items 9-10 by "old", item 11 tied 1-1-tie.
    for item in range(12):
        a, b = ("new", "old") if item % 2 else ("old", "new")
        new_votes = 3 if item < 5 else 2 if item < 9 else 1
        outcomes = ["new"] * new_votes + ["old"] * (3 - new_votes)
        if item == 11:
            outcomes = ["new", "old", "tie"]
        for o in outcomes:
            votes.append((item, a, b, o if o == "tie" else ("a" if o == a else "b")))
    # and one pair of other models, which "old" loses: quoted from the winner's side
    votes += [(20, "old", "x", "b"), (21, "x", "old", "a"), (22, "old", "x", "both_bad")]
    by_model = {r["model"]: r for r in arena_win_rates(votes)}
    new, x = by_model["new"], by_model["x"]
    assert (new["items"], new["votes"], new["wins"], new["losses"]) == (12, 36, 9, 2)
    assert new["undecided"] == 1 and new["win_rate"] == 9.5 / 12 and new["against"] == "old"
    assert (x["wins"], x["losses"], x["win_rate"]) == (2, 0, 2.5 / 3)
    # Wilson's interval of scipy at a whole count: the tied item taken out (11 items,
    # 9 won); both are a few float64 operations, so they agree to rounding.
    decided = [v for v in votes if v[0] != 11 and "x" not in v[1:3]]
    ci = binomtest(9, 11).proportion_ci(method="wilson")
    row = arena_win_rates(decided)[0]
    assert (row["items"], row["wins"]) == (11, 9)
    assert row["low"] == pytest.approx(ci.low, rel=1e-12) and row["high"] == pytest.approx(
        ci.high, rel=1e-12
    )


def test_the_report_names_a_file_that_is_no_vote_export(tmp_path):
    from lmforge.report import write_report

    (tmp_path / "arena").mkdir()
    (tmp_path / "arena" / "binary.csv").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "arena" / "other.csv").write_text("name,score\nx,1\n")
    md = write_report(tmp_path)["markdown"].read_text()
    section = md.split("## Human evaluation")[1].split("\n## ")[0]
    assert "| binary | could not be read as a UTF-8 CSV file" in section
    assert "| other | not a vote export (no column 'item') |" in section
