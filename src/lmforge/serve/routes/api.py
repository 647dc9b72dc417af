"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions
(see `lmforge.serve.openai_api` for what they accept). Every route needs an organiser
token as ``Authorization: Bearer``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, Response

from lmforge.serve.deps import ApiOrganiser
from lmforge.serve.models import find_checkpoints, prompt_ids
from lmforge.serve.openai_api import (
    ChatRequest,
    CompletionRequest,
    Job,
    SamplingRequest,
    response_meta,
    stop_strings,
    stream,
    usage_of,
    wait,
)
from lmforge.serve.state import ServeState, State
from lmforge.tokenizer import END

router = APIRouter(prefix="/v1", dependencies=[ApiOrganiser])


def tokenizer_of(state: ServeState, name: str) -> Any:
    if name not in set(find_checkpoints(state.runs_root)):
        raise HTTPException(404, f"The model {name!r} does not exist (GET /v1/models lists them).")
    return state.pool.get(name).tokenizer


def submit(
    state: ServeState,
    body: SamplingRequest,
    prompts: list[list[int]],
    max_tokens: int,
    stop_ids: set[int],
) -> list[Job]:
    stop = stop_strings(body.stop)
    sampling = (body.temperature, body.top_p, body.seed)
    return [
        state.batcher.submit(Job(body.model, ids, max_tokens, *sampling, stop_ids, stop))
        for ids in prompts
    ]


@router.get("/models")
def models(state: State) -> dict[str, Any]:
    data = [
        {"id": c, "object": "model", "created": 0, "owned_by": "lmforge"}
        for c in find_checkpoints(state.runs_root)
    ]
    return {"object": "list", "data": data}


@router.post("/completions")
def completions(state: State, body: CompletionRequest) -> Response:
    tok = tokenizer_of(state, body.model)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not 1 <= len(texts) <= 16:
        raise HTTPException(400, "prompt: one string, or a list of 1 to 16 strings")
    prompts = [tok.encode(t) if t else [tok.eot_id] for t in texts]
    jobs = submit(state, body, prompts, body.max_tokens, {tok.eot_id})
    meta = response_meta("cmpl-", body.model)
    if body.stream:
        return stream(jobs, meta, "text_completion", body, chat=False)
    wait(jobs)
    choices = [
        {"index": i, "text": j.text, "logprobs": None, "finish_reason": j.finish_reason}
        for i, j in enumerate(jobs)
    ]
    usage = usage_of(sum(len(p) for p in prompts), sum(j.tokens for j in jobs))
    return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": usage})


@router.post("/chat/completions")
def chat_completions(state: State, body: ChatRequest) -> Response:
    tok = tokenizer_of(state, body.model)
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    ids = prompt_ids(tok, messages, "chat")
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    jobs = submit(state, body, [ids], max_tokens, {tok.eot_id, tok.specials[END]})
    meta = response_meta("chatcmpl-", body.model)
    if body.stream:
        return stream(jobs, meta, "chat.completion.chunk", body, chat=True)
    wait(jobs)
    job = jobs[0]
    message = {"role": "assistant", "content": job.text}
    choice = {"index": 0, "message": message, "finish_reason": job.finish_reason}
    usage = usage_of(len(ids), job.tokens)
    return JSONResponse({**meta, "object": "chat.completion", "choices": [choice], "usage": usage})
