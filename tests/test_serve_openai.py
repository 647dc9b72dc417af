"""The OpenAI-compatible API of `lmforge serve`, driven by the real `openai` client over HTTP.

Every text is checked against lmforge's own greedy `generate` on the same checkpoint.
"""

from __future__ import annotations

import threading

import pytest
from serve_helpers import ORGANISER_TOKEN, LiveServer, shared_runs

openai = pytest.importorskip("openai")

from lmforge.model.generate import generate  # noqa: E402
from lmforge.pretrain import load_model  # noqa: E402
from lmforge.serve import create_app  # noqa: E402
from lmforge.serve.models import find_checkpoints, prompt_ids  # noqa: E402
from lmforge.tokenizer import END  # noqa: E402

PROMPT = "First Citizen:\nBefore we"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = shared_runs(tmp_path_factory)
    db = tmp_path_factory.mktemp("openai") / "serve.sqlite"
    app = create_app(runs, db_path=db, organiser_token=ORGANISER_TOKEN, resume_generation=False)
    with LiveServer(app) as live:
        yield live, app, runs


@pytest.fixture(scope="module")
def client(server):
    live, _, _ = server
    return openai.OpenAI(base_url=live.url + "/v1", api_key=ORGANISER_TOKEN, max_retries=0)


def greedy(runs, checkpoint, ids, n, stop_ids=()):
    model, tok, _ = load_model(runs / checkpoint)
    out = generate(model, ids, n, temperature=0)[0, len(ids) :].tolist()
    for i, t in enumerate(out):
        if t in stop_ids:
            return tok.decode(out[:i]), i, "stop"
    return tok.decode(out), len(out), "length"


def test_models_lists_the_checkpoints(server, client):
    _, _, runs = server
    assert [m.id for m in client.models.list().data] == find_checkpoints(runs)


def test_completions_plain_streamed_and_with_stop(server, client):
    _, _, runs = server
    ckpt = find_checkpoints(runs)[0]
    tok = load_model(runs / ckpt)[1]
    ids = tok.encode(PROMPT)
    want, n, _ = greedy(runs, ckpt, ids, 12, stop_ids={tok.eot_id})
    r = client.completions.create(model=ckpt, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)

    stream = client.completions.create(
        model=ckpt, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == n

    stop = want[4:6]
    cut = want[: want.index(stop)]
    for streamed in (False, True):
        r = client.completions.create(
            model=ckpt, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], stream=streamed
        )
        if streamed:
            parts = list(r)
            assert "".join(c.choices[0].text for c in parts) == cut
            assert parts[-1].choices[0].finish_reason == "stop"
        else:
            assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"


def test_chat_completions_use_the_template_and_stop_at_the_turn(server, client):
    _, _, runs = server
    ckpt = find_checkpoints(runs)[-1]
    tok = load_model(runs / ckpt)[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"}]
    ids = prompt_ids(tok, messages, "chat")
    want, n, reason = greedy(runs, ckpt, ids, 10, stop_ids={tok.eot_id, tok.specials[END]})
    r = client.chat.completions.create(model=ckpt, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    stream = client.chat.completions.create(
        model=ckpt, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_auth_unknown_model_and_bad_values_are_refused(server, client):
    live, _, runs = server
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="x", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no/such/model", prompt="hi", max_tokens=2)
    ckpt = find_checkpoints(runs)[0]
    for kwargs in ({"temperature": 5.0}, {"top_p": 0.0}, {"n": 2}, {"max_tokens": 0}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=ckpt, prompt="hi", **({"max_tokens": 2} | kwargs))


def test_concurrent_requests_are_batched_and_each_gets_its_own_text(server, client):
    _, app, runs = server
    ckpt = find_checkpoints(runs)[0]
    tok = load_model(runs / ckpt)[1]
    prompts = [PROMPT, "MENENIUS:\nWhat wo", "All:\nSpeak, spe"]  # a shared length in tokens
    prompts = [p for p in prompts if len(tok.encode(p)) == len(tok.encode(PROMPT))] * 3
    wants = [greedy(runs, ckpt, tok.encode(p), 8, {tok.eot_id})[0] for p in prompts]
    got: dict[int, str] = {}
    barrier = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        barrier.wait()
        r = client.completions.create(model=ckpt, prompt=prompts[i], max_tokens=8, temperature=0)
        got[i] = r.choices[0].text

    before = len(app.state.openai_batcher.batches)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == wants
    assert max(app.state.openai_batcher.batches[before:]) > 1
