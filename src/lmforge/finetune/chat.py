"""A terminal chat: the chat template, streamed replies, and the history of the conversation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.finetune.tasks import Turns, prompt_ids
from lmforge.model.generate import StreamDecoder, generate
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import END, Tokenizer


def fit_history(tok: Tokenizer, system: str, history: Turns, room: int) -> list[int]:
    """Prompt ids of the conversation; the oldest turns go first when it outgrows `room`."""
    turns = list(history)
    while True:
        head: Turns = [("system", system)] if system else []
        ids = prompt_ids(tok, head + turns)
        if len(ids) <= room or len(turns) <= 1:
            return ids[-room:]
        turns = turns[2:] if len(turns) > 2 else turns[1:]


def reply(
    model: Transformer,
    tok: Tokenizer,
    system: str,
    history: Turns,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    write: Callable[[str], object],
) -> str:
    """Stream the assistant's next turn to `write` and return its text."""
    ctx = model.cfg.context_length
    max_new_tokens = min(max_new_tokens, ctx // 2)
    ids = fit_history(tok, system, history, ctx - max_new_tokens)
    decoder = StreamDecoder(tok.decode)
    end = tok.specials[END]
    pieces: list[str] = []

    def emit(col: torch.Tensor) -> None:
        token = int(col[0])
        if token in (end, tok.eot_id):
            return
        piece = decoder.push(token)
        pieces.append(piece)
        write(piece)

    generate(
        model,
        ids,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_ids=[end, tok.eot_id],
        on_token=emit,
    )
    write("\n")
    return "".join(pieces).strip()


def chat_loop(
    model: Transformer,
    tok: Tokenizer,
    system: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = 0,
    read: Callable[[str], str] = input,
    write: Callable[[str], object] = print,
) -> Turns:
    """Read user turns until /exit or end of input; returns the history."""
    history: Turns = []
    write("lmforge chat: /reset forgets the conversation, /exit quits\n")
    turn = 0
    while True:
        try:
            text = read("you> ")
        except EOFError:
            write("\n")
            return history
        if text.strip() == "/exit":
            return history
        if text.strip() == "/reset":
            history = []
            write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        history.append(("user", text))
        write("assistant> ")
        answer = reply(
            model,
            tok,
            system,
            history,
            max_new_tokens,
            temperature,
            top_p,
            None if seed is None else seed + turn,
            write,
        )
        history.append(("assistant", answer))
        turn += 1
