"""The built-in creative-writing examples: an opening of a passage → what follows.

Built from plain-text documents (by default the shared Project Gutenberg books and
tinyshakespeare) with no download. Each document is cleaned as `prepare` cleans it
(`data.clean.strip_gutenberg`, `normalise_whitespace`), cut into paragraphs, and long
paragraphs into pieces at sentence (prose) or line (verse, scenes) boundaries. An
example takes pieces until the opening has at least `opening_chars` characters, then
pieces until the continuation has at least `continuation_chars`; the next example
starts where that continuation ended, so no text is in two examples.

The split follows the pre-training split of the same documents, so held-out
continuations were never pre-trained on:

- ``split="tail"``: the last `held_fraction` of every document's characters (the
  cut `shards.split_document` makes on the same text) is held out; its first half
  gives the validation examples, its second half the test examples;
- ``split="document"``: documents that `shards.is_validation` puts in validation
  are held out, alternately to validation and test by their order.

A document whose lines are mostly short (verse, a play such as tinyshakespeare) is a
"scene" (line breaks kept); any other is a "story" (paragraph lines joined). Each split is shuffled with a
fixed seed, so ``finetune.max_examples`` takes examples from every document.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.data.clean import normalise_whitespace, strip_gutenberg
from lmforge.fileio import write_text_atomic
from lmforge.shards import is_validation, split_document

if TYPE_CHECKING:
    from lmforge.config import Config

DEFAULT_SOURCES = ["shared:gutenberg", "shared:tinyshakespeare/input.txt"]
# An opening of 200+ characters and a continuation of 240+, in pieces of at most 240: an
# example of about 700 characters (≈ 220 BPE tokens of a 4,096 vocabulary) fits a
# context of 256 with its prompt whole.
OPENING_CHARS = 200
CONTINUATION_CHARS = 240
MAX_PIECE_CHARS = 240
# Gutenberg prose is wrapped at about 70 characters; verse and speaker lines are shorter.
SHORT_LINE = 50
SPLITS = ("train", "val", "test")


def style_of(text: str) -> str:
    """ "scene" for verse and plays (most lines short, line breaks meaningful), else "story"."""
    lines = [line for line in text.split("\n") if line.strip()]
    short = sum(len(line) < SHORT_LINE for line in lines)
    return "scene" if lines and short > len(lines) / 2 else "story"


def pieces(text: str, style: str, max_chars: int = MAX_PIECE_CHARS) -> Iterator[tuple[str, str]]:
    """(separator before it, piece) for the paragraphs of `text`, long ones cut at boundaries.

    The separator is "\\n\\n" between paragraphs, and " " (story) or "\\n" (scene)
    between the pieces of one paragraph. A single sentence or line longer than
    `max_chars` is a piece of its own (never cut inside).
    """
    from lmforge.generation import split_sentences

    inner = "\n" if style == "scene" else " "
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        if style == "scene":
            units = [line.rstrip() for line in para.split("\n") if line.strip()]
        else:
            units = split_sentences(" ".join(para.split())).split("\n")
        sep, cur = "\n\n", ""
        for unit in units:
            if cur and len(cur) + 1 + len(unit) > max_chars:
                yield sep, cur
                sep, cur = inner, ""
            cur = f"{cur}{inner}{unit}" if cur else unit
        if cur:
            yield sep, cur


def passage_examples(
    text: str,
    style: str,
    opening_chars: int = OPENING_CHARS,
    continuation_chars: int = CONTINUATION_CHARS,
) -> list[dict[str, str]]:
    """Consecutive, non-overlapping {prompt, continuation, style} records of one text."""
    out: list[dict[str, str]] = []
    opening: list[str] = []
    target: list[str] = []
    for sep, piece in pieces(text, style):
        if len("".join(opening)) < opening_chars:
            opening += [sep, piece] if opening else [piece]
            continue
        target += [sep, piece] if target else [piece]
        if len("".join(target)) >= continuation_chars:
            out.append(
                {"prompt": "".join(opening), "continuation": "".join(target), "style": style}
            )
            opening, target = [], []
    return out


def clean_region(text: str) -> str:
    """A region of a raw document without Gutenberg boilerplate, whitespace normalised."""
    return normalise_whitespace(strip_gutenberg(text)[0])


def split_regions(
    sources: list[str], held_fraction: float, split: str = "tail"
) -> Iterator[tuple[str, str, str]]:
    """(split, document id, cleaned text) regions of every document (see the module docstring)."""
    from lmforge.data.sources import iter_documents

    held_docs = 0
    for doc in iter_documents(sources):
        if Path(doc.id).name.lower().startswith("readme"):
            continue  # a data folder's description (the shared books' README), not a story
        if split == "document":
            if is_validation(doc.id, held_fraction):
                yield ("val" if held_docs % 2 == 0 else "test"), doc.id, clean_region(doc.text)
                held_docs += 1
            else:
                yield "train", doc.id, clean_region(doc.text)
            continue
        head, tail = split_document(doc.id, doc.text, held_fraction, "tail")
        yield "train", doc.id, clean_region(head)
        held = clean_region(tail)
        mid = held.find("\n\n", len(held) // 2)
        mid = len(held) // 2 if mid < 0 else mid
        yield "val", doc.id, held[:mid]
        yield "test", doc.id, held[mid:]


def creative_records(
    sources: list[str] | None = None, held_fraction: float = 0.1, split: str = "tail", seed: int = 0
) -> dict[str, list[dict[str, str]]]:
    """Records of each split, each with the id of its document, shuffled with `seed`."""
    records: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for name, doc_id, text in split_regions(sources or DEFAULT_SOURCES, held_fraction, split):
        for rec in passage_examples(text, style_of(text)):
            records[name].append({**rec, "document": doc_id})
    for name in SPLITS:
        random.Random(f"{seed}:{name}").shuffle(records[name])
    return records


def build_creative(
    out_dir: str | Path,
    sources: list[str] | None = None,
    held_fraction: float = 0.1,
    split: str = "tail",
) -> dict[str, Path]:
    """Write train/val/test JSONL files of `creative_records` unless already there."""
    out_dir = Path(out_dir)
    paths = {s: out_dir / f"{s}.jsonl" for s in SPLITS}
    if all(p.exists() for p in paths.values()):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    records = creative_records(sources, held_fraction, split)
    for name, path in paths.items():
        lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records[name])
        write_text_atomic(path, "".join(lines))
    return paths


def builtin_creative(cfg: Config, out_dir: Path) -> dict[str, list[str]]:
    """The task files of a run without `finetune.train_files`.

    A run that pre-trains builds them from its own `data.sources` with its own split
    (so the held-out examples were never pre-trained on); otherwise from the shared
    books and tinyshakespeare, holding out the last tenth of each.
    """
    if "pretrain" in cfg.run.stages:
        paths = build_creative(out_dir, cfg.data.sources, cfg.data.val_fraction, cfg.data.split)
    else:
        paths = build_creative(out_dir)
    for name, path in paths.items():
        if path.stat().st_size == 0:
            raise ValueError(
                f"{path}: the built-in creative task has no {name} examples (the held-out "
                "tail of each document is too short); use longer documents, a larger "
                "data.val_fraction, or your own finetune.train_files/val_files/test_files"
            )
    return {s: [str(p)] for s, p in paths.items()}
