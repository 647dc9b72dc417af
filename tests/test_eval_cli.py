"""`lmforge eval` on real checkpoints, and the in-loop hook logged beside the loss."""

import json
from dataclasses import replace

import pytest
from helpers import tiny_config

from lmforge.cli import main
from lmforge.eval.results import read_eval_json
from lmforge.eval.tasks import TaskOptions, make_eval_hook, run_task
from lmforge.pretrain import (
    build_model,
    load_model,
    model_config_for,
    tokenize_stage,
    tokenizer_stage,
)
from lmforge.shards import TokenLoader
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.loop import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """8 steps of a tiny char model with two in-loop hooks; checkpoints at steps 4 and 8."""
    tmp = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_config(tmp, "train.eval_every=4")
    run_dir = tmp / "run"
    run_dir.mkdir()
    tok = tokenizer_stage(cfg, run_dir)
    tokens = tokenize_stage(cfg, tok, run_dir)
    cfg = replace(cfg, model=model_config_for(cfg, tok))
    text = tmp / "held_out.txt"
    text.write_text(
        "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs?\n"
    )
    mc = tmp / "mc.jsonl"
    rows = [
        {"context": "First Citizen:\nSpeak,", "choices": ["speak.", "zzzz."], "label": 0},
        {"context": "All:\nWe know", "choices": ["qqq", "'t, we know't."], "label": 1},
        {"context": "", "choices": ["the", "xq"], "label": 0},
    ]
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hooks = [
        make_eval_hook(tok, "ppl", data=[str(text)], stride=16),
        make_eval_hook(tok, ["mc"], every=8, data=[str(mc)]),
    ]
    model = build_model(cfg.model, cfg.train.seed)
    loader = TokenLoader(tokens, "train", cfg.model.context_length, cfg.train.seed)
    val = TokenLoader(tokens, "val", cfg.model.context_length, cfg.train.seed)
    trainer = Trainer(
        cfg,
        model,
        run_dir,
        loader,
        val_data=lambda: val.sequential(cfg.train.eval_tokens, cfg.train.micro_batch_size),
        eval_hooks=hooks,
        extra_files={"tokenizer.json": tok.to_json().encode("utf-8")},
        log=lambda *_: None,
    )
    trainer.fit()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, text, mc, records


def test_hook_metrics_are_logged_beside_the_loss(trained):
    _run_dir, _text, _mc, records = trained
    evals = {r["step"]: r for r in records if "val_loss" in r}
    assert {4, 8} <= set(evals)
    assert "ppl/bits_per_byte" in evals[4] and "mc/acc" not in evals[4]  # every=8
    assert {"ppl/bits_per_byte", "ppl/perplexity", "mc/acc", "mc/acc_norm"} <= set(evals[8])


