"""Tokenizers: byte-level BPE (HF `tokenizers`) and a character vocabulary.

Both save to one `tokenizer.json`. BPE files are ordinary HF `tokenizers` files
(loadable by `tokenizers.Tokenizer.from_file` and `transformers`); a character
tokenizer is a small JSON of its own (`{"lmforge_char_tokenizer": 1, ...}`).

Special tokens are reserved at fixed ids 0..N-1 in both kinds, so `eot_id` is 0.

Round trip: byte-level BPE maps every byte to a symbol, so `decode(encode(s)) == s`
for every Python string that is valid Unicode. Text that was not valid UTF-8 in
its source file never reaches the tokenizer as such: readers decode files with
`errors="replace"`, so each invalid byte becomes U+FFFD (and is counted by the
reader). Lone surrogates (which Rust strings cannot hold) are replaced by U+FFFD
the same way in `encode`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.fileio import write_text_atomic

EOT = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = [EOT, PAD, MASK, SYSTEM, USER, ASSISTANT, END]

# A plain chat template (Jinja, as HF stores it): role tokens open a turn, <|end|> closes it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(text: str) -> str:
    """Replace lone surrogates, which cannot cross into Rust, with U+FFFD."""
    if text.isascii():  # constant time in CPython, and most text is
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


class Tokenizer:
    """The interface every stage uses: encode, decode, specials, a content hash."""

    kind = "base"

    def __init__(self, vocab_size: int, specials: dict[str, int]):
        self.vocab_size = vocab_size
        self.specials = specials
        self.eot_id = specials[EOT]
        self.pad_id = specials[PAD]
        self.mask_id = specials[MASK]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self.to_json())
        return path

    @property
    def hash(self) -> str:
        """sha256 of the serialised tokenizer: token shards record it and refuse a mismatch."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, hf: HFTokenizer):
        specials = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in specials.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        super().__init__(hf.get_vocab_size(), specials)  # type: ignore[arg-type]
        self.hf = hf

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(_clean(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust-side parallelism across the batch (TOKENIZERS_PARALLELISM).
        encs = self.hf.encode_batch([_clean(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.hf.to_str()


class CharTokenizer(Tokenizer):
    """One id per character seen in training; unseen characters raise (nanoGPT's behaviour)."""

    kind = "char"

    def __init__(self, chars: list[str]):
        specials = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        super().__init__(len(SPECIAL_TOKENS) + len(chars), specials)
        self.chars = chars
        self.stoi = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}
        self.itos = list(SPECIAL_TOKENS) + chars

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(
                f"character {exc.args[0]!r} is not in the character vocabulary"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"lmforge_char_tokenizer": 1, "chars": self.chars}, ensure_ascii=False)


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, no normaliser, no prefix space)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((_clean(t) for t in texts), trainer=trainer)
    return BPETokenizer(tok)


def train_char(texts: Iterable[str]) -> CharTokenizer:
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    return CharTokenizer(sorted(chars))


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int) -> Tokenizer:
    if kind == "char":
        return train_char(texts)
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    raise ValueError(f"tokenizer.kind = {kind!r} is not 'bpe' or 'char'")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` (or a folder holding one) of either kind."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a tokenizer file (invalid JSON: {exc})") from None
    if isinstance(data, dict) and data.get("lmforge_char_tokenizer"):
        return CharTokenizer(list(data["chars"]))
    return BPETokenizer(HFTokenizer.from_str(text))


def iter_limited(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Yield texts until about `max_bytes` of UTF-8 have passed (0 = no limit)."""
    seen = 0
    for t in texts:
        yield t
        seen += len(t.encode("utf-8", errors="replace"))
        if max_bytes and seen >= max_bytes:
            return
