"""Basic document sources used by the core slice (the full pipeline adds more readers).

- ``python-stdlib``: the `.py` files of the running interpreter's standard library,
  in sorted path order, test suites and vendored packages excluded. Always present,
  no download. Licence: PSF-2.0.
- a file, folder or glob of text files (``.txt``, ``.md``, ``.py``, ...)
- JSONL document shards (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``) with a ``text`` field

Files are decoded as UTF-8 with ``errors="replace"``: an invalid byte becomes U+FFFD
and the document's ``meta["replaced_bytes"]`` says how many.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lmforge.data.document import Document

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ""}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.zst")
# Standard-library folders that are test suites, vendored code or data, not library source.
STDLIB_SKIP = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "__pycache__",
}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# Machine-generated modules: codec tables written by gencodec.py (≈ 1.2 MB of near-identical
# `0x00e9 -> LATIN SMALL LETTER E WITH ACUTE` lines that a small model learns first and then
# samples forever) and pydoc's topic dump. Generated code is filtered from code corpora for
# the same reason (auto-generated markers, as in the data pipeline's code filters).
STDLIB_GENERATED = ("pydoc_data/topics.py",)


def _is_generated(path: Path, rel: str) -> bool:
    if rel in STDLIB_GENERATED:
        return True
    if rel.startswith("encodings/"):
        with path.open("rb") as fh:
            return b"gencodec.py" in fh.read(600)
    return False


def stdlib_files() -> list[Path]:
    """The standard library's own source: no tests, vendored packages or generated tables."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in STDLIB_SKIP for part in rel.parts[:-1]) or _is_generated(
            path, rel.as_posix()
        ):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def decode_bytes(data: bytes) -> tuple[str, int]:
    """UTF-8 decode with replacement; returns the text and the number of replaced bytes."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # Each U+FFFD beyond those already in the source stands for ≥ 1 invalid byte.
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


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


def open_maybe_compressed(path: Path) -> IO[str]:
    name = path.name
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    if name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb"))
        return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def iter_jsonl(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Read a JSONL document shard. A malformed line raises, naming file and line."""
    with open_maybe_compressed(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise ValueError(f"{path}:{lineno}: record has no string field '{text_field}'")
            yield Document(
                id=str(rec.get("id", f"{path.name}:{lineno}")),
                text=rec[text_field],
                source=str(rec.get("source", path.name)),
                license=str(rec.get("license", "unknown")),
                meta=rec.get("meta") or {},
            )


def _expand(spec: str) -> list[Path]:
    from lmforge.data.readers import resolve_source_path

    path = resolve_source_path(spec)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.exists():
        return [path]
    matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        raise FileNotFoundError(f"data source '{spec}' matches no file")
    return files


def iter_source(spec: str) -> Iterator[Document]:
    """Documents from one source spec (see the module docstring)."""
    if spec == "python-stdlib":
        yield from iter_stdlib()
        return
    from lmforge.data.readers import resolve_source_path

    base = resolve_source_path(spec) if resolve_source_path(spec).is_dir() else None
    for path in _expand(spec):
        name = path.name
        if name.endswith(JSONL_SUFFIXES):
            yield from iter_jsonl(path)
        elif path.suffix in TEXT_SUFFIXES:
            # Ids are relative to the source (folder name / relative path), never absolute, so
            # the train/val split does not depend on where the data happens to live.
            rel = path.relative_to(base).as_posix() if base else name
            doc_id = f"{base.name}/{rel}" if base else name
            yield read_text_file(path, doc_id, spec, "unknown")


def iter_documents(specs: list[str]) -> Iterator[Document]:
    for spec in specs:
        yield from iter_source(spec)
