"""Fine-tuning tasks: records → conversations → token ids with a loss mask.

Every task is a small declared mapping (`TaskFormat`) from one record (a dict read
from JSONL, CSV, Parquet or parallel text files) to a list of turns
``[(role, text), ...]``. The turns are rendered with the tokenizer's chat template
(`lmforge.tokenizer.CHAT_TEMPLATE`)::

    <|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

and the loss is taken only on what the assistant says, including its closing
``<|end|>`` (so the model learns to stop). Each example ends with the end-of-text
token, which separates packed examples and is never a target.
Continued pre-training (`text`) has no turns: the whole text is the target.

Record validation names the file, the line (1-based; for CSV the data row
counted after the header; for Parquet the row) and the missing field.
"""

from __future__ import annotations

import csv
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.readers import strip_compression
from lmforge.data.sources import COMPRESSED, open_text, unsupported_message
from lmforge.fileio import iter_json_lines
from lmforge.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Turns = list[tuple[str, str]]


class RecordError(ValueError):
    """A data record lacks a field or has the wrong type; the message names file and line."""


@dataclass
class Record:
    """One input record and where it came from (for error messages)."""

    data: dict[str, Any]
    file: str
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def text(self, key: str, allow_empty: bool = False) -> str:
        """Field `key` as a string; lists of strings (SciTLDR's sentences) are joined."""
        if key not in self.data or self.data[key] is None:
            raise RecordError(f"{self.where()}: record has no field '{key}'")
        value = self.data[key]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = " ".join(v.strip() for v in value)
        if not isinstance(value, str):
            raise RecordError(
                f"{self.where()}: field '{key}' should be text, not {type(value).__name__}"
            )
        if not value.strip() and not allow_empty:
            raise RecordError(f"{self.where()}: field '{key}' is empty")
        return value


# ----------------------------------------------------------------------------- task formats


@dataclass(frozen=True)
class TaskFormat:
    """How one task turns a record into turns, and how it is scored."""

    name: str
    required: tuple[str, ...]  # fields every record must have (checked with file:line)
    to_turns: Callable[[Record], Turns]  # its docstring describes the records it reads
    metric: str = "loss"  # loss | bleu | rouge
    # The reference answer of a record, for generation metrics; None: the final turn (the
    # answer the model is trained to give).
    reference: Callable[[Record], str] | None = None

    @property
    def description(self) -> str:
        return inspect.getdoc(self.to_turns) or ""

    def answer(self, rec: Record, turns: Turns) -> str:
        """The reference answer of `rec`, whose turns are `turns`."""
        if self.reference is not None:
            return self.reference(rec)
        return turns[-1][1] if turns else ""


def _instruction(r: Record) -> Turns:
    """Alpaca-style {instruction, input?, output}"""
    # Alpaca layout: the optional input follows the instruction after a blank line.
    prompt = r.text("instruction")
    extra = r.text("input", allow_empty=True) if r.data.get("input") else ""
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    return [("user", prompt), ("assistant", r.text("output"))]


def _chat(r: Record) -> Turns:
    """{messages: [{role, content}, ...]}"""
    messages = r.data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{r.where()}: record has no non-empty list field 'messages'")
    turns: Turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"{r.where()}: messages[{i}] needs the fields 'role' and 'content'")
        if m["role"] not in ROLE_TOKENS:
            raise RecordError(
                f"{r.where()}: messages[{i}].role = {m['role']!r} is not one of "
                f"{sorted(ROLE_TOKENS)}"
            )
        if not isinstance(m["content"], str):
            raise RecordError(f"{r.where()}: messages[{i}].content should be text")
        turns.append((m["role"], m["content"]))
    if not any(role == "assistant" for role, _ in turns):
        raise RecordError(f"{r.where()}: messages has no 'assistant' turn to learn from")
    return turns


def _first_target(r: Record) -> str:
    """SciTLDR has several gold TLDRs per paper; the first is the author's."""
    value = r.data.get("target")
    if isinstance(value, list):
        if not value or not isinstance(value[0], str):
            raise RecordError(f"{r.where()}: field 'target' is an empty list")
        return value[0].strip()
    return r.text("target").strip()


