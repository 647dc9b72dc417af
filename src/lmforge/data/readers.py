"""Readers: turn raw inputs into `Document`s, and bad input into counted, named skips.

The lower layer of the one reader stack (every format and compression, for `prepare`,
`tokenize`, `eval`, `bias` and the tasks); `lmforge.data.sources` is the strict view
the training commands use on top of it, and nothing here imports it.

Every source of `lmforge prepare` (a `PrepareSource` in the config) has a *kind*:

==============  ============================================================================
kind            what it reads
==============  ============================================================================
text            plain text / Markdown files (``.txt .md .rst``, gz/zst transparently)
code            a code repository: files by extension, tagged with their language;
                vendored, generated, lock and binary files are skipped
jsonl / json    records with a text field (``text_field``); ``.gz`` / ``.zst`` transparently
csv / parquet   tables with a text column
html            HTML pages; main text extracted with trafilatura
warc            WARC (HTML responses → trafilatura) and WET (text conversions) files
hf              a HF `datasets` dataset: a ``save_to_disk`` folder, a local data folder, or
                a hub name (the hub needs network, so tests use local folders)
python-stdlib   the running interpreter's standard library (code + docstrings), PSF-2.0
==============  ============================================================================

``auto`` picks the kind from the file names. A source is split into *tasks* (groups
of files of about ``task_bytes``) so that executors can run them in parallel and a
killed run resumes at the first unfinished one.

Bad input never stops a run: each problem becomes a `Skip` (reason, file, line)
that the pipeline counts and writes to the exclusions folder. Reasons:
``unreadable``, ``empty_file``, ``binary``, ``invalid_utf8``, ``too_large``,
``line_too_long``, ``malformed_json``, ``missing_field``, ``bad_record``,
``truncated`` (a compressed file that ends early: the lines before it are kept),
``no_text_extracted``.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lmforge.config import PrepareSource
from lmforge.data.document import Document
from lmforge.fileio import COMPRESSED, open_binary
from lmforge.paths import shared_data

# ----------------------------------------------------------------------------- records


@dataclass
class Skip:
    """An input that could not become a document, and why."""

    reason: str
    file: str
    line: int = 0
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "file": self.file, "line": self.line, "detail": self.detail}


@dataclass
class Task:
    """A unit of work for an executor: some files of one source."""

    index: int  # position in the whole run; output shards are named after it
    source_index: int
    files: list[str] = field(default_factory=list)
    # For sources that are not file lists (hf): a row range.
    start: int = 0
    stop: int = 0

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


# ----------------------------------------------------------------------------- python-stdlib

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

# Machine-generated modules: codec tables written by gencodec.py (≈ 1.2 MB of near-identical
# `0x00e9 -> LATIN SMALL LETTER E WITH ACUTE` lines that a small model learns first and then
# samples forever) and pydoc's topic dump. Generated code is filtered from code corpora for
# the same reason (auto-generated markers, as in the data pipeline's code filters).
STDLIB_GENERATED = ("pydoc_data/topics.py",)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


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


# ----------------------------------------------------------------------------- kinds

TEXT_EXT = {".txt", ".md", ".markdown", ".rst", ".text", ".tex", ".org"}
HTML_EXT = {".html", ".htm", ".xhtml"}
JSONL_EXT = {".jsonl", ".ndjson"}

# Extension → programming language for code repositories.
CODE_LANGUAGES = {
    ".py": "python",
    ".pyi": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".jsx": "javascript",
    ".java": "java",
    ".kt": "kotlin",
    ".scala": "scala",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".hpp": "cpp",
    ".cs": "csharp",
    ".go": "go",
    ".rs": "rust",
    ".rb": "ruby",
    ".php": "php",
    ".swift": "swift",
    ".m": "objective-c",
    ".sh": "shell",
    ".bash": "shell",
    ".sql": "sql",
    ".r": "r",
    ".jl": "julia",
    ".lua": "lua",
    ".pl": "perl",
    ".hs": "haskell",
    ".ml": "ocaml",
    ".ex": "elixir",
    ".erl": "erlang",
    ".clj": "clojure",
    ".dart": "dart",
    ".toml": "toml",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".md": "markdown",
    ".rst": "restructuredtext",
    ".css": "css",
    ".html": "html",
    ".cmake": "cmake",
    ".mk": "makefile",
}
# Folders that hold third-party or generated code, not the repository's own.
VENDORED_DIRS = {
    ".git",
    ".hg",
    ".svn",
    "node_modules",
    "vendor",
    "vendored",
    "third_party",
    "thirdparty",
    "external",
    "site-packages",
    "dist-packages",
    "__pycache__",
    ".venv",
    "venv",
    ".tox",
    "build",
    "dist",
    ".mypy_cache",
    ".pytest_cache",
    "target",
}
# File names that are generated or lock files.
GENERATED_GLOBS = [
    "*.min.js",
    "*.min.css",
    "*.map",
    "*_pb2.py",
    "*_pb2_grpc.py",
    "*.pb.go",
    "*.generated.*",
    "package-lock.json",
    "yarn.lock",
    "poetry.lock",
    "Cargo.lock",
    "pnpm-lock.yaml",
    "uv.lock",
    "Pipfile.lock",
]


def strip_compression(name: str) -> str:
    for ext in COMPRESSED:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def kind_of_file(path: Path) -> str | None:
    """The reader kind for a file under ``auto``, or None to ignore it."""
    name = strip_compression(path.name.lower())
    if ".warc" in name or name.endswith((".wet", ".arc")):
        return "warc"
    suffix = Path(name).suffix
    if suffix in JSONL_EXT or name.endswith(".json.zst"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".parquet":
        return "parquet"
    if suffix in HTML_EXT:
        return "html"
    if suffix in TEXT_EXT or suffix == "":
        return "text"
    if suffix in CODE_LANGUAGES:
        return "code"
    return None


def resolve_source_path(path: str) -> Path:
    """A source path as written in a recipe; ``…/shared/data/X`` falls back to `shared_data()`.

    Recipes name the shared data as ``../shared/data/gutenberg`` (relative to a checkout)
    or ``shared:gutenberg``; the fallback makes them work from any working directory and in CI.
    """
    if path.startswith("shared:"):
        return shared_data() / path[len("shared:") :]
    p = Path(path).expanduser()
    if p.exists():
        return p
    marker = "shared/data/"
    if marker in path:
        candidate = shared_data() / path.split(marker, 1)[1]
        if candidate.exists():
            return candidate
    return p


def source_name(src: PrepareSource) -> str:
    if src.name:
        return src.name
    if src.path == "python-stdlib":
        return "python-stdlib"
    stem = Path(src.path.rstrip("/*")).name or "source"
    return strip_compression(stem).split(".")[0] or "source"


def _matches(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(Path(rel).name, p) for p in patterns)


def list_files(src: PrepareSource) -> list[tuple[Path, str]]:
    """(file, path relative to the source root) in sorted order, after include/exclude."""
    if src.path == "python-stdlib" or src.kind == "python-stdlib":
        root = stdlib_root()
        return [(p, p.relative_to(root).as_posix()) for p in stdlib_files()]
    base = resolve_source_path(src.path)
    if base.is_dir():
        root = base
        candidates = sorted(p for p in base.rglob("*") if p.is_file() or p.is_symlink())
    elif base.exists():
        root = base.parent
        candidates = [base]
    else:
        import glob

        root = Path(".")
        candidates = sorted(Path(p) for p in glob.glob(src.path, recursive=True))
        candidates = [p for p in candidates if p.is_file()]
        if not candidates:
            raise FileNotFoundError(f"prepare source '{src.path}' matches no file")
    out = []
    for path in candidates:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        if src.include and not _matches(rel, src.include):
            continue
        if src.exclude and _matches(rel, src.exclude):
            continue
        if src.kind == "code":
            parts = Path(rel).parts
            if any(part in VENDORED_DIRS for part in parts[:-1]):
                continue
            if _matches(rel, GENERATED_GLOBS):
                continue
            if Path(rel).suffix.lower() not in CODE_LANGUAGES:
                continue
        elif src.kind == "auto" and kind_of_file(path) is None:
            continue
        elif src.kind not in ("auto", "code", "python-stdlib") and not _kind_accepts(
            src.kind, kind_of_file(path)
        ):
            continue  # e.g. the README.md and LICENSE beside a folder of WARC files
        out.append((path, rel))
    return out


def _kind_accepts(kind: str, file_kind: str | None) -> bool:
    if kind in ("json", "jsonl"):
        return file_kind in ("json", "jsonl")
    return file_kind == kind


def plan_tasks(sources: list[PrepareSource], task_bytes: int) -> list[Task]:
    """Split every source into tasks of about `task_bytes` of input, in a fixed order."""
    tasks: list[Task] = []
    for si, src in enumerate(sources):
        if src.kind == "hf":
            tasks.append(Task(len(tasks), si, [src.path]))
            continue
        group: list[str] = []
        size = 0
        for path, _rel in list_files(src):
            try:
                n = path.stat().st_size
            except OSError:
                n = 0  # unreadable: the reader will count it
            if group and size + n > task_bytes:
                tasks.append(Task(len(tasks), si, group))
                group, size = [], 0
            group.append(str(path))
            size += n
        if group:
            tasks.append(Task(len(tasks), si, group))
    return tasks


# ----------------------------------------------------------------------------- low level


def read_bounded(path: Path, max_bytes: int) -> bytes | Skip:
    """The (decompressed) content of a file, or a Skip if unreadable or too large."""
    try:
        if max_bytes and not path.name.endswith(COMPRESSED) and path.stat().st_size > max_bytes:
            return Skip("too_large", str(path), 0, f"{path.stat().st_size:,} bytes > {max_bytes:,}")
    except OSError as exc:
        return Skip("unreadable", str(path), 0, f"{type(exc).__name__}: {exc}")
    try:
        with open_binary(path) as fh:
            data = fh.read(max_bytes + 1 if max_bytes else -1)
    except (OSError, EOFError, ValueError) as exc:
        return Skip("unreadable", str(path), 0, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # zstd/lzma raise their own error types on corrupt data
        return Skip("unreadable", str(path), 0, f"{type(exc).__name__}: {exc}")
    if max_bytes and len(data) > max_bytes:
        return Skip("too_large", str(path), 0, f"more than {max_bytes:,} bytes")
    return data


def decode_bytes(data: bytes) -> tuple[str, int]:
    """UTF-8 decode with replacement; returns the text and the number of replaced bytes."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # Each U+FFFD beyond those already in the source stands for ≥ 1 invalid byte.
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


