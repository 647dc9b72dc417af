"""Data sources as the training commands read them (`data.sources`, `eval --data`,
`bias --data`, the fine-tuning tasks): the same formats as `lmforge prepare`, through
its readers. This is the upper layer of the one reader stack: `lmforge.data.readers`
(formats, kinds, decoding; compression through `lmforge.fileio`) never imports it.

- ``python-stdlib``: the `.py` files of the running interpreter's standard library,
  in sorted path order, test suites and vendored packages excluded. Always present,
  no download. Licence: PSF-2.0.
- a file, folder or glob of text (``.txt .md .rst``, code), JSONL / JSON / CSV / Parquet
  records, HTML or WARC/WET, each optionally ``.gz``/``.zst``/``.bz2``/``.xz``-compressed.
  Records take their text from ``text``; ``PATH:FIELD`` names another field.

Files are decoded as UTF-8 with ``errors="replace"``: an invalid byte becomes U+FFFD
and the document's ``meta["replaced_bytes"]`` says how many. Bad input stops with one
line naming the file: bytes that are not text (a NUL byte in the first 8 KiB, or more
than 1% invalid UTF-8: `prepare` would skip these, but training on them silently makes a
vocabulary of junk), a malformed record, a named file of an unsupported type (with a
"did you mean" for a misspelled suffix), or sources with no text at all. Warnings, on
stderr, name what is skipped: empty files, and unsupported files inside a folder.
"""

from __future__ import annotations

import difflib
import glob
import sys
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import PrepareConfig, PrepareSource
from lmforge.data.document import Document
from lmforge.data.readers import (  # decode_bytes, stdlib_*: also imported from here
    CODE_LANGUAGES,
    HTML_EXT,
    JSONL_EXT,
    TEXT_EXT,
    Reader,
    Skip,
    decode_bytes,
    decode_text,
    kind_of_file,
    read_bounded,
    resolve_source_path,
    stdlib_files,
    stdlib_root,
)
from lmforge.fileio import COMPRESSED, iter_json_lines, open_binary, open_text  # noqa: F401


def read_text_file(path: Path, doc_id: str, source: str, license: str) -> Document:
    text, replaced = decode_bytes(path.read_bytes())
    meta: dict[str, object] = {"path": str(path)}
    if replaced:
        meta["replaced_bytes"] = replaced
    return Document(id=doc_id, text=text, source=source, license=license, meta=meta)


def iter_stdlib() -> Iterator[Document]:
    root = stdlib_root()
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        yield read_text_file(path, f"python-stdlib/{rel}", "python-stdlib", "PSF-2.0")


