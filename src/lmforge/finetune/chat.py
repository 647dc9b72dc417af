"""The chat template at sampling time: prompts, end-of-turn, and the terminal chat.

A fine-tuned model learnt the template of `lmforge.finetune.tasks`
(``<|user|>...<|end|><|assistant|>...<|end|>``), so everything that samples it
(the terminal chat, the run's samples, `lmforge generate`, the web app) builds
the prompt here and stops at the end of the assistant's turn (``<|end|>``, or
end-of-text) instead of running on into the next turn.

A checkpoint written by fine-tuning records the template in its
`trainer_state.json` (`chat_template`); `is_chat_checkpoint` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.finetune.tasks import Turns, prompt_ids
from lmforge.model.generate import Completion, complete
from lmforge.model.sampling import CHAT_DEFAULTS, SamplingParams, sampling_params
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import END, Tokenizer


def end_of_turn_ids(tok: Tokenizer) -> tuple[int, int]:
    """The ids that end an assistant turn: the template's ``<|end|>`` and end-of-text."""
    return tok.specials[END], tok.eot_id


def chat_params(tok: Tokenizer, params: SamplingParams) -> SamplingParams:
    """`params` that also stop at the end of the assistant's turn."""
    return params.with_stop_ids(end_of_turn_ids(tok))


def chat_template_of(checkpoint: str | Path) -> str | None:
    """The chat template a checkpoint was fine-tuned with (None: a plain language model)."""
    from lmforge.train.checkpoint import resolve_checkpoint

    try:
        state = json.loads((resolve_checkpoint(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError, RuntimeError):  # RuntimeError: CheckpointError, none there
        return None
    template = state.get("chat_template") if isinstance(state, dict) else None
    return template if isinstance(template, str) and template else None


def is_chat_checkpoint(checkpoint: str | Path) -> bool:
    return chat_template_of(checkpoint) is not None


def sample_reply(
    model: Transformer,
    tok: Tokenizer,
    turns: Turns,
    params: SamplingParams,
    on_text: Callable[[str], object] | None = None,
) -> Completion:
    """The assistant's next turn after `turns`, through the chat template; stops at its end.

    The oldest turns are dropped when the conversation outgrows the context.
    """
    ctx = model.cfg.context_length
    params = chat_params(tok, params)
    if params.max_new_tokens > ctx // 2:
        params = sampling_params(params, max_new_tokens=ctx // 2)
    system = turns[0][1] if turns and turns[0][0] == "system" else ""
    history = turns[1:] if system else list(turns)
    ids = fit_history(tok, system, history, ctx - params.max_new_tokens)
    stream = None if on_text is None else (lambda _row, piece: on_text(piece))
    return complete(model, tok, [ids], params, stream)[0]


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
    params: SamplingParams,
    write: Callable[[str], object],
) -> str:
    """Stream the assistant's next turn to `write` and return its text."""
    head: Turns = [("system", system)] if system else []
    done = sample_reply(model, tok, head + list(history), params, write)
    write("\n")
    return done.text.strip()


def chat_loop(
    model: Transformer,
    tok: Tokenizer,
    system: str = "",
    params: SamplingParams | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], object] = print,
    **options: Any,
) -> Turns:
    """Read user turns until /exit or end of input; returns the history.

    Sampling follows `params` (default: temperature 0.7, top-p 0.9, 200 new tokens,
    seed 0), with keyword `options` replacing its fields; turn n uses seed + n.
    """
    params = sampling_params(params or CHAT_DEFAULTS, **options)
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
        seed = None if params.seed is None else params.seed + turn
        answer = reply(model, tok, system, history, sampling_params(params, seed=seed), write)
        history.append(("assistant", answer))
        turn += 1


def sample_texts(
    model: Transformer, tok: Tokenizer, prompts: list[str], params: SamplingParams, chat: bool
) -> list[str]:
    """One sample per prompt (sample i seeded `params.seed + i`, or i), for a report to show.

    A chat model answers each prompt as a user turn, up to the end of its turn, and
    the text reads ``user: ...`` / ``assistant: ...``; a plain model continues the
    prompt up to end-of-text. No special token appears in the text.
    """
    out = []
    for i, prompt in enumerate(prompts):
        seeded = sampling_params(params, seed=(params.seed or 0) + i)
        if chat:
            reply = sample_reply(model, tok, [("user", prompt)], seeded).text.strip()
            out.append(f"user: {prompt}\nassistant: {reply}")
        else:
            ids = tok.encode(prompt) if prompt else [tok.eot_id]
            done = complete(model, tok, [ids], seeded.with_stop_ids([tok.eot_id]))[0]
            out.append(prompt + done.text)
    return out
