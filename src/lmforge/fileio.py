"""Files in and out, one of each: the compressed-file opener, JSON Lines reading and
atomic writes. Every module reads and writes user-visible files through these.

A writer never leaves a half-written file under the final name: it writes ``NAME.tmp``
beside it, fsyncs it and renames it into place (one `os.replace`, atomic on POSIX). A
failed write removes the temporary file and raises, so a rerun starts clean.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

COMPRESSED = (".gz", ".zst", ".bz2", ".xz")


def open_binary(path: str | Path) -> IO[bytes]:
    """Open a file for reading bytes, decompressing gzip / zstd / bz2 / xz by name.

    The one opener of user files: `prepare`, data sources, eval, fine-tuning and bias data.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        import zstandard

        # The zstd reader has no readline; a BufferedReader on top gives it one.
        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb"))
        return io.BufferedReader(raw)  # type: ignore[arg-type]
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".xz"):
        return lzma.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def open_text(path: str | Path, newline: str | None = None) -> IO[str]:
    """`open_binary` as UTF-8 text (invalid bytes become U+FFFD); CSV readers pass newline=""."""
    raw = open_binary(Path(path))
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=newline)


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for each non-blank line of a JSON Lines file (compressed
    or not). A malformed line raises ValueError naming the file and line."""
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            yield lineno, rec


def read_json_lines(path: str | Path) -> list[Any]:
    """Every record of a JSON Lines file, in order (see `iter_json_lines`)."""
    return [rec for _, rec in iter_json_lines(path)]


def fsync_replace(tmp: Path, final: Path) -> None:
    """Flush ``tmp`` to disk and rename it over ``final``."""
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and the exception propagates, so the
    final name holds either the old content or the whole new one.
    """
    final = Path(path)
    tmp = final.with_name(final.name + suffix)
    try:
        yield tmp
        fsync_replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 1) -> None:
    """JSON (UTF-8, non-ASCII kept; values JSON cannot hold are written with `str`)."""
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str))