def iter_jsonl(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Read a JSONL document shard. A malformed line raises, naming file and line."""
    for lineno, rec in iter_json_lines(path):
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise ValueError(f"{path}:{lineno}: record has no string field '{text_field}'")
        yield Document(
            id=str(rec.get("id", f"{path.name}:{lineno}")),
            text=rec[text_field],
            source=str(rec.get("source", path.name)),
            license=str(rec.get("license", "unknown")),
            meta=rec.get("meta") or {},
        )


def _expand(spec: str) -> tuple[list[Path], bool]:
    """The files of a source, and whether the spec named one file (rather than a folder/glob)."""
    path = resolve_source_path(spec)
    if path.is_dir():
        # Hidden files (.DS_Store, .gitignore, editor swap files) are not part of a corpus.
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [p for p in files if not p.relative_to(path).as_posix().startswith(".")], False
    if path.exists():
        return [path], True
    matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        raise FileNotFoundError(f"data source '{spec}' matches no file")
    return files, False


def split_field(spec: str) -> tuple[str, str]:
    """``PATH:FIELD`` → (PATH, FIELD) for records whose text is not in ``text``.

    The colon counts only when PATH exists and the whole spec does not, so ``shared:NAME``
    and paths with colons keep working.
    """
    head, sep, field = spec.rpartition(":")
    if not (sep and head and field.isidentifier()) or resolve_source_path(spec).exists():
        return spec, "text"
    return (head, field) if resolve_source_path(head).exists() else (spec, "text")


def supported_suffixes() -> str:
    kinds = sorted(TEXT_EXT | JSONL_EXT | HTML_EXT | {".json", ".csv", ".tsv", ".parquet"})
    return (
        f"{' '.join(kinds)}, code ({len(CODE_LANGUAGES)} languages: .py .c .js …), "
        f"WARC/WET, each also {'/'.join(COMPRESSED)}-compressed"
    )


def unsupported_message(path: Path, formats: list[str] | None = None) -> str:
    """One line: the file, its suffix, a guess if it looks like a misspelled one, what works.

    `formats`: the suffixes a reader of records takes (default: every data-source format).
    """
    suffix = "".join(path.suffixes[-2:]) if path.suffix.lower() in COMPRESSED else path.suffix
    known = formats or [*TEXT_EXT, *JSONL_EXT, *HTML_EXT, ".json", ".csv", ".tsv", ".parquet"]
    candidates = [*known, *COMPRESSED, *([] if formats else [".warc", *CODE_LANGUAGES])]
    close = difflib.get_close_matches(path.suffix.lower(), candidates, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    supported = (
        f"{' '.join(formats)}, each also {'/'.join(COMPRESSED)}-compressed"
        if formats
        else supported_suffixes()
    )
    return f"{path}: unsupported file type '{suffix}'{hint}; supported: {supported}"


# A short text with a few stray bytes is damaged text, not another encoding: below this
# many invalid bytes a file is read with U+FFFD (and counted) whatever its share.
MIN_INVALID_BYTES = 16


def _read_file(path: Path, doc_id: str, spec: str, field: str) -> Iterator[Document]:
    """Documents of one file, through `prepare`'s readers; bad input raises naming the file."""
    kind = kind_of_file(path)
    if kind is None:
        raise ValueError(unsupported_message(path))
    if kind == "jsonl":
        yield from iter_jsonl(path, field)
        return
    if kind in ("text", "code"):
        data = read_bounded(path, 0)
        got = data if isinstance(data, Skip) else decode_text(data, str(path), MIN_INVALID_BYTES)
        if isinstance(got, Skip):
            if got.reason != "empty_file":
                raise ValueError(_skip_message(got))
            return
        text, replaced = got
        meta: dict[str, object] = {"path": str(path)}
        if replaced:
            meta["replaced_bytes"] = replaced
        yield Document(id=doc_id, text=text, source=spec, license="unknown", meta=meta)
        return
    limits = PrepareConfig()
    src = PrepareSource(path=str(path), kind=kind, text_field=field)  # type: ignore[arg-type]
    reader = Reader(src, limits.max_file_bytes, limits.max_line_bytes)
    for item in getattr(reader, f"read_{kind}")(path):
        if isinstance(item, Skip):
            if item.reason in ("empty_file", "no_text_extracted"):
                continue
            raise ValueError(_skip_message(item))
        yield item


def _skip_message(skip: Skip) -> str:
    where = f"{skip.file}:{skip.line}" if skip.line else skip.file
    detail = f" ({skip.detail})" if skip.detail else ""
    if skip.reason in ("binary", "invalid_utf8"):
        # Training on such bytes makes a vocabulary of thousands of junk "characters";
        # `prepare` drops these files and counts them in its report instead.
        what = "is not text (binary)" if skip.reason == "binary" else "is not UTF-8 text"
        return (
            f"{where}: {what}{detail}; remove it from the sources, or run `lmforge prepare`, "
            "which skips and counts such files"
        )
    return f"{where}: {skip.reason.replace('_', ' ')}{detail}"


_warned: set[str] = set()


def warn(message: str) -> None:
    """One stderr line, once per process (the tokenizer and tokenize passes read the same files)."""
    if message not in _warned:
        _warned.add(message)
        print(f"lmforge: warning: {message}", file=sys.stderr, flush=True)


def iter_source(spec: str, empty: list[str] | None = None) -> Iterator[Document]:
    """Documents from one source spec (see the module docstring).

    Bad input: a file that is not text (NUL bytes, or more than 1% invalid UTF-8), a
    malformed record, or a named file of an unsupported type raises, naming the file.
    Unsupported files inside a folder or glob are skipped with one warning that names them;
    an empty file is skipped with a warning and added to `empty`.
    """
    if spec == "python-stdlib":
        yield from iter_stdlib()
        return
    spec, field = split_field(spec)
    root = resolve_source_path(spec)
    base = root if root.is_dir() else None
    files, named = _expand(spec)
    unsupported = [p for p in files if kind_of_file(p) is None]
    if unsupported and named:
        raise ValueError(unsupported_message(unsupported[0]))
    if unsupported:
        names = ", ".join(p.name for p in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        warn(
            f"{spec}: skipping {len(unsupported)} file(s) of unsupported type: {names}{more} "
            f"(supported: {supported_suffixes()})"
        )
    for path in files:
        if kind_of_file(path) is None:
            continue
        # Ids are relative to the source (folder name / relative path), never absolute, so
        # the train/val split does not depend on where the data happens to live.
        doc_id = f"{base.name}/{path.relative_to(base).as_posix()}" if base else path.name
        n = 0
        for doc in _read_file(path, doc_id, spec, field):
            n += bool(doc.text.strip())
            yield doc
        if n == 0:
            warn(f"{path}: no text (empty file); skipped")
            if empty is not None:
                empty.append(str(path))


def iter_documents(specs: list[str]) -> Iterator[Document]:
    """Documents of every source; raises, naming the sources and empty files, if none has text."""
    empty: list[str] = []
    n = 0
    for spec in specs:
        for doc in iter_source(spec, empty):
            n += bool(doc.text.strip())
            yield doc
    if n == 0:
        files = f" (empty: {', '.join(empty[:5])}{' …' if len(empty) > 5 else ''})" if empty else ""
        raise ValueError(f"no text in the data sources {', '.join(specs)}{files}")
