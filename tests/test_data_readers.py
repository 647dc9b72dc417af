"""Readers on real shared data, and bad input that must be skipped with a named reason."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lmforge.config import PrepareSource
from lmforge.data.readers import Reader, Skip, extract_html, list_files, plan_tasks


def read_all(src: PrepareSource, max_file: int = 64_000_000, max_line: int = 8_000_000):
    reader = Reader(src, max_file, max_line)
    items = []
    for task in plan_tasks([src], 1 << 30):
        items.extend(reader.read_task(task))
    docs = [i for i in items if not isinstance(i, Skip)]
    skips = [i for i in items if isinstance(i, Skip)]
    return docs, skips


def token_f1(pred: str, gold: str) -> float:
    """Bag-of-tokens F1, the scoring of the Zyte article-extraction benchmark."""
    p, g = Counter(re.findall(r"\w+", pred.lower())), Counter(re.findall(r"\w+", gold.lower()))
    common = sum((p & g).values())
    if not common:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def test_gutenberg_folder_with_include(shared):
    src = PrepareSource(
        path=str(shared / "gutenberg"), kind="text", include=["*.txt.gz"], license="pd"
    )
    docs, skips = read_all(src)
    assert len(docs) == 15 and not skips  # README.md excluded by the include glob
    assert all(d.license == "pd" and d.meta["kind"] == "text" for d in docs)
    pride = next(d for d in docs if "pg1342" in d.id)
    assert "It is a truth universally acknowledged" in pride.text
    assert pride.source == "gutenberg"


def test_html_extraction_quality_against_ground_truth(shared):
    """trafilatura through our reader vs the benchmark's human-annotated article text."""
    truth = json.loads((shared / "web_html" / "ground-truth.json").read_text())
    pages = sorted((shared / "web_html" / "html").glob("*.html.gz"))[:30]
    scores = []
    for page in pages:
        html = gzip.decompress(page.read_bytes())
        pred = extract_html(html)
        scores.append(token_f1(pred, truth[page.name.split(".")[0]]["articleBody"]))
    mean = sum(scores) / len(scores)
    print(f"\nweb_html token F1 over {len(scores)} pages: mean {mean:.3f}, min {min(scores):.3f}")
    # trafilatura with favor_precision scores ≈ 0.96 on the first 20 pages; a broken extractor
    # (raw HTML, navigation text) scores far lower.
    assert mean > 0.85


def test_warc_and_wet(shared):
    src = PrepareSource(path=str(shared / "warc"), kind="warc", exclude=["*.wat.gz"])
    files = [p.name for p, _ in list_files(src)]
    assert "README.md" not in files and "LICENSE" not in files and len(files) == 5
    docs, skips = read_all(src)
    urls = [d.meta.get("url", "") for d in docs]
    assert "https://an.wikipedia.org/wiki/Escopete" in urls  # both the WARC and the WET record
    assert sum(u == "https://an.wikipedia.org/wiki/Escopete" for u in urls) == 2
    assert not any(u.startswith("<") for u in urls)  # wget writes <uri>; we strip the brackets
    assert {d.meta["format"] for d in docs} == {"warc", "wet"}
    assert all(s.reason == "no_text_extracted" and s.line > 0 for s in skips)
    # The GBK / cp1251 pages of the 2020 crawl are decoded by their own charset, not as UTF-8.
    assert not any(d.text.count("\ufffd") > 10 for d in docs)


def test_code_repository_skips_vendored_generated_binary(tmp_path):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "node_modules" / "lib").mkdir(parents=True)
    (repo / "vendor").mkdir()
    (repo / "src" / "main.py").write_text("def main():\n    return 1\n")
    (repo / "src" / "util.rs").write_text("fn main() {}\n")
    (repo / "src" / "app.min.js").write_text("var a=1;")
    (repo / "src" / "api_pb2.py").write_text("# generated\n")
    (repo / "src" / "blob.py").write_bytes(b"\x00\x01\x02binary")
    (repo / "node_modules" / "lib" / "index.js").write_text("module.exports = 1;\n")
    (repo / "vendor" / "dep.go").write_text("package dep\n")
    (repo / "package-lock.json").write_text("{}")
    (repo / "image.png").write_bytes(b"\x89PNG\r\n")
    src = PrepareSource(path=str(repo), kind="code", license="MIT")
    listed = sorted(rel for _, rel in list_files(src))
    assert listed == ["src/blob.py", "src/main.py", "src/util.rs"]
    docs, skips = read_all(src)
    assert {d.id: d.meta["code_language"] for d in docs} == {
        "repo/src/main.py": "python",
        "repo/src/util.rs": "rust",
    }
    assert [(s.reason, Path(s.file).name) for s in skips] == [("binary", "blob.py")]