def test_cli_two_checkpoints_side_by_side(trained, tmp_path, capsys):
    run_dir, text, mc, records = trained
    ckpts = list_checkpoints(run_dir)
    assert len(ckpts) >= 2
    a, b = ckpts[-2], ckpts[-1]
    out = tmp_path / "eval.json"
    rc = main(
        ["eval", "--checkpoint", str(a), "--checkpoint", str(b), "--task", "ppl",
         "--data", f"ppl={text}", "--stride", "16", "--task", "mc", "--data", f"mc={mc}",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert a.name in printed and b.name in printed and "bits_per_byte" in printed
    runs = read_eval_json(out)
    assert [r.checkpoint for r in runs] == [str(a), str(b)]
    got = {(r.task, r.metric): r for r in runs[1].results}
    assert set(got) == {("ppl", m) for m in ("loss", "perplexity", "bits_per_byte")} | {
        ("mc", m) for m in ("acc", "acc_norm", "acc_bytes")
    }
    assert got[("mc", "acc")].n == 3 and got[("mc", "acc")].stderr is not None
    assert got[("ppl", "bits_per_byte")].settings["bytes"] == len(text.read_text().encode())
    # The last checkpoint's figures equal what the in-loop hook logged at that step.
    step = int(b.name.split("_")[-1])
    logged = [r for r in records if r.get("step") == step and "ppl/bits_per_byte" in r][-1]
    assert got[("ppl", "bits_per_byte")].value == pytest.approx(
        logged["ppl/bits_per_byte"], rel=1e-6
    )
    assert got[("mc", "acc")].value == pytest.approx(logged["mc/acc"])


def test_run_task_errors_are_clear(trained, capsys):
    run_dir, _text, _mc, _ = trained
    model, tok, _cfg = load_model(run_dir)
    with pytest.raises(ValueError, match="unknown task"):
        run_task(model, tok, "nope", TaskOptions())
    with pytest.raises(ValueError, match="needs --data"):
        run_task(model, tok, "mc", TaskOptions())
    rc = main(["eval", "--checkpoint", str(run_dir), "--task", "ppl", "--data", "mc=x.jsonl"])
    assert rc == 1 and "task 'mc' is not among --task" in capsys.readouterr().err


def test_hooks_run_without_validation_data(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.eval_every=2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tok = tokenizer_stage(cfg, run_dir)
    tokens = tokenize_stage(cfg, tok, run_dir)
    cfg = replace(cfg, model=model_config_for(cfg, tok))
    text = tmp_path / "t.txt"
    text.write_text("First Citizen:\nSpeak, speak.\n")
    loader = TokenLoader(tokens, "train", cfg.model.context_length, cfg.train.seed)
    hook = make_eval_hook(tok, "ppl", data=[str(text)])
    model = build_model(cfg.model, cfg.train.seed)
    Trainer(cfg, model, run_dir, loader, eval_hooks=[hook], log=lambda *_: None).fit()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "ppl/bits_per_byte" in r] == [2, 4]


def test_an_lm_eval_task_through_the_cli_scores_as_our_own_scorer(trained, tmp_path, capsys):
    """`--task lm-eval:NAME` runs lm-eval's pipeline (its prompts, its metrics) through the
    lmforge adapter; on the same items it must agree with our independent scorer."""
    from helpers import require_interop

    from lmforge.eval.lm_eval_bridge import write_lm_eval_task
    from lmforge.eval.multiple_choice import load_mc_jsonl

    require_interop("lm_eval", "lm-eval")
    run_dir, _text, mc, _ = trained
    write_lm_eval_task(load_mc_jsonl(mc), tmp_path / "tasks", "lmf_cli_mc")
    out = tmp_path / "eval.json"
    rc = main(
        ["eval", "--checkpoint", str(run_dir), "--task", "lm-eval:lmf_cli_mc",
         "--lm-eval-include", str(tmp_path / "tasks"), "--task", "mc", "--data", f"mc={mc}",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    got = {(r.task, r.metric): r for r in read_eval_json(out)[0].results}
    for metric in ("acc", "acc_norm"):
        theirs, ours = got[("lm-eval:lmf_cli_mc", metric)], got[("mc", metric)]
        assert theirs.n == ours.n == 3
        assert theirs.value == pytest.approx(ours.value)
    assert main(["eval", "--checkpoint", str(run_dir), "--task", "lm-eval:"]) == 1
    assert "unknown task 'lm-eval:'" in capsys.readouterr().err


def test_fewshot_multiple_choice_prepends_other_solved_items(trained):
    from lmforge.eval.multiple_choice import load_mc_jsonl, score_items
    from lmforge.eval.tasks import with_fewshot

    run_dir, _text, mc, _ = trained
    model, tok, _cfg = load_model(run_dir)
    items = load_mc_jsonl(mc)
    shots = with_fewshot(items, 2, seed=3)
    for i, (it, shot) in enumerate(zip(items, shots, strict=True)):
        assert shot.context.endswith("\n\n" + it.context) and shot.choices == it.choices
        others = [o for j, o in enumerate(items) if j != i]
        for o in others:  # with 3 items and 2 shots, the shots are the two others, solved
            assert f"{o.context} {o.choices[o.label]}\n\n" in shot.context
        assert it.choices[it.label] not in shot.context.removesuffix(it.context) or any(
            it.choices[it.label] in o.choices[o.label] for o in others
        )
    assert with_fewshot(items, 2, seed=3) == shots  # deterministic
    results = run_task(model, tok, "mc", TaskOptions(data=[str(mc)], num_fewshot=2, seed=3))
    acc = next(r for r in results if r.metric == "acc")
    expected = score_items(model, tok, shots)
    assert acc.value == pytest.approx(expected.accuracy()) and acc.settings["num_fewshot"] == 2
    with pytest.raises(ValueError, match="needs more than 3 items"):
        with_fewshot(items, 3, seed=0)


def test_fewshot_generation_prompts_carry_other_solved_exchanges(tmp_path):
    from lmforge.eval.generation import finetune_task
    from lmforge.tokenizer import train_bpe

    rows = [{"source": f"paper {i} about topic {i}", "target": f"tldr{i}"} for i in range(5)]
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe([json.dumps(r) for r in rows] * 20, 300)
    zero = finetune_task(tok, "summarization", str(data))
    two = finetune_task(tok, "summarization", str(data), num_fewshot=2, seed=1)
    for i, (a, b) in enumerate(zip(zero.prompts, two.prompts, strict=True)):
        text = tok.decode(b)
        assert b[-len(a) :] == a  # the item's own prompt comes last, unchanged
        assert f"tldr{i}" not in text and text.count("tldr") == 2  # two other answers
    assert (
        finetune_task(tok, "summarization", str(data), num_fewshot=2, seed=1).prompts == two.prompts
    )
