"""Token shards: flat arrays of token ids on disk, and the deterministic loader.

Format of a split (``train`` or ``val``) in a tokens folder:

    {split}_{k:05d}.bin    raw little-endian uint16 (vocab ≤ 65,535) or uint32 ids
    {split}_{k:05d}.json   header: format, tokenizer hash, dtype, n_tokens, n_documents,
                           n_bytes (UTF-8 bytes of source text, for bits-per-byte)

Each document is followed by the end-of-text id. A shard is written under a
temporary name and renamed into place with its header last, so a header always
describes a complete file.

The loader memory-maps the shards and cuts them into windows of ``seq_len + 1``
tokens. Sample ``g`` of the run (``g = step · global_batch + j``) lies in epoch
``g // n_windows``; each epoch visits every window once in an order and at an
offset drawn from ``(seed, epoch)``. So any (step, rank, world size) maps to the
same tokens without replaying anything, a resumed run sees the batches an
uninterrupted one would, and the global batch does not depend on world size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmforge.data.document import Document
from lmforge.fast_encode import batches_of, encode_documents
from lmforge.fileio import write_text_atomic
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is needed by the loaders, not by tokenising
    import torch

FORMAT = "lmforge-tokens"
VERSION = 1
COMPLETE = "tokens_complete.json"  # completion marker of a tokens folder


class ShardError(ValueError):
    """A token shard is missing, corrupt, or was made with another tokenizer."""


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split by document id: the same document always lands in the same split."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


SPLITS = ("document", "tail")  # the values of data.split


def split_document(
    doc_id: str, text: str, val_fraction: float, split: str = "document"
) -> tuple[str, str]:
    """The (train, validation) parts of one document: the one train/validation split.

    split="document": the whole text goes to one side, by a hash of the id (`is_validation`).
    split="tail": the last `val_fraction` of the characters is held out (nanoGPT's split of
    a single file such as tinyshakespeare). `tokenize`, the evaluation of a run and the
    built-in fine-tuning tasks all cut here, so held-out text is never trained on.
    """
    if split == "tail":
        cut = int(len(text) * (1 - val_fraction))
        return text[:cut], text[cut:]
    if split != "document":
        raise ValueError(f"data.split = {split!r} is not 'document' or 'tail'")
    return ("", text) if is_validation(doc_id, val_fraction) else (text, "")


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents to ``{split}_{k:05d}.bin``, rolling to a new shard every `shard_tokens`."""

    def __init__(self, out_dir: Path, split: str, tok: Tokenizer, shard_tokens: int = 50_000_000):
        self.out_dir, self.split, self.tok = out_dir, split, tok
        self.dtype = dtype_for(tok.vocab_size)
        self.eot = np.asarray([tok.eot_id], dtype=self.dtype.newbyteorder("<")).tobytes()
        self.shard_tokens = shard_tokens
        self.index = 0
        self.totals = {"n_tokens": 0, "n_documents": 0, "n_bytes": 0, "n_shards": 0}
        self._open()

    def _open(self) -> None:
        self.path = self.out_dir / f"{self.split}_{self.index:05d}.bin"
        self.tmp = self.path.with_suffix(".bin.tmp")
        self.fh = self.tmp.open("wb", buffering=1 << 20)
        self.n_tokens = self.n_docs = self.n_bytes = 0

    def add(self, ids: list[int], n_bytes: int) -> None:
        self.add_bytes(np.asarray(ids, dtype=self.dtype.newbyteorder("<")).tobytes(), n_bytes)

    def add_bytes(self, data: bytes, n_bytes: int) -> None:
        """One document's ids as little-endian bytes of the shard dtype; adds the end-of-text."""
        try:
            self.fh.write(data)
            self.fh.write(self.eot)
        except OSError as exc:
            raise self._write_error(exc) from exc
        self.n_tokens += len(data) // self.dtype.itemsize + 1
        self.n_docs += 1
        self.n_bytes += n_bytes
        if self.n_tokens >= self.shard_tokens:
            self._close()
            self.index += 1
            self._open()

    def discard(self) -> None:
        """Drop the shard being written (finished shards stay)."""
        with contextlib.suppress(OSError):  # the buffered bytes cannot be written either
            self.fh.close()
        self.tmp.unlink(missing_ok=True)
        self.path.with_suffix(".json.tmp").unlink(missing_ok=True)

    def _write_error(self, exc: OSError) -> ShardError:
        """Disk full (or similar) while writing: drop the partial shard, name it, keep the rest."""
        self.discard()
        return ShardError(
            f"{self.tmp}: could not write token shard ({exc.strerror or exc}); "
            "the tokens folder is left unfinished and will be tokenized again on the next run"
        )

    def _close(self) -> None:
        try:
            self._finish()
        except OSError as exc:
            raise self._write_error(exc) from exc

    def _finish(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if self.n_docs == 0 and self.index > 0:
            self.tmp.unlink()
            return
        self.tmp.replace(self.path)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer_hash": self.tok.hash,
            "tokenizer_kind": self.tok.kind,
            "vocab_size": self.tok.vocab_size,
            "eot_id": self.tok.eot_id,
            "dtype": self.dtype.name,
            "n_tokens": self.n_tokens,
            "n_documents": self.n_docs,
            "n_bytes": self.n_bytes,
        }
        write_text_atomic(self.path.with_suffix(".json"), json.dumps(header, indent=1))
        for key, value in (
            ("n_tokens", self.n_tokens),
            ("n_documents", self.n_docs),
            ("n_bytes", self.n_bytes),
        ):
            self.totals[key] += value
        self.totals["n_shards"] += 1

    def close(self) -> dict[str, int]:
        self._close()
        return self.totals