def _summarization(r: Record) -> Turns:
    """{source: document (text or list of sentences), target: summary (or list)}"""
    return [("user", r.text("source").strip()), ("assistant", _first_target(r))]


def _translation(r: Record) -> Turns:
    """{source, target}, or parallel text files PREFIX.SRC / PREFIX.TGT"""
    return [("user", r.text("source").strip()), ("assistant", r.text("target").strip())]


def _code_docstring(r: Record) -> Turns:
    """function code (docstring removed) → its docstring; built from python-stdlib"""
    return [("user", r.text("code")), ("assistant", r.text("docstring"))]


# Styles that read as "Continue the <style>."; any other style text is the instruction itself.
CREATIVE_STYLES = ("story", "scene", "poem", "sonnet", "song", "play", "tale", "verse")


def creative_instruction(style: str) -> str:
    style = style.strip()
    return f"Continue the {style}." if style.lower() in CREATIVE_STYLES else style


def _creative(r: Record) -> Turns:
    """{prompt: an opening, continuation: what follows, style?}; built from the shared books
    and tinyshakespeare

    User: the style as an instruction (if any), a blank line, the opening; assistant: what
    follows.
    """
    prompt = r.text("prompt")
    style = r.text("style", allow_empty=True) if r.data.get("style") is not None else ""
    if style.strip():
        prompt = f"{creative_instruction(style)}\n\n{prompt}"
    return [("user", prompt), ("assistant", r.text("continuation"))]


def _text(r: Record) -> Turns:
    """{text}: continued pre-training"""
    return []  # `encode_record` trains on the whole text


TASKS: dict[str, TaskFormat] = {
    "instruction": TaskFormat("instruction", ("instruction", "output"), _instruction),
    "chat": TaskFormat("chat", ("messages",), _chat),
    "summarization": TaskFormat("summarization", ("source", "target"), _summarization, "rouge"),
    "translation": TaskFormat("translation", ("source", "target"), _translation, "bleu"),
    "code-docstring": TaskFormat("code-docstring", ("code", "docstring"), _code_docstring, "rouge"),
    "creative": TaskFormat("creative", ("prompt", "continuation"), _creative),
    "text": TaskFormat("text", ("text",), _text),
}


def get_task(name: str) -> TaskFormat:
    if name not in TASKS:
        raise ValueError(f"finetune.task = {name!r} is not a task (known: {', '.join(TASKS)})")
    return TASKS[name]


# ----------------------------------------------------------------------------- rendering


@dataclass
class Example:
    """Token ids and the matching loss mask (True = the model is trained to predict it)."""

    ids: list[int]
    trained: list[bool]
    prompt_len: int = 0  # tokens up to and including the final '<|assistant|>' (generation prompt)
    reference: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def render_turns(turns: Turns) -> str:
    """The conversation as text, exactly as the chat template renders it."""
    return "".join(f"{ROLE_TOKENS[role]}{content}{END}" for role, content in turns)


def prompt_ids(tok: Tokenizer, turns: Turns) -> list[int]:
    """Ids of a conversation followed by '<|assistant|>': what generation continues from."""
    ids: list[int] = []
    for role, content in turns:
        ids += [tok.specials[ROLE_TOKENS[role]], *tok.encode(content), tok.specials[END]]
    return [*ids, tok.specials[ASSISTANT]]


def encode_turns(tok: Tokenizer, turns: Turns) -> tuple[list[int], list[bool], int]:
    """Token ids of the rendered template and the loss mask: assistant content + its <|end|>.

    Special tokens are inserted by id (never parsed out of text), so a record that
    contains the literal string '<|end|>' cannot forge a turn boundary with a BPE
    tokenizer and still encodes with a character tokenizer.
    """
    ids: list[int] = []
    trained: list[bool] = []
    prompt_len = 0
    for role, content in turns:
        body = tok.encode(content)
        learn = role == "assistant"
        if learn:
            prompt_len = len(ids) + 1
        ids += [tok.specials[ROLE_TOKENS[role]], *body, tok.specials[END]]
        trained += [False] + [learn] * (len(body) + 1)
    ids.append(tok.eot_id)
    trained.append(False)
    return ids, trained, prompt_len


