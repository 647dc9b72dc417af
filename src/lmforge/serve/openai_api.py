"""The OpenAI-compatible API of `lmforge serve` (routes in `routes/api.py`): requests, batching, responses.

Tools that speak the OpenAI API (the `openai` client, LangChain, editors) reach any
checkpoint under the runs folder; the model id is the checkpoint's path relative to
it, as `GET /v1/models` lists them.

- **Auth**: ``Authorization: Bearer TOKEN`` with an organiser token of this server (the
  one `lmforge serve` prints, or `--new-organiser-token`); `lmforge serve --list-tokens`
  and `--revoke-token ID` manage them. A request without a valid token is refused with
  401 before its body is read (`security.BODY_RULES`).
- **Requests**: `max_tokens` (`max_completion_tokens` for chat), `temperature` (0 =
  greedy), `top_p`, `stop` (a string or up to four), `seed`, `stream` (server-sent
  events ending with ``data: [DONE]``; `stream_options.include_usage` adds a last chunk
  with the counts), a list of prompts for /v1/completions. `n` must be 1. Responses
  carry `usage` (prompt, completion and total tokens) and `finish_reason` ("stop" at
  the end of the text or turn or a stop string, "length" at `max_tokens`).
- **Chat** renders the messages through the model's chat template (role tokens, then
  the assistant's turn) and stops at the end of the turn.
- **Batching**: concurrent requests for the same checkpoint with the same sampling
  settings and the same prompt length in tokens are decoded together as one batch
  (`Batcher`); the others run one after the other. Rows are independent: a request's
  text does not depend on what it was batched with (greedy, or sampling with a seed).
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from lmforge.serve.models import ModelPool

MAX_TOKENS = 4096
BATCH_WINDOW_S = 0.01  # how long the batcher waits for companions of a first request


# ----------------------------------------------------------------------------- requests


class SamplingRequest(BaseModel):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)


class ChatMessage(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    found = [stop] if isinstance(stop, str) else list(stop or [])
    if len(found) > 4 or any(not s or len(s) > 200 for s in found):
        raise HTTPException(400, "stop: at most 4 non-empty strings of at most 200 characters")
    return found


# ----------------------------------------------------------------------------- batching


@dataclass
class Job:
    """One prompt to continue; the batcher fills `pieces`, then sets `done`."""

    checkpoint: str
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop_ids: set[int]
    stop: list[str]
    pieces: queue.Queue = field(default_factory=queue.Queue)  # text pieces, then None
    text: str = ""
    tokens: int = 0
    finish_reason: str = ""
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> tuple:
        return (self.checkpoint, len(self.ids), self.temperature, self.top_p, self.seed)


class _AllDone(Exception):
    """Raised from the token callback when every row of the batch has finished."""


class _Row:
    """A job's decoding state: text so far, held back while it could start a stop string."""

    def __init__(self, job: Job, decode: Any):
        from lmforge.model.generate import StreamDecoder

        self.job, self.decoder, self.emitted = job, StreamDecoder(decode), 0
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def push(self, token: int) -> None:
        job = self.job
        if token in job.stop_ids:
            return self.finish("stop")
        job.tokens += 1
        job.text += self.decoder.push(token)
        hits = [job.text.index(s) for s in job.stop if s in job.text]
        if hits:
            job.text = job.text[: min(hits)]
            return self.finish("stop")
        if job.tokens >= job.max_tokens:
            return self.finish("length")
        safe = len(job.text) - self.hold
        if safe > self.emitted:
            job.pieces.put(job.text[self.emitted : safe])
            self.emitted = safe

    def finish(self, reason: str) -> None:
        job = self.job
        job.finish_reason = reason
        if len(job.text) > self.emitted:
            job.pieces.put(job.text[self.emitted :])
        job.pieces.put(None)
        job.done.set()


class Batcher:
    """One thread that decodes jobs, batching companions that arrive together."""

    def __init__(self, pool: ModelPool, window_s: float = BATCH_WINDOW_S):
        self.pool, self.window_s = pool, window_s
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.batches: list[int] = []  # the size of every batch decoded (for tests, metrics)
        threading.Thread(target=self._loop, name="lmforge-openai-batcher", daemon=True).start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            pending = [first]
            deadline = time.monotonic() + self.window_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    pending.append(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
            groups: dict[tuple, list[Job]] = {}
            for job in pending:
                groups.setdefault(job.batch_key(), []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[Job]) -> None:
        import torch

        from lmforge.model.generate import generate

        self.batches.append(len(group))
        head = group[0]
        try:
            loaded = self.pool.get(head.checkpoint)
            rows = [_Row(job, loaded.tokenizer.decode) for job in group]

            def on_token(col: torch.Tensor) -> None:
                for row, token in zip(rows, col.tolist(), strict=True):
                    if not row.job.done.is_set():
                        row.push(int(token))
                if all(row.job.done.is_set() for row in rows):
                    raise _AllDone

            with self.pool.generate_lock:
                generate(
                    loaded.model,
                    torch.tensor([job.ids for job in group]),
                    max(job.max_tokens for job in group) + 1,
                    temperature=head.temperature,
                    top_p=head.top_p,
                    seed=head.seed,
                    on_token=on_token,
                )
        except _AllDone:
            pass
        except Exception as exc:  # the request gets the error; the server goes on
            for job in group:
                job.error = f"{type(exc).__name__}: {exc}"
        for row_job in group:
            if not row_job.done.is_set():
                row_job.finish_reason = row_job.finish_reason or "length"
                row_job.pieces.put(None)
                row_job.done.set()


# ----------------------------------------------------------------------------- responses


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


def openai_error(status: int, message: str) -> JSONResponse:
    kinds = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}
    error = {"message": message, "type": kinds.get(status, "invalid_request_error"), "code": status}
    return JSONResponse({"error": error}, status_code=status)


def response_meta(prefix: str, model: str) -> dict[str, Any]:
    return {"id": prefix + secrets.token_hex(12), "created": int(time.time()), "model": model}


def wait(jobs: list[Job]) -> None:
    for job in jobs:
        job.done.wait()
        if job.error:
            raise HTTPException(500, f"generation failed: {job.error}")


def stream(jobs: list[Job], meta: dict, kind: str, body: SamplingRequest, chat: bool) -> Response:
    def chunk(index: int, delta: str | None, finish: str | None) -> dict[str, Any]:
        if chat:
            content = {} if delta is None else {"content": delta}
            choice = {"index": index, "delta": content, "finish_reason": finish}
        else:
            choice = {
                "index": index,
                "text": delta or "",
                "logprobs": None,
                "finish_reason": finish,
            }
        return {**meta, "object": kind, "choices": [choice]}

    def events() -> Iterator[str]:
        for i, job in enumerate(jobs):
            if chat:
                yield _sse({**meta, "object": kind, "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ]})  # fmt: skip
            while (piece := job.pieces.get()) is not None:
                yield _sse(chunk(i, piece, None))
            if job.error:
                yield _sse({"error": {"message": job.error, "type": "server_error", "code": 500}})
                return
            yield _sse(chunk(i, None, job.finish_reason))
        if (body.stream_options or {}).get("include_usage"):
            usage = usage_of(sum(len(j.ids) for j in jobs), sum(j.tokens for j in jobs))
            yield _sse({**meta, "object": kind, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
