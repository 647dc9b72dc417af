"""Checkpoints for the web app: discovery in the runs folder, a small model cache,
prompt formatting, streamed generation, and the background generation of study outputs.

Generation is CPU/GPU-bound, so one lock serialises it: two chats at once take
turns token-batch by token-batch instead of thrashing the cores.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmforge.model.sampling import SamplingParams, sampling_params
from lmforge.tokenizer import ASSISTANT, END, SYSTEM, USER

# "auto": the chat template for a checkpoint fine-tuned with one, plain text otherwise.
PROMPT_FORMATS = ("auto", "completion", "chat")


class Cancelled(Exception):
    """Raised inside a generation callback to stop it (the client went away)."""


def safe_join(root: Path, relative: str) -> Path:
    """`root / relative`, resolved; raises PermissionError if it points outside `root`.

    Resolving first follows `..` and symbolic links, so neither can escape.
    """
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise PermissionError(f"{relative!r} is outside the runs folder")
    return path


def find_checkpoints(runs_dir: Path, limit: int = 500) -> list[str]:
    """Checkpoint folders under `runs_dir`, as paths relative to it, newest run first."""
    runs_dir = runs_dir.resolve()
    found = []
    for state in runs_dir.rglob("trainer_state.json"):
        folder = state.parent
        if folder.name.startswith(".tmp") or not (folder / "model.safetensors").exists():
            continue
        found.append(folder)
        if len(found) >= limit:
            break
    found.sort(key=lambda p: (str(p.parent.parent), p.name), reverse=True)
    return [str(p.relative_to(runs_dir)) for p in found]


@dataclass
class Loaded:
    model: Any
    tokenizer: Any


class ModelPool:
    """Loads checkpoints on demand and keeps the most recent few in memory."""

    def __init__(self, runs_dir: Path, device: str = "cpu", capacity: int = 4):
        self.runs_dir = runs_dir.resolve()
        self.device = device
        self.capacity = capacity
        self._cache: OrderedDict[str, Loaded] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.generate_lock = threading.Lock()

    def get(self, checkpoint: str) -> Loaded:
        path = safe_join(self.runs_dir, checkpoint)
        key = str(path)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        from lmforge.model_source import load_model

        model, tok, _cfg = load_model(path, device=self.device)
        with self._cache_lock:
            self._cache[key] = Loaded(model, tok)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return self._cache[key]


def prompt_ids(tok: Any, messages: list[dict[str, str]], prompt_format: str) -> list[int]:
    """Token ids for a conversation.

    "chat" uses the tokenizer's chat template (role token, content, ``<|end|>``,
    then ``<|assistant|>`` to open the reply), built from ids so user text can
    never forge a special token. "completion" concatenates the turns as plain
    text, which is what a pre-trained (not instruction-tuned) model understands.
    """
    if prompt_format == "chat":
        ids: list[int] = []
        role_token = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
        for m in messages:
            ids.append(tok.specials[role_token.get(m["role"], USER)])
            ids += tok.encode(m["content"])
            ids.append(tok.specials[END])
        return [*ids, tok.specials[ASSISTANT]]
    text = "".join(m["content"] for m in messages)
    return tok.encode(text) if text else [tok.eot_id]


def resolve_format(pool: ModelPool, checkpoint: str, prompt_format: str) -> str:
    """ "auto" → "chat" for a checkpoint fine-tuned with the chat template, else "completion"."""
    if prompt_format != "auto":
        return prompt_format
    from lmforge.finetune.chat import is_chat_checkpoint

    path = safe_join(pool.runs_dir, checkpoint)
    return "chat" if is_chat_checkpoint(path) else "completion"


def sampling_of(settings: Any) -> SamplingParams:
    """`SamplingParams` from a request's or a study's settings (`max_tokens`, `temperature`, ...)."""
    return SamplingParams(
        max_new_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        min_p=getattr(settings, "min_p", 0.0),
        repetition_penalty=getattr(settings, "repetition_penalty", 1.0),
        stop=tuple(getattr(settings, "stop", ()) or ()),
        seed=settings.seed,
    )


def stream_generate(
    pool: ModelPool,
    checkpoint: str,
    messages: list[dict[str, str]],
    prompt_format: str = "auto",
    params: SamplingParams | None = None,
    on_piece: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    **options: Any,
) -> str:
    """Generate a reply, calling `on_piece` with each decoded text piece; returns the reply.

    Keyword `options` (`temperature=`, `max_tokens=`, ...) replace fields of `params`.
    A chat-format reply stops at the end of the assistant's turn; a completion at
    end-of-text; both at `params.stop` strings. No special token reaches the text.
    """
    from lmforge.finetune.chat import chat_params
    from lmforge.model.generate import complete

    loaded = pool.get(checkpoint)
    tok = loaded.tokenizer
    prompt_format = resolve_format(pool, checkpoint, prompt_format)
    ids = prompt_ids(tok, messages, prompt_format)
    if "max_tokens" in options:
        options["max_new_tokens"] = options.pop("max_tokens")
    params = sampling_params(
        params or SamplingParams(max_new_tokens=128, temperature=0.8), **options
    )
    params = (
        chat_params(tok, params) if prompt_format == "chat" else params.with_stop_ids([tok.eot_id])
    )
    pieces: list[str] = []

    def emit(_row: int, piece: str) -> None:
        if cancelled():
            raise Cancelled
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)

    with pool.generate_lock, contextlib.suppress(Cancelled):
        complete(loaded.model, tok, [ids], params, emit)
    return "".join(pieces)


def iter_stream(
    pool: ModelPool, checkpoint: str, messages: list[dict[str, str]], **settings: Any
) -> Generator[str, None, None]:
    """Pieces of a generated reply as an iterator (generation runs in its own thread).

    Closing the iterator (the client disconnected) stops generation at the next token.
    """
    import queue

    pieces: queue.Queue[tuple[str, Any]] = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            stream_generate(
                pool,
                checkpoint,
                messages,
                on_piece=lambda p: pieces.put(("piece", p)),
                cancelled=stop.is_set,
                **settings,
            )
            pieces.put(("done", None))
        except Exception as exc:
            pieces.put(("error", f"{type(exc).__name__}: {exc}"))

    thread = threading.Thread(target=work, name="lmforge-chat", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = pieces.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise RuntimeError(value)
            else:
                return
    finally:
        stop.set()


class StudyGenerator:
    """Generates a study's missing outputs in a background thread, one output per transaction.

    Each finished output is committed at once, so a restart resumes where the
    last run stopped (`resume_all` is called when the app starts).
    """

    def __init__(self, store: Any, pool: ModelPool):
        self.store = store
        self.pool = pool
        self.threads: dict[int, threading.Thread] = {}

    def start(self, study_id: int) -> threading.Thread:
        thread = self.threads.get(study_id)
        if thread is not None and thread.is_alive():
            return thread
        thread = threading.Thread(
            target=self.run, args=(study_id,), name=f"lmforge-study-{study_id}", daemon=True
        )
        self.threads[study_id] = thread
        thread.start()
        return thread

    def resume_all(self) -> None:
        for study in self.store.studies():
            if study.status == "generating":
                self.start(study.id)

    def run(self, study_id: int) -> None:
        study = self.store.study(study_id)
        if study is None:
            return
        s = study.settings
        try:
            prompts = self.store.prompts(study_id)
            done = self.store.done_outputs(study_id)
            for m in study.models:
                for p, prompt in enumerate(prompts):
                    if (p, m["idx"]) in done:
                        continue
                    text = stream_generate(
                        self.pool,
                        m["checkpoint"],
                        [{"role": "user", "content": prompt}],
                        prompt_format=s.prompt_format,
                        # The same seed for every model on a prompt: differences come from the models.
                        params=replace(sampling_of(s), seed=s.seed + p),
                    )
                    self.store.put_output(study_id, p, m["idx"], text)
            self.store.set_status(study_id, "ready")
        except Exception as exc:
            traceback.print_exc()
            self.store.set_status(study_id, "failed", f"{type(exc).__name__}: {exc}")