@dataclass
class ChatTemplate:
    """An imported model's own Jinja chat template (HF `tokenizer_config.json`)."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, turns: Turns, add_generation_prompt: bool) -> str:
        """The template's text for `turns`, as transformers' `apply_chat_template` renders it."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        messages = [{"role": role, "content": content} for role, content in turns]
        return env.from_string(self.source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def encode_turns_template(
    tok: Tokenizer, turns: Turns, template: ChatTemplate
) -> tuple[list[int], list[bool], int]:
    """`encode_turns` through a model's own template: ids of its rendering and the loss mask.

    Each turn's text is what rendering the conversation up to it adds; for an assistant
    turn, the generation prompt (rendered with add_generation_prompt) is not trained and
    the rest, the reply and the template's closing tokens, is. The template's special
    tokens are parsed out of its text, as transformers does.
    """
    ids: list[int] = []
    trained: list[bool] = []
    prompt_len = 0
    done = ""
    for i, (role, _content) in enumerate(turns):
        pieces = []
        if role == "assistant":
            prompt = template.render(turns[:i], add_generation_prompt=True)
            pieces.append((prompt, False))
        pieces.append((template.render(turns[: i + 1], add_generation_prompt=False), True))
        for text, learn in pieces:
            if not text.startswith(done):
                raise ValueError("the chat template does not render a conversation turn by turn")
            learn = learn and role == "assistant"
            body = tok.encode(text[len(done) :])
            ids += body
            trained += [learn] * len(body)
            done = text
            if role == "assistant" and not learn:
                prompt_len = len(ids)
    ids.append(tok.eot_id)
    trained.append(False)
    return ids, trained, prompt_len


def encode_record(
    task: TaskFormat, tok: Tokenizer, rec: Record, template: ChatTemplate | None = None
) -> Example:
    for key in task.required:
        if key not in rec.data or rec.data[key] is None:
            raise RecordError(
                f"{rec.where()}: record has no field '{key}' (task '{task.name}' needs "
                f"{', '.join(task.required)})"
            )
    if task.name == "text":
        ids = [*tok.encode(rec.text("text")), tok.eot_id]
        return Example(ids, [True] * (len(ids) - 1) + [False])
    turns = task.to_turns(rec)
    if template is None:
        ids, trained, prompt_len = encode_turns(tok, turns)
    else:
        try:
            ids, trained, prompt_len = encode_turns_template(tok, turns, template)
        except Exception as exc:  # a template may raise on roles it does not know
            raise RecordError(f"{rec.where()}: the model's chat template failed: {exc}") from None
    return Example(ids, trained, prompt_len, task.answer(rec, turns), {"where": rec.where()})


# ----------------------------------------------------------------------------- reading


def _parallel_paths(spec: str, source_lang: str, target_lang: str) -> tuple[Path, Path] | None:
    """PREFIX → (PREFIX.src[.gz], PREFIX.tgt[.gz]) when both exist."""
    for suffix in ("", *COMPRESSED):
        src = Path(f"{spec}.{source_lang}{suffix}")
        tgt = Path(f"{spec}.{target_lang}{suffix}")
        if src.exists() and tgt.exists():
            return src, tgt
    return None


RECORD_FORMATS = [".jsonl", ".json", ".ndjson", ".csv", ".parquet"]


def read_records(
    spec: str, source_lang: str = "en", target_lang: str = "de", limit: int = 0
) -> Iterator[Record]:
    """Records from a JSONL (.jsonl/.json lines, optionally .gz/.zst), CSV, Parquet file,
    or a parallel-text prefix (``PREFIX.{source_lang,target_lang}[.gz]``, one sentence a line).
    """
    pair = _parallel_paths(spec, source_lang, target_lang)
    n = 0
    if pair is not None:
        src_path, tgt_path = pair
        with open_text(src_path) as fs, open_text(tgt_path) as ft:
            for i, (s, t) in enumerate(zip(fs, ft, strict=False), start=1):
                yield Record({"source": s.rstrip("\n"), "target": t.rstrip("\n")}, str(src_path), i)
                n += 1
                if limit and n >= limit:
                    return
        return
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"no data file {spec} (nor parallel files {spec}.{source_lang}/{spec}.{target_lang})"
        )
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield Record(row, str(path), i)
            if limit and i >= limit:
                return
        return
    if strip_compression(name).endswith(".csv"):
        with open_text(path, newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh), start=1):
                yield Record(dict(row), str(path), i)
                if limit and i >= limit:
                    return
        return
    if Path(strip_compression(name)).suffix not in (".jsonl", ".json", ".ndjson"):
        raise RecordError(unsupported_message(path, RECORD_FORMATS))
    for i, data in _json_objects(path):
        yield Record(data, str(path), i)
        n += 1
        if limit and n >= limit:
            return
    if n == 0:
        raise RecordError(f"{path}: no records (empty file)")


