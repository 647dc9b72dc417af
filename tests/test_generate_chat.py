"""A fine-tuned chat model is sampled through its chat template and stops at the end of its
turn: from Python, `lmforge generate`, `lmforge chat` and the run's samples."""

from __future__ import annotations

import json
import re

import pytest

from lmforge.config import load_config

QA = [("say hi", "hi"), ("say no", "no"), ("say ok", "ok"), ("say yes", "yes")]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A 1-layer character model fine-tuned from scratch on four one-word answers."""
    from lmforge.finetune.finetune import finetune

    tmp = tmp_path_factory.mktemp("chat")
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA * 8))
    cfg = load_config(
        None,
        [
            f"output.dir={tmp / 'ft'}",
            "tokenizer.kind=char",
            "model.context_length=32",
            "model.n_layers=1",
            "model.d_model=48",
            "model.n_heads=2",
            "train.max_steps=120",
            "train.tokens_per_step=256",
            "train.micro_batch_size=8",
            "train.warmup_steps=5",
            "train.lr=1e-2",
            "train.log_every=1000",
            "train.eval_every=1000",
            "train.checkpoint_every=1000",
            "train.peak_flops=1e11",
            "train.dtype=fp32",
            "finetune.task=instruction",
            f"finetune.train_files=[{data}]",
            "finetune.eval_examples=0",
            "finetune.method=full",
        ],
    )
    summary = finetune(cfg)
    return tmp / "ft", summary


def test_sampling_stops_at_the_end_of_turn_token(chat_model):
    from lmforge.finetune.chat import end_of_turn_ids, is_chat_checkpoint, sample_reply
    from lmforge.model.sampling import SamplingParams
    from lmforge.pretrain import load_model
    from lmforge.tokenizer import END

    folder, _ = chat_model
    assert is_chat_checkpoint(folder)
    model, tok, _ = load_model(folder)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    for question, answer in QA:
        done = sample_reply(model, tok, [("user", question)], params)
        assert done.finish_reason == "stop_id" and done.stop_id == tok.specials[END]
        assert len(done.ids) < params.max_new_tokens
        assert done.text == answer and "<|" not in done.text
    # Sampled too (seeded), every reply ends at the end of its turn.
    for seed in range(4):
        sampled = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=seed)
        done = sample_reply(model, tok, [("user", "say ok")], sampled)
        assert done.stop_id in end_of_turn_ids(tok) and "<|" not in done.text


def test_generate_and_chat_commands_use_the_template(chat_model, capsys, monkeypatch):
    from lmforge.cli import main

    folder, _ = chat_model
    assert (
        main(["generate", "--checkpoint", str(folder), "--prompt", "say yes", "--temperature", "0"])
        == 0
    )
    assert capsys.readouterr().out == "yes\n"
    # Without the template the raw prompt is continued (and echoed).
    main(["generate", "--checkpoint", str(folder), "--prompt", "say", "--template", "none",
          "--temperature", "0", "--max-new-tokens", "3"])  # fmt: skip
    assert capsys.readouterr().out.startswith("say")
    lines = iter(["say no", "say hi"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", read)
    assert main(["chat", "--checkpoint", str(folder), "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "assistant> no\n" in out and "assistant> hi\n" in out and "<|" not in out


def test_a_stop_string_ends_the_reply_and_bad_flags_are_one_line(chat_model, capsys):
    from lmforge.cli import main

    folder, _ = chat_model
    args = ["generate", "--checkpoint", str(folder), "--prompt", "say yes", "--temperature", "0"]
    assert main([*args, "--stop", "es"]) == 0
    assert capsys.readouterr().out == "y\n"
    assert main([*args, "--top-p", "1.5"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--top-p 1.5 must be in (0, 1]" in err and len(err.splitlines()) == 1


def test_web_chat_uses_the_template_and_checks_the_sampling_fields(chat_model):
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from serve_helpers import ORGANISER_TOKEN, csrf_of

    from lmforge.serve import create_app
    from lmforge.serve.security import SecuritySettings

    folder, _ = chat_model
    app = create_app(
        folder.parent,
        db_path=folder.parent / "serve.sqlite",
        organiser_token=ORGANISER_TOKEN,
        security=SecuritySettings(allowed_hosts=["testserver"]),  # TestClient's Host
    )
    with TestClient(app) as client:
        csrf = csrf_of(client.get("/login").text)
        client.post("/login", data={"token": ORGANISER_TOKEN, "csrf": csrf})
        page = client.get("/chat").text
        checkpoint = next(c for c in re.findall(r'<option value="([^"]+)"', page) if "step_" in c)
        body = {
            "checkpoint": checkpoint,
            "messages": [{"role": "user", "content": "say yes"}],
            "temperature": 0,
            "max_tokens": 20,
        }

        def post(**changes):
            r = client.post(
                "/api/chat/stream", json={**body, **changes}, headers={"X-CSRF-Token": csrf}
            )
            return r, "".join(
                json.loads(e[6:])["text"] for e in r.text.split("\n\n") if e.startswith("data: ")
            )

        assert post()[1] == "yes"  # "auto": the chat template, up to the end of the turn
        assert post(stop=["s"])[1] == "ye"
        assert post(repetition_penalty=1.3, min_p=0.1)[0].status_code == 200
        for name, bad in [
            ("temperature", -1),
            ("top_p", 0),
            ("min_p", 2),
            ("repetition_penalty", 0),
        ]:
            r, _ = post(**{name: bad})
            assert r.status_code == 422 and name in r.json()["error"], (name, r.text)
