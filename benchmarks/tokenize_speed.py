"""Speed of lmforge's tokenize stage on a ~100 MB corpus, next to HF `tokenizers` alone.

    python benchmarks/tokenize_speed.py [--mb 100] [--vocab 8192] [--runs 3]
        [--shapes books,docs] [--workdir /tmp/lmforge-tokenize-speed]

The corpus is built on the fly from the shared Project Gutenberg books (never copied
into the repository): the 15 books are repeated until about `--mb` MB, in two shapes:

- ``books``: one plain-text file per book copy (≈ 120 documents of ≈ 0.8 MB), read
  by the folder reader as `lmforge tokenize` reads a folder source;
- ``docs``: the same text cut at paragraph breaks into ≈ 4 KB documents (web-page
  sized, ≈ 25,000 of them) in JSONL shards, read by the JSONL reader.

- ``code`` (not in the default `--shapes`): text that never repeats — every distinct
  `.py` file of this interpreter's standard library and installed packages (sorted by
  path, exact duplicates dropped, files that are not UTF-8 skipped) until `--mb` MB,
  one document per file in ≈ 10 MB JSONL shards. Its chunks are mostly new to the
  cache, the hard case for `lmforge.fast_encode`, and it is code encoded by a BPE
  trained on prose, so more tokens per byte.

A byte-level BPE (vocabulary `--vocab`, as the recipes train) is trained once on one
copy of the books and cached in the work folder.

Per run, interleaved, for each shape:

- **ours**: `tokenize_documents(iter_documents([corpus]), ...)` end to end: reading
  and decoding the files, encoding, the train/val split, writing the shards;
- **ours-distinct**: the same, on the first copy of the books only (≈ 12 MB), where
  no text repeats: the cache of `lmforge.fast_encode` helps least there;
- **anchor**: HF `tokenizers` `Tokenizer.encode_batch` alone on the same texts, already
  in memory, in ≈ 8 MB batches, over the first `--anchor-mb` MB (it is slow): how fast
  encoding itself goes with HF on this machine;
- **anchor-fast**: `encode_batch_fast` (no offsets), the same way.

MB/s counts UTF-8 bytes of document text (1 MB = 10⁶ bytes); figures are medians over
`--runs`, and `ours / anchor` is the ratio of the medians. "cores" is CPU time (this
process and its workers) over wall time: what the shared machine actually gave. The
thread count is what HF's Rust side uses (`RAYON_NUM_THREADS`, default: all cores).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

from lmforge.data.sources import iter_documents
from lmforge.paths import shared_data
from lmforge.shards import tokenize_documents
from lmforge.tokenizer import BPETokenizer, load_tokenizer, train_bpe

MB = 1e6


def books() -> list[tuple[str, str]]:
    out = []
    for path in sorted((shared_data() / "gutenberg").glob("*.txt.gz")):
        out.append((path.name[: -len(".txt.gz")], gzip.decompress(path.read_bytes()).decode()))
    if not out:
        raise SystemExit(f"no Gutenberg books in {shared_data() / 'gutenberg'}")
    return out


def paragraphs_to_docs(text: str, size: int) -> list[str]:
    """Cut at blank lines into documents of about `size` characters."""
    docs, cur, n = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        n += len(para) + 2
        if n >= size:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def build_corpus(work: Path, shape: str, mb: float) -> Path:
    """The corpus folder for `shape` (built once, reused while its size matches)."""
    root = work / f"corpus-{shape}-{mb:g}MB"
    if (root / "DONE").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if shape == "code":
        return _build_code_corpus(root, mb)
    src = books()
    total, copy = 0, 0
    while total < mb * MB:
        if shape == "books":
            for name, text in src:
                (root / f"c{copy:02d}_{name}.txt").write_text(text, encoding="utf-8")
                total += len(text.encode())
        else:
            with (root / f"c{copy:02d}.jsonl").open("w", encoding="utf-8") as fh:
                for name, text in src:
                    for i, doc in enumerate(paragraphs_to_docs(text, 4000)):
                        rec = {"id": f"c{copy}/{name}/{i}", "text": doc}
                        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        total += len(doc.encode())
        copy += 1
    (root / "DONE").write_text(str(total))
    return root


def _build_code_corpus(root: Path, mb: float) -> Path:
    import hashlib
    import sysconfig

    seen: set[str] = set()
    dirs = sorted({sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")})
    total, shard, fh = 0, 0, None
    for top in dirs:
        for path in sorted(Path(top).rglob("*.py")):
            if total >= mb * MB:
                break
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha1(text.encode()).hexdigest()
            if not text.strip() or digest in seen:
                continue
            seen.add(digest)
            if fh is None or total >= (shard + 1) * 10 * MB:
                if fh is not None:
                    fh.close()
                    shard += 1
                fh = (root / f"c{shard:02d}.jsonl").open("w", encoding="utf-8")
            fh.write(json.dumps({"id": str(path), "text": text}, ensure_ascii=False) + "\n")
            total += len(text.encode())
    if fh is not None:
        fh.close()
    if total < mb * MB:
        print(f"note: only {total / MB:.1f} MB of distinct .py files found")
    (root / "DONE").write_text(str(total))
    return root


def tokenizer(work: Path, vocab: int) -> BPETokenizer:
    path = work / f"tokenizer-{vocab}.json"
    if path.exists():
        tok = load_tokenizer(path)
    else:
        t0 = time.perf_counter()
        tok = train_bpe((text for _, text in books()), vocab)
        tok.save(path)
        print(f"trained BPE {vocab} on one copy of the books in {time.perf_counter() - t0:.1f}s")
    assert isinstance(tok, BPETokenizer)
    return tok


def batches_by_bytes(texts: list[str], limit: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    n = 0
    for t in texts:
        if n >= limit:
            out.append([])
            n = 0
        out[-1].append(t)
        n += len(t)
    return out


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (the tokenize workers)."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def run_ours(spec: str, tok: BPETokenizer, out: Path) -> tuple[float, float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), cpu_s()
    counts = tokenize_documents(iter_documents([spec]), tok, out, 0.05)
    dt, cpu = time.perf_counter() - t0, cpu_s() - c0
    n_bytes = sum(c["n_bytes"] for c in counts.values())
    n_tokens = sum(c["n_tokens"] for c in counts.values())
    return dt, cpu, n_bytes, n_tokens


def run_anchor(batches: list[list[str]], tok: BPETokenizer, fast: bool) -> tuple[float, float, int]:
    encode = tok.hf.encode_batch_fast if fast else tok.hf.encode_batch
    t0, c0 = time.perf_counter(), cpu_s()
    n = 0
    for b in batches:
        n += sum(len(e.ids) for e in encode(b, add_special_tokens=False))
    return time.perf_counter() - t0, cpu_s() - c0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--anchor-mb", type=float, default=20)
    ap.add_argument("--shapes", default="books,docs")
    ap.add_argument("--workdir", default="/tmp/lmforge-tokenize-speed")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(work, args.vocab)
    threads = os.environ.get("RAYON_NUM_THREADS") or f"{os.cpu_count()} (all cores)"
    print(f"BPE vocabulary {tok.vocab_size}; Rust threads: {threads}")
    print(f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}")
    results = {}
    for shape in args.shapes.split(","):
        corpus = build_corpus(work, shape, args.mb)
        texts = [d.text for d in iter_documents([str(corpus)])]
        size = sum(len(t.encode()) for t in texts)
        first = str(corpus / ("c00_*.txt" if shape == "books" else "c00.jsonl"))
        first_size = sum(len(d.text.encode()) for d in iter_documents([first]))
        sample, n = [], 0
        for t in texts:  # the anchor's share: the first --anchor-mb MB
            if n >= args.anchor_mb * MB:
                break
            sample.append(t)
            n += len(t.encode())
        batches = batches_by_bytes(sample, 8_000_000)
        print(f"\n[{shape}] {len(texts):,} documents, {size / MB:.1f} MB in {corpus}")
        sizes = {"ours": size, "ours-distinct": first_size, "anchor": n, "anchor-fast": n}
        rates: dict[str, list[float]] = {k: [] for k in sizes}
        tok_rates: dict[str, list[float]] = {k: [] for k in sizes}
        cores: dict[str, list[float]] = {k: [] for k in sizes}
        anchor_tokens = {}
        for r in range(args.runs):
            for name, spec in (("ours", str(corpus)), ("ours-distinct", first)):
                dt, cpu, n_bytes, n_tok = run_ours(spec, tok, work / "tokens")
                assert n_bytes == sizes[name], (n_bytes, sizes[name])
                rates[name].append(n_bytes / MB / dt)
                tok_rates[name].append(n_tok / dt / 1e6)
                cores[name].append(cpu / dt)
            for name, fast in (("anchor", False), ("anchor-fast", True)):
                dt, cpu, n_tok = run_anchor(batches, tok, fast)
                rates[name].append(n / MB / dt)
                cores[name].append(cpu / dt)
                tok_rates[name].append(n_tok / dt / 1e6)
                anchor_tokens[name] = n_tok
            print(
                f"  run {r + 1}: "
                + ", ".join(f"{k} {v[-1]:.1f} MB/s" for k, v in rates.items())
                + f" (ours on {cores['ours'][-1]:.2f} cores)"
            )
        if anchor_tokens["anchor"] != anchor_tokens["anchor-fast"]:
            raise SystemExit(f"token counts differ between the anchors: {anchor_tokens}")
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in med.items():
            c = statistics.median(cores[k])
            print(
                f"  {k:<14} {sizes[k] / MB:6.1f} MB  {v:6.1f} MB/s  "
                f"{statistics.median(tok_rates[k]):5.2f}M tokens/s  on {c:.2f} cores  "
                f"= {v / c:5.1f} MB per CPU-second"
            )
        print(f"  ours / anchor = {med['ours'] / med['anchor']:.2f} (speed ratio)")
        print(f"  ours-distinct / anchor = {med['ours-distinct'] / med['anchor']:.2f}")
        results[shape] = {
            "mb": size / MB,
            "documents": len(texts),
            **{f"{k}_mb_s": v for k, v in med.items()},
            **{f"{k}_cores": statistics.median(v) for k, v in cores.items()},
        }
    print("\n" + json.dumps(results, indent=1))
    shutil.rmtree(work / "tokens", ignore_errors=True)


if __name__ == "__main__":
    main()