def test_records_jsonl_json_csv_parquet_compressed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [{"id": f"r{i}", "body": f"text number {i}"} for i in range(5)]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("id,body\n" + "".join(f"{r['id']},{r['body']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    src = PrepareSource(path=str(tmp_path), text_field="body", id_field="id", name="rec")
    docs, skips = read_all(src)
    assert not skips
    assert len(docs) == 25
    assert Counter(d.id for d in docs) == {f"rec/r{i}": 5 for i in range(5)}
    assert {d.text for d in docs} == {r["body"] for r in rows}


def test_bad_input_is_skipped_with_reason_file_and_line(tmp_path):
    good = {"text": "fine"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"other": 1}),
        json.dumps({"text": 3}),
        "[1, 2]",
    ]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    # A 200 MB single line: skipped without holding it in memory, the next line still read.
    with (tmp_path / "huge.jsonl").open("wb") as fh:
        fh.write(b'{"text": "' + b"a" * (200 * 1024 * 1024) + b'"}\n')
        fh.write(json.dumps(good).encode() + b"\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp_path / "binary.txt").write_bytes(b"abc\x00def" * 10)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "broken.txt").symlink_to(tmp_path / "does-not-exist")
    (tmp_path / "ok.txt").write_text("a perfectly good file\n")
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    src = PrepareSource(path=str(tmp_path))
    docs, skips = read_all(src, max_line=8_000_000)
    got = sorted((Path(s.file).name, s.line, s.reason) for s in skips)
    assert got == [
        ("binary.txt", 0, "binary"),
        ("broken.txt", 0, "unreadable"),
        ("empty.txt", 0, "empty_file"),
        ("huge.jsonl", 1, "line_too_long"),
        ("latin1.txt", 0, "invalid_utf8"),
        ("mixed.jsonl", 2, "malformed_json"),
        ("mixed.jsonl", 3, "missing_field"),
        ("mixed.jsonl", 4, "missing_field"),
        ("mixed.jsonl", 5, "bad_record"),
        ("trunc.jsonl.gz", 101, "truncated"),
    ]
    texts = Counter(d.text for d in docs)
    assert texts == {"a perfectly good file\n": 1, "fine": 2, "x": 100}


def test_python_stdlib_source():
    src = PrepareSource(path="python-stdlib", kind="python-stdlib", license="PSF-2.0")
    files = list_files(src)
    assert len(files) > 300
    assert not any("/test/" in f"/{rel}" for _, rel in files)
    reader = Reader(src, 64_000_000, 8_000_000)
    first = next(iter(reader.read_task(plan_tasks([src], 100_000)[0])))
    assert not isinstance(first, Skip)
    assert first.meta["code_language"] == "python" and first.license == "PSF-2.0"


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list_files(PrepareSource(path=str(tmp_path / "nope" / "*.txt")))


def test_hf_datasets_from_local_folders(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    rows = {"id": ["a", "b", "c"], "content": ["first text", "second text", "third text"]}
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(saved))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "content": t}) + "\n"
            for i, t in zip(rows["id"], rows["content"], strict=True)
        )
    )
    for path in (saved, raw):
        src = PrepareSource(
            path=str(path), kind="hf", text_field="content", id_field="id", name="hf"
        )
        docs, skips = read_all(src)
        assert not skips, skips
        assert [(d.id, d.text) for d in docs] == [
            ("hf/a", "first text"),
            ("hf/b", "second text"),
            ("hf/c", "third text"),
        ]


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst", ".bz2", ".xz"])
def test_prepare_and_data_sources_read_a_file_the_same_way(suffix, tmp_path):
    """`prepare`'s reader and the data-source reader of pretrain/eval/bias share one opener and
    one decoder: the same text from the same file, compressed or not."""
    import bz2
    import lzma

    import zstandard

    from lmforge.data.sources import iter_source, open_text

    text = "Ünïcode line one\r\nline two — ends here\n"
    compress = {
        "": lambda b: b,
        ".gz": gzip.compress,
        ".zst": zstandard.compress,
        ".bz2": bz2.compress,
        ".xz": lzma.compress,
    }[suffix]
    path = tmp_path / f"doc.txt{suffix}"
    path.write_bytes(compress(text.encode()))
    prepared, skips = read_all(PrepareSource(path=str(path)))
    assert not skips and [d.text for d in prepared] == [text]
    assert [d.text for d in iter_source(str(path))] == [text]
    with open_text(path, newline="") as fh:
        assert fh.read() == text