def _split_tails(docs: Iterable[Document], val_fraction: float) -> Iterator[Document]:
    """Each document's head (train) and, when not empty, its tail (val) as two documents."""
    for doc in docs:
        head, tail = split_document(doc.id, doc.text, val_fraction, "tail")
        yield Document(doc.id, head, doc.source, doc.license, {**doc.meta, "split": "train"})
        if tail:
            yield Document(
                doc.id + "#tail", tail, doc.source, doc.license, {**doc.meta, "split": "val"}
            )


def tokenize_documents(
    docs: Iterable[Document],
    tok: Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.05,
    shard_tokens: int = 50_000_000,
    batch_size: int = 512,
    split: str = "document",
    workers: int | None = None,
    parallel_after: int = 4_000_000,
) -> dict[str, dict[str, int]]:
    """Tokenise documents into train/val shards; returns counts per split.

    split="document": whole documents go to validation by a hash of their id.
    split="tail": the last `val_fraction` of every document's characters goes to
    validation (nanoGPT's split of a single file such as tinyshakespeare).
    Batches of up to `batch_size` documents (and about 4 MB) are encoded by
    `lmforge.fast_encode`: the same ids as `tok.encode`, on `workers` processes
    (default: the usable cores) once `parallel_after` characters have passed.
    Existing shards in `out_dir` are replaced.
    """
    if split not in SPLITS:
        raise ValueError(f"data.split = {split!r} is not 'document' or 'tail'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE).unlink(missing_ok=True)  # first: the folder is unfinished from here on
    for old in list(out.glob("train_*")) + list(out.glob("val_*")):
        old.unlink()
    writers = {s: ShardWriter(out, s, tok, shard_tokens) for s in ("train", "val")}
    seen: dict[str, int] = {}  # source file (or name) → documents, for error messages
    docs = _counted(docs, seen)
    try:
        source = _split_tails(docs, val_fraction) if split == "tail" else docs
        batches = batches_of(source, _text, 4_000_000, batch_size)
        dtype = writers["train"].dtype
        for batch, encoded in encode_documents(batches, _text, tok, dtype, workers, parallel_after):
            for doc, data in zip(batch, encoded, strict=True):
                if split == "tail":
                    name = doc.meta["split"]
                else:
                    name = "val" if is_validation(doc.id, val_fraction) else "train"
                writers[name].add_bytes(data, _utf8_len(doc.text))
        counts = {s: w.close() for s, w in writers.items()}
    except (OSError, ShardError):
        for w in writers.values():  # free the space the partial shards hold
            w.discard()
        raise
    _check_splits(counts, split, val_fraction, seen)
    # Written last, so a folder with the marker holds every shard of both splits:
    # a run killed between shards leaves no marker and is tokenized again.
    marker = out / COMPLETE
    try:
        write_text_atomic(marker, json.dumps({"tokenizer_hash": tok.hash, **counts}, indent=1))
    except OSError as exc:
        raise ShardError(f"{marker}: could not write ({exc.strerror or exc})") from exc
    return counts


def _counted(docs: Iterable[Document], seen: dict[str, int]) -> Iterator[Document]:
    for doc in docs:
        where = str(doc.meta.get("path") or doc.source or doc.id)
        seen[where] = seen.get(where, 0) + 1
        yield doc


def _check_splits(
    counts: dict[str, dict[str, int]], split: str, val_fraction: float, seen: dict[str, int]
) -> None:
    """Refuse an empty split now, naming the sources, rather than at the first training step."""
    empty = [s for s in ("train", "val") if counts[s]["n_tokens"] == 0]
    if val_fraction <= 0 and empty == ["val"]:
        return  # no validation asked for
    if not empty:
        return
    n_docs = sum(seen.values())
    names = ", ".join(list(seen)[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")
    got = f"{n_docs} document(s) from {names}" if seen else "no documents"
    hint = ""
    if split == "document" and n_docs:
        # The document split sends whole documents to validation by a hash of their id.
        hint = (
            "; data.split=document puts whole documents in validation, so with this few "
            "documents use data.split=tail (the last val_fraction of each document)"
        )
    raise ShardError(f"the '{empty[0]}' split has 0 tokens: the data sources gave {got}{hint}")


def _text(doc: Document) -> str:
    return doc.text


def _utf8_len(text: str) -> int:
    """UTF-8 bytes of the source text (a lone surrogate counts as one replaced byte)."""
    if text.isascii():  # O(1) in CPython: one byte per character
        return len(text)
    return len(text.encode("utf-8", errors="replace"))


def shards_complete(tokens_dir: str | Path, tokenizer_hash: str) -> bool:
    """Whether `tokens_dir` holds a finished tokenization made with this tokenizer.

    Folders without the marker (from before it existed, or killed just before
    writing it) count as finished only when no temporary file is left, every
    ``.bin`` has its header (a shard is renamed into place before its header is
    written) and both splits' headers check out.
    """
    out = Path(tokens_dir)
    marker = out / COMPLETE
    if marker.exists():
        try:
            return json.loads(marker.read_text()).get("tokenizer_hash") == tokenizer_hash
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
    if not out.is_dir() or any(out.glob("*.tmp")):
        return False
    if any(not b.with_suffix(".json").exists() for b in out.glob("*.bin")):
        return False
    try:
        return all(split_info(out, s).tokenizer_hash == tokenizer_hash for s in ("train", "val"))
    except ShardError:
        return False


# ----------------------------------------------------------------------------- reading


@dataclass
class SplitInfo:
    n_tokens: int
    n_documents: int
    n_bytes: int
    tokenizer_hash: str
    vocab_size: int

    @property
    def tokens_per_byte(self) -> float:
        return self.n_tokens / max(self.n_bytes, 1)


def _headers(tokens_dir: Path, split: str) -> list[tuple[Path, dict]]:
    headers = []
    for hpath in sorted(tokens_dir.glob(f"{split}_*.json")):
        try:
            header = json.loads(hpath.read_text())
        except json.JSONDecodeError as exc:
            raise ShardError(f"{hpath}: corrupt shard header ({exc.msg})") from None
        except UnicodeDecodeError:
            raise ShardError(f"{hpath}: corrupt shard header (not UTF-8)") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ShardError(f"{hpath}: not an lmforge token shard header")
        _check_header(hpath, header)
        binpath = hpath.with_suffix(".bin")
        if not binpath.exists():
            raise ShardError(f"{hpath}: its data file {binpath.name} is missing")
        expected = header["n_tokens"] * np.dtype(header["dtype"]).itemsize
        if binpath.stat().st_size != expected:
            raise ShardError(
                f"{binpath}: {binpath.stat().st_size} bytes, header says {expected} (truncated?)"
            )
        headers.append((binpath, header))
    if not headers:
        raise ShardError(f"no '{split}' token shards in {tokens_dir} (run `lmforge tokenize`)")
    return headers


def _check_header(hpath: Path, header: dict) -> None:
    """Every field the readers use, with its type: a mangled header is a clear error."""
    for key in ("n_tokens", "n_documents", "n_bytes", "vocab_size", "eot_id"):
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ShardError(f"{hpath}: field '{key}' = {value!r} is not a non-negative integer")
    if header.get("dtype") not in ("uint16", "uint32"):
        raise ShardError(f"{hpath}: field 'dtype' = {header.get('dtype')!r} is not uint16/uint32")
    if not isinstance(header.get("tokenizer_hash"), str):
        raise ShardError(f"{hpath}: field 'tokenizer_hash' is missing")


def split_info(tokens_dir: str | Path, split: str) -> SplitInfo:
    headers = [h for _, h in _headers(Path(tokens_dir), split)]
    return SplitInfo(
        n_tokens=sum(h["n_tokens"] for h in headers),
        n_documents=sum(h["n_documents"] for h in headers),
        n_bytes=sum(h["n_bytes"] for h in headers),
        tokenizer_hash=headers[0]["tokenizer_hash"],
        vocab_size=headers[0]["vocab_size"],
    )


class TokenStream:
    """The shards of one split as one logical array (memory-mapped)."""

    def __init__(self, tokens_dir: str | Path, split: str, tokenizer_hash: str | None = None):
        self.dir = Path(tokens_dir)
        self.split = split
        headers = _headers(self.dir, split)
        hashes = {h["tokenizer_hash"] for _, h in headers}
        if len(hashes) > 1:
            raise ShardError(f"{self.dir}: '{split}' shards were made with different tokenizers")
        self.tokenizer_hash = hashes.pop()
        if tokenizer_hash is not None and tokenizer_hash != self.tokenizer_hash:
            raise ShardError(
                f"{self.dir}: '{split}' shards were made with tokenizer {self.tokenizer_hash}, "
                f"but this run uses tokenizer {tokenizer_hash}; re-run `lmforge tokenize`"
            )
        self.arrays = [
            np.memmap(path, dtype=np.dtype(h["dtype"]), mode="r")
            if h["n_tokens"]
            else np.empty(0, dtype=np.dtype(h["dtype"]))
            for path, h in headers
        ]
        self.starts = np.cumsum([0] + [a.size for a in self.arrays])
        self.n_tokens = int(self.starts[-1])
        self.n_bytes = sum(h["n_bytes"] for _, h in headers)
        self.n_documents = sum(h["n_documents"] for _, h in headers)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - int(self.starts[k])
        a = self.arrays[k]
        if local + length <= a.size:
            return a[local : local + length].astype(np.int64)
        parts, need = [], length
        while need > 0:
            a = self.arrays[k]
            take = a[local : local + need]
            parts.append(take.astype(np.int64))
            need -= take.size
            k, local = k + 1, 0
        return np.concatenate(parts)

    def read_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows ``[s, s + length)`` for each start, as one (len(starts), length) int64 array.

        One fancy-indexed gather per shard instead of a Python loop over rows; a row
        that crosses a shard boundary (rare) is read on its own.
        """
        sizes = np.diff(self.starts)
        k = np.searchsorted(self.starts, starts, side="right") - 1
        local = starts - self.starts[k]
        cross = local + length > sizes[k]
        if len(self.arrays) == 1 and not cross.any():
            return self.arrays[0][local[:, None] + np.arange(length)].astype(np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        for shard in np.unique(k[~cross]):
            rows = np.nonzero((k == shard) & ~cross)[0]
            out[rows] = self.arrays[shard][local[rows, None] + np.arange(length)]
        for row in np.nonzero(cross)[0]:
            out[row] = self.read(int(starts[row]), length)
        return out

    def counts(self, vocab_size: int) -> np.ndarray:
        total = np.zeros(vocab_size, dtype=np.int64)
        for a in self.arrays:
            total += np.bincount(a, minlength=vocab_size)[:vocab_size]
        return total


def first_sample(
    step: int, micro: int, micro_batch: int, accum: int, rank: int = 0, world: int = 1
) -> int:
    """Global number of the first sample of micro-batch `micro` of step `step` on `rank`.

    Step `s` owns samples [s·G, (s+1)·G) with G = micro_batch · accum · world; each rank takes a
    contiguous slice of them. The set a step sees depends only on G, never on how it is split.
    """
    global_batch = micro_batch * accum * world
    return step * global_batch + (rank * accum + micro) * micro_batch


class SampleBatches:
    """The base of every batch source `Trainer` reads: the loader of token shards, the
    masked-LM one, packed fine-tuning rows and preference pairs.

    Micro-batch `micro` of step `step` on `rank` is the run's samples numbered from
    `first_sample`, so a resumed run, or the same global batch split another way, sees
    the same data. A subclass says how to build samples ``first .. first + n - 1``.
    """

    rows_per_sample = 1  # rows of the micro-batch each sample fills (a preference pair: 2)

    def batch(
        self,
        step: int,
        micro: int,
        micro_batch_size: int,
        accum_steps: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `micro` of optimizer step `step` for `rank`: (B, T) inputs and targets."""
        n = micro_batch_size // self.rows_per_sample
        return self.samples(first_sample(step, micro, n, accum_steps, rank, world_size), n)

    def samples(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of samples ``first .. first + n - 1`` of the run."""
        raise NotImplementedError


class EpochOrder:
    """Item number of sample `g` in a run that visits `n` items once per epoch, in an
    order drawn from ``(seed, epoch)``: deterministic, so resuming repeats it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def __call__(self, g: int) -> int:
        epoch, k = divmod(g, self.n)
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = rng.permutation(self.n)
            self._epoch = epoch
        return int(self._perm[k])


class TokenLoader(SampleBatches):
    """Deterministic batches of (inputs, targets) drawn from (seed, step, rank, world size)."""

    def __init__(
        self,
        tokens_dir: str | Path,
        split: str,
        seq_len: int,
        seed: int = 0,
        tokenizer_hash: str | None = None,
    ):
        self.stream = TokenStream(tokens_dir, split, tokenizer_hash)
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (self.stream.n_tokens - seq_len) // seq_len
        if self.n_windows < 1:
            raise ShardError(
                f"{tokens_dir}: the '{split}' split has {self.stream.n_tokens} tokens, "
                f"fewer than one window of {seq_len + 1}: add text to the data sources or lower "
                "model.context_length"
                + (
                    "; for validation, raise data.val_fraction, or with few documents use "
                    "data.split=tail"
                    if split == "val"
                    else ""
                )
            )
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        self._offset = 0

    def _epoch_order(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._offset = int(rng.integers(self.seq_len))
            self._perm = rng.permutation(self.n_windows)
            self._epoch = epoch

    def window_start(self, g: int) -> int:
        """Token offset of window number `g` of the run."""
        epoch, k = divmod(g, self.n_windows)
        self._epoch_order(epoch)
        return self._offset + int(self._perm[k]) * self.seq_len

    def window_starts(self, first: int, n: int) -> np.ndarray:
        """Token offsets of windows ``first .. first + n - 1`` of the run (as `window_start`)."""
        epoch, k = np.divmod(np.arange(first, first + n, dtype=np.int64), self.n_windows)
        out = np.empty(n, dtype=np.int64)
        for e in np.unique(epoch):  # one epoch, or two where the batch straddles a boundary
            self._epoch_order(int(e))
            sel = epoch == e
            out[sel] = self._offset + self._perm[k[sel]] * self.seq_len
        return out

    def sample(self, g: int) -> np.ndarray:
        """Window number `g` of the run: seq_len + 1 tokens."""
        return self.stream.read(self.window_start(g), self.seq_len + 1)

    def samples(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``first .. first + n - 1`` of the run: (n, T) inputs and targets."""
        import torch  # loaded already by whoever trains: a dictionary lookup

        starts = self.window_starts(first, n)
        data = torch.from_numpy(self.stream.read_rows(starts, self.seq_len + 1))
        return data[:, :-1], data[:, 1:]

    def sequential(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Validation batches: consecutive windows from the start, about `n_tokens` in all."""
        import torch

        n_seq = max(1, min(n_tokens // self.seq_len, self.n_windows))
        for i in range(0, n_seq, batch_size):
            rows = [
                self.stream.read(j * self.seq_len, self.seq_len + 1)
                for j in range(i, min(i + batch_size, n_seq))
            ]
            data = torch.from_numpy(np.stack(rows))
            yield data[:, :-1], data[:, 1:]
