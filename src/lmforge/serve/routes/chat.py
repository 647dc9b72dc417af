"""The chat playground: organisers talk to any checkpoint, the reply streamed as it decodes."""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Iterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from lmforge.serve.deps import CsrfHeader, Organiser
from lmforge.serve.models import PROMPT_FORMATS, find_checkpoints, iter_stream, sampling_of
from lmforge.serve.pages import render
from lmforge.serve.state import State

router = APIRouter(dependencies=[Organiser])


class ChatRequest(BaseModel):
    checkpoint: str
    messages: list[dict[str, str]] = Field(min_length=1, max_length=200)
    prompt_format: str = "auto"  # the chat template for a fine-tuned checkpoint
    # The ranges of `lmforge.model.sampling.RANGES`; a bad value is a 422 naming the field.
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=100_000)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field([], max_length=16)
    max_tokens: int = Field(128, ge=1, le=4096)
    seed: int | None = None


@router.get("/chat", response_class=HTMLResponse)
def chat_page(request: Request, state: State) -> Response:
    checkpoints = find_checkpoints(state.runs_root)
    return render(request, "chat.html", checkpoints=checkpoints, formats=PROMPT_FORMATS)


@router.post("/api/chat/stream", dependencies=[CsrfHeader])
def chat_stream(state: State, body: ChatRequest) -> Response:
    if body.prompt_format not in PROMPT_FORMATS:
        raise HTTPException(400, f"prompt_format must be one of {PROMPT_FORMATS}")
    if body.checkpoint not in set(find_checkpoints(state.runs_root)):
        raise HTTPException(404, f"{body.checkpoint!r} is not a checkpoint in the runs folder")
    messages = [
        {"role": m.get("role", "user"), "content": str(m.get("content", ""))} for m in body.messages
    ]
    pieces = iter_stream(
        state.pool,
        body.checkpoint,
        messages,
        prompt_format=body.prompt_format,
        params=sampling_of(body),
    )
    return StreamingResponse(
        events(pieces),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def events(pieces: Generator[str, None, None]) -> Iterator[str]:
    """Server-sent events: one `data:` line of JSON per text piece, then `done` (or `error`)."""
    t0, n = time.perf_counter(), 0
    try:
        for piece in pieces:
            n += 1
            yield f"data: {json.dumps({'text': piece})}\n\n"
        dt = time.perf_counter() - t0
        yield f"event: done\ndata: {json.dumps({'pieces': n, 'seconds': dt})}\n\n"
    except Exception as exc:
        yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
    finally:
        pieces.close()