def _json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON Lines file; a malformed line or one that is not an
    object is a RecordError naming file and line."""
    try:
        for i, data in iter_json_lines(path):
            if not isinstance(data, dict):
                raise RecordError(f"{path}:{i}: a record must be a JSON object")
            yield i, data
    except RecordError:
        raise
    except ValueError as exc:  # iter_json_lines: "FILE:LINE: malformed JSON (...)"
        raise RecordError(str(exc)) from None


def self_instruct_records(path: str | Path) -> Iterator[Record]:
    """Self-Instruct files (`instances: [{input, output}]`) as Alpaca records, one per instance."""
    for rec in read_records(str(path)):
        instances = rec.data.get("instances")
        if not isinstance(instances, list):
            raise RecordError(f"{rec.where()}: record has no list field 'instances'")
        for inst in instances:
            yield Record(
                {
                    "instruction": rec.data.get("instruction"),
                    "input": inst.get("input", ""),
                    "output": inst.get("output"),
                },
                rec.file,
                rec.line,
            )


def load_examples(
    task: TaskFormat,
    tok: Tokenizer,
    specs: list[str],
    source_lang: str = "en",
    target_lang: str = "de",
    limit: int = 0,
    template: ChatTemplate | None = None,
) -> list[Example]:
    """Read, validate and encode every record of every file (raises on the first bad one).

    Conversations are rendered through `template` when given (an imported model's own),
    else through lmforge's role-token template."""
    out: list[Example] = []
    for spec in specs:
        recs: Iterator[Record]
        if task.name == "instruction" and _looks_like_self_instruct(spec):
            recs = self_instruct_records(spec)
        else:
            recs = read_records(spec, source_lang, target_lang)
        for rec in recs:
            out.append(encode_record(task, tok, rec, template))
            if limit and len(out) >= limit:
                return out
    return out


def _looks_like_self_instruct(spec: str) -> bool:
    path = Path(spec)
    if not path.is_file() or not path.name.endswith(".jsonl"):
        return False
    with path.open(encoding="utf-8") as fh:
        first = fh.readline()
    try:
        return "instances" in json.loads(first)
    except json.JSONDecodeError:
        return False


def record_texts(
    task: TaskFormat, specs: list[str], source_lang: str = "en", target_lang: str = "de"
) -> Iterator[str]:
    """Plain texts of a task's records (to train a tokenizer when fine-tuning from scratch)."""
    for spec in specs:
        recs = (
            self_instruct_records(spec)
            if task.name == "instruction" and _looks_like_self_instruct(spec)
            else read_records(spec, source_lang, target_lang)
        )
        for rec in recs:
            if task.name == "text":
                yield rec.text("text")
            else:
                for _role, content in task.to_turns(rec):
                    yield content