def looks_binary(data: bytes) -> bool:
    """NUL bytes in the first 8 KiB: the heuristic git and grep use for binary files."""
    return b"\x00" in data[:8192]


# A file whose invalid UTF-8 exceeds this fraction of its bytes is in another encoding
# or is not text; a few stray bytes are repaired (U+FFFD) and counted instead.
MAX_INVALID_UTF8 = 0.01


def decode_text(data: bytes, path: str, min_invalid: int = 0) -> tuple[str, int] | Skip:
    """Text and replaced-byte count, or a Skip: empty, binary, or invalid UTF-8 above both
    MAX_INVALID_UTF8 of the bytes and `min_invalid` bytes."""
    if not data.strip():
        return Skip("empty_file", path)
    if looks_binary(data):
        return Skip("binary", path, 0, "NUL bytes in the first 8 KiB")
    text, replaced = decode_bytes(data)
    if replaced > max(MAX_INVALID_UTF8 * len(data), min_invalid):
        return Skip("invalid_utf8", path, 0, f"{replaced:,} invalid bytes of {len(data):,}")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, replaced


def iter_lines_bounded(fh: IO[bytes], max_line: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line bytes), or None for a line longer than `max_line` (never held whole)."""
    lineno = 0
    while True:
        line = fh.readline(max_line + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_line and not line.endswith(b"\n"):
            # Consume the rest of the over-long line in bounded chunks.
            while True:
                rest = fh.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, None
            continue
        yield lineno, line


# ----------------------------------------------------------------------------- readers

Item = Document | Skip


class Reader:
    """Reads the files of one task of one source; yields Documents and Skips."""

    def __init__(self, src: PrepareSource, max_file_bytes: int, max_line_bytes: int):
        self.src = src
        self.name = source_name(src)
        self.max_file_bytes = max_file_bytes
        self.max_line_bytes = max_line_bytes
        root = resolve_source_path(src.path)
        self.root = stdlib_root() if src.path == "python-stdlib" else root

    def rel(self, path: Path) -> str:
        root = self.root if self.root.is_dir() else self.root.parent
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            return str(path)

    def doc(self, doc_id: str, text: str, **meta: Any) -> Document:
        return Document(
            id=f"{self.name}/{doc_id}",
            text=text,
            source=self.name,
            license=self.src.license,
            meta={k: v for k, v in meta.items() if v not in (None, "", 0)},
        )

    def read_task(self, task: Task) -> Iterator[Item]:
        kind = self.src.kind
        if kind == "hf":
            yield from self.read_hf()
            return
        for name in task.files:
            path = Path(name)
            k: str = kind
            if kind == "python-stdlib":
                k = "code"
            elif kind == "auto":
                k = kind_of_file(path) or "text"
            try:
                yield from getattr(self, f"read_{k}")(path)
            except Exception as exc:  # a reader bug or exotic corruption must not stop the run
                yield Skip("unreadable", str(path), 0, f"{type(exc).__name__}: {exc}")

    # -- whole-file kinds

    def _text_of(self, path: Path) -> tuple[str, int] | Skip:
        data = read_bounded(path, self.max_file_bytes)
        if isinstance(data, Skip):
            return data
        return decode_text(data, str(path))

    def _file_doc(self, path: Path, **meta: Any) -> Item:
        got = self._text_of(path)
        if isinstance(got, Skip):
            return got
        text, replaced = got
        return self.doc(self.rel(path), text, **meta, path=str(path), replaced_bytes=replaced)

    def read_text(self, path: Path) -> Iterator[Item]:
        yield self._file_doc(path, kind="text")

    def read_code(self, path: Path) -> Iterator[Item]:
        lang = CODE_LANGUAGES.get(Path(strip_compression(path.name)).suffix.lower(), "unknown")
        yield self._file_doc(path, kind="code", code_language=lang)

    def read_html(self, path: Path) -> Iterator[Item]:
        got = self._text_of(path)
        if isinstance(got, Skip):
            yield got
            return
        html, _ = got
        text = extract_html(html)
        if not text:
            yield Skip("no_text_extracted", str(path))
            return
        yield self.doc(self.rel(path), text, kind="text", path=str(path), format="html")

    # -- record kinds

    def _record(self, rec: Any, path: Path, lineno: int) -> Item:
        field_name = self.src.text_field
        if not isinstance(rec, dict):
            return Skip("bad_record", str(path), lineno, "record is not an object")
        text = rec.get(field_name)
        if text is None:
            return Skip("missing_field", str(path), lineno, f"no field '{field_name}'")
        if not isinstance(text, str):
            return Skip("missing_field", str(path), lineno, f"field '{field_name}' is not text")
        rid = rec.get(self.src.id_field) if self.src.id_field else None
        doc_id = str(rid) if rid is not None else f"{self.rel(path)}:{lineno}"
        kind = (
            "code"
            if isinstance(rec.get("meta"), dict) and rec["meta"].get("kind") == "code"
            else "text"
        )
        meta = {"kind": kind, "path": str(path), "line": lineno}
        if isinstance(rec.get("meta"), dict):
            meta = {**rec["meta"], **meta}
        doc = self.doc(doc_id, text, **meta)
        if self.src.license == "unknown" and isinstance(rec.get("license"), str):
            doc.license = rec["license"]
        return doc

    def read_jsonl(self, path: Path) -> Iterator[Item]:
        try:
            fh = open_binary(path)
        except OSError as exc:
            yield Skip("unreadable", str(path), 0, str(exc))
            return
        lineno = 0
        with fh:
            lines = iter_lines_bounded(fh, self.max_line_bytes)
            while True:
                try:
                    got = next(lines, None)
                except Exception as exc:  # truncated gzip / zstd: keep the lines before it
                    yield Skip("truncated", str(path), lineno + 1, f"{type(exc).__name__}: {exc}")
                    return
                if got is None:
                    return
                lineno, line = got
                if line is None:
                    yield Skip(
                        "line_too_long", str(path), lineno, f"> {self.max_line_bytes:,} bytes"
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid UTF-8"
                    yield Skip("malformed_json", str(path), lineno, msg)
                    continue
                yield self._record(rec, path, lineno)

    def read_json(self, path: Path) -> Iterator[Item]:
        data = read_bounded(path, self.max_file_bytes)
        if isinstance(data, Skip):
            yield data
            return
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield Skip("malformed_json", str(path), 0, str(exc))
            return
        # Accept a list of records, or {"data": [...]}-style wrappers, or {key: record}.
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) == 1:
                obj = lists[0]
            else:
                obj = [
                    {**v, "id": v.get("id", k)} if isinstance(v, dict) else v
                    for k, v in obj.items()
                ]
        if not isinstance(obj, list):
            yield Skip("bad_record", str(path), 0, "JSON is neither a list nor an object")
            return
        for i, rec in enumerate(obj, 1):
            yield self._record(rec, path, i)

    def read_csv(self, path: Path) -> Iterator[Item]:
        try:
            raw = open_binary(path)
        except OSError as exc:
            yield Skip("unreadable", str(path), 0, str(exc))
            return
        delimiter = "\t" if strip_compression(path.name).endswith(".tsv") else ","
        csv.field_size_limit(self.max_line_bytes)
        with io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield Skip("line_too_long", str(path), reader.line_num, str(exc))
                    continue
                yield self._record(row, path, reader.line_num)

    def read_parquet(self, path: Path) -> Iterator[Item]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:
            yield Skip("unreadable", str(path), 0, f"{type(exc).__name__}: {exc}")
            return
        if self.src.text_field not in pf.schema_arrow.names:
            yield Skip("missing_field", str(path), 0, f"no column '{self.src.text_field}'")
            return
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield self._record(rec, path, row)

    def read_warc(self, path: Path) -> Iterator[Item]:
        from warcio.archiveiterator import ArchiveIterator

        try:
            fh = path.open("rb")
        except OSError as exc:
            yield Skip("unreadable", str(path), 0, str(exc))
            return
        with fh:
            n = 0
            try:
                for record in ArchiveIterator(fh):
                    n += 1
                    item = self._warc_record(record, path, n)
                    if item is not None:
                        yield item
            except Exception as exc:  # truncated or corrupt archive: keep what was read
                yield Skip("unreadable", str(path), n, f"{type(exc).__name__}: {exc}")

    def _warc_record(self, record: Any, path: Path, n: int) -> Item | None:
        rtype = record.rec_type
        uri = (record.rec_headers.get_header("WARC-Target-URI") or "").strip("<>")
        rid = record.rec_headers.get_header("WARC-Record-ID") or f"{path.name}#{n}"
        if rtype == "conversion":  # WET: the text is already extracted
            text, _ = decode_bytes(record.content_stream().read())
            if not text.strip():
                return Skip("no_text_extracted", str(path), n, uri)
            return self.doc(rid.strip("<>"), text, kind="text", url=uri, format="wet")
        if rtype != "response" or not record.http_headers:
            return None  # requests, metadata, warcinfo, resources: not documents
        ctype = (record.http_headers.get_header("Content-Type") or "").lower()
        if "html" not in ctype:
            return None
        body = record.content_stream().read(self.max_file_bytes + 1)
        if len(body) > self.max_file_bytes:
            return Skip("too_large", str(path), n, uri)
        # Bytes, not text: trafilatura detects the page's encoding (GBK, cp1251, ...).
        text = extract_html(body)
        if not text:
            return Skip("no_text_extracted", str(path), n, uri)
        return self.doc(rid.strip("<>"), text, kind="text", url=uri, format="warc")

    def read_hf(self) -> Iterator[Item]:
        try:
            import datasets  # type: ignore[import-not-found]
        except ImportError:
            yield Skip("unreadable", self.src.path, 0, "the `datasets` package is not installed")
            return
        path = resolve_source_path(self.src.path)
        try:
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[self.src.hf_split]
            else:
                ds = datasets.load_dataset(str(path), split=self.src.hf_split)
        except Exception as exc:
            yield Skip("unreadable", self.src.path, 0, f"{type(exc).__name__}: {exc}")
            return
        for i, rec in enumerate(ds, 1):
            yield self._record(rec, path, i)


def extract_html(html: str | bytes) -> str:
    """Main text of an HTML page (trafilatura; precision-leaning, no comments or tables)."""
    import trafilatura

    # favor_precision trades a little recall for less boilerplate: token F1 on the Zyte
    # article benchmark rose from ~0.94 to ~0.96 on its first 20 pages.
    text = trafilatura.extract(
        html, favor_precision=True, include_comments=False, include_tables=False
    )
    return (text or "").strip()
