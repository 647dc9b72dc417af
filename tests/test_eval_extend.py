"""Adding an eval task is one file: a task defined here, registered by name, runs through
`lmforge eval`, the one `evaluate()` and the in-loop hook, and its figures land in eval.json."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from lmforge.cli import main
from lmforge.eval.evaluate import evaluate_model
from lmforge.eval.results import Result, read_eval_json
from lmforge.eval.tasks import TASKS, EvalTask, TaskOptions, make_eval_hook, register_task
from lmforge.model_source import load_model
from lmforge.pretrain import pretrain

NAME = "next_token_acc"


def next_token_accuracy(model, tok, opts: TaskOptions) -> list[Result]:
    """Top-1 accuracy of the model's next-token guess over the first window of each line."""
    texts = [
        line for path in opts.data or [] for line in Path(path).read_text().splitlines() if line
    ]
    hits, total = 0, 0
    with torch.no_grad():
        for text in texts[: opts.limit or None]:
            ids = torch.tensor([tok.encode(text)[: model.cfg.context_length + 1]])
            guess = model(ids[:, :-1]).argmax(-1)
            hits += int((guess == ids[:, 1:]).sum())
            total += ids.shape[1] - 1
    return [Result(NAME, "acc", hits / total, len(texts), settings={"tokens": total})]


@pytest.fixture
def registered():
    register_task(EvalTask(NAME, next_token_accuracy))
    yield
    TASKS.pop(NAME)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extend")
    cfg = tiny_config(tmp, "train.max_steps=4", "train.eval_every=4", "train.checkpoint_every=4")
    pretrain(cfg)
    return tmp / "run", tmp / "lines.txt"


def _independent_accuracy(ckpt, lines):
    """The same figure computed here, outside lmforge's evaluation code."""
    model, tok, _ = load_model(ckpt)
    hits = total = 0
    for line in lines:
        ids = tok.encode(line)[: model.cfg.context_length + 1]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))[0]
        for pos, target in enumerate(ids[1:]):
            hits += int(int(logits[pos].argmax()) == target)
            total += 1
    return hits / total


def test_a_task_registered_in_a_test_runs_through_lmforge_eval(
    registered, checkpoint, tmp_path, capsys
):
    run_dir, data = checkpoint
    lines = ["First Citizen:", "Before we proceed any further, hear me speak."]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval.json"
    rc = main(
        ["eval", "--checkpoint", str(run_dir), "--task", NAME, "--task", "ppl",
         "--data", f"{NAME}={data}", "--data", f"ppl={data}", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert NAME in capsys.readouterr().out
    (run,) = read_eval_json(out)
    got = {(r.task, r.metric): r for r in run.results}
    assert {(NAME, "acc"), ("ppl", "bits_per_byte")} <= set(got)
    assert got[(NAME, "acc")].value == pytest.approx(_independent_accuracy(run_dir, lines))
    assert got[(NAME, "acc")].n == 2 and "seconds" in got[(NAME, "acc")].settings


def test_the_same_task_through_evaluate_and_the_in_loop_hook(registered, checkpoint):
    run_dir, data = checkpoint
    data.write_text("All:\nWe know't, we know't.\n")
    model, tok, _ = load_model(run_dir)
    (result,) = evaluate_model(model, tok, [NAME], TaskOptions(data=[str(data)]))
    hook = make_eval_hook(tok, NAME, data=[str(data)])
    assert hook(model, 4) == {f"{NAME}/acc": result.value}
    assert result.value == pytest.approx(
        _independent_accuracy(run_dir, ["All:", "We know't, we know't."])
    )


def test_an_unregistered_task_is_refused_by_name(checkpoint, capsys):
    run_dir, _ = checkpoint
    assert NAME not in TASKS
    assert main(["eval", "--checkpoint", str(run_dir), "--task", NAME]) == 1
    err = capsys.readouterr().err
    assert f"unknown task '{NAME}'" in err and "ppl" in err


def test_a_task_file_in_the_eval_package_registers_itself(tmp_path, monkeypatch):
    """What CONTRIBUTING describes: `lmforge/eval/task_NAME.py` is found and registered."""
    import lmforge.eval
    from lmforge.eval import registry, tasks

    (tmp_path / "task_echo_len.py").write_text(
        "from lmforge.eval.results import Result\n"
        "from lmforge.eval.registry import EvalTask, register_task\n\n\n"
        "def run(model, tok, opts):\n"
        "    return [Result('echo_len', 'n', float(len(opts.data)), 1)]\n\n\n"
        "register_task(EvalTask('echo_len', run))\n"
    )
    monkeypatch.setattr(lmforge.eval, "__path__", [*lmforge.eval.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "TASKS", dict(registry.TASKS))
    tasks._discover_task_modules()
    assert "echo_len" in registry.TASKS
    (result,) = registry.run_task(None, None, "echo_len", TaskOptions(data=["a", "b"]))
    assert result.value == 2.0
    sys.modules.pop("lmforge.eval.task_echo_len")
