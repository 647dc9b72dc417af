"""Throughput of `lmforge prepare`: per step, the full pipeline, MinHash dedup at 100k docs,
and (where it is installed) datatrove's equivalent steps on the same input.

    python benchmarks/data_pipeline.py [--dt-python /tmp/data/dtvenv/bin/python] [--repeats 3]

Rates are per core: CPU seconds of the measuring process (``time.process_time``), so
other load on a shared machine inflates them less than wall time would. Each figure
is the median of ``--repeats`` runs. datatrove runs in its own virtual environment
(it pins an older trafilatura) as a subprocess on the same JSONL input, one task,
one worker; its per-step times come from its own ``stats.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.config import PrepareConfig, load_config
from lmforge.data.dedup import MinHasher, near_duplicate_clusters
from lmforge.data.document import Document
from lmforge.data.pipeline import prepare
from lmforge.data.readers import extract_html
from lmforge.data.steps import CleanStep, DecontamStep, FilterStep, PIIStep, build_steps, measure
from lmforge.paths import shared_data

MB = 1e6


def median_cpu(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def corpus(shared: Path) -> list[Document]:
    """Raw prose: 15 Gutenberg books (header included) and 181 extracted web articles."""
    docs = []
    for path in sorted((shared / "gutenberg").glob("*.txt.gz")):
        text = gzip.decompress(path.read_bytes()).decode("utf-8").lstrip("\ufeff")
        docs.append(Document(path.name, text, "gutenberg", "pd", {"kind": "text"}))
    for path in sorted((shared / "web_html" / "html").glob("*.html.gz")):
        text = extract_html(gzip.decompress(path.read_bytes()))
        if text:
            docs.append(Document(path.name, text, "web", "mit", {"kind": "text"}))
    return docs


def copy_docs(docs: list[Document]) -> list[Document]:
    return [Document(d.id, d.text, d.source, d.license, dict(d.meta)) for d in docs]


def bench_steps(docs: list[Document], repeats: int) -> list[dict]:
    cfg = PrepareConfig(decontaminate=["hellaswag", "crows_pairs"], max_words=0)
    rows = []
    html_pages = sorted((shared_data() / "web_html" / "html").glob("*.html.gz"))
    raw = [gzip.decompress(p.read_bytes()) for p in html_pages]
    t = median_cpu(lambda: [extract_html(h) for h in raw], repeats)
    rows.append(("read:html (trafilatura)", len(raw), sum(map(len, raw)), t))
    # Each step sees what the previous one kept, as in the pipeline.
    current = copy_docs(docs)
    steps = build_steps(cfg)
    for step in steps:
        if isinstance(step, DecontamStep):
            from lmforge.data import steps as steps_module

            steps_module._CONTAMINATION_CACHE.clear()
            t0 = time.process_time()
            DecontamStep(cfg)  # the n-gram index is built once per worker process
            rows.append(("decontaminate: build index", 1, 0, time.process_time() - t0))
        n, size = len(current), sum(measure(d)[0] for d in current)
        kept: list[Document] = []

        def run(step=step, src=current, kept=kept):
            fresh = type(step)(step.filter) if isinstance(step, FilterStep) else step
            kept[:] = list(fresh(copy_docs(src)))

        t = median_cpu(run, repeats)
        rows.append((step.name, n, size, t))
        current = kept
    hasher = MinHasher(128, 5)
    size = sum(measure(d)[0] for d in current)
    t = median_cpu(lambda: hasher.signatures([d.text for d in current]), repeats)
    rows.append(("minhash signatures", len(current), size, t))
    return [
        {
            "step": name,
            "docs": n,
            "bytes": b,
            "cpu_s": round(t, 4),
            "docs_per_s": round(n / t, 1) if t else None,
            "mb_per_s": round(b / MB / t, 3) if t and b else None,
        }
        for name, n, b, t in rows
    ]


def bench_full(repeats: int) -> dict:
    """The data-mix recipe end to end in one process (one core)."""
    cfg = load_config("data-mix").prepare
    cfg.workers = 1
    results = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0, w0 = time.process_time(), time.perf_counter()
            report = prepare(cfg, Path(tmp) / "out", log=lambda s: None)
            results.append((time.process_time() - t0, time.perf_counter() - w0, report))
    cpu = statistics.median(r[0] for r in results)
    wall = statistics.median(r[1] for r in results)
    totals = results[0][2]["totals"]
    return {
        "inputs": totals["inputs_read"],
        "bytes_in": totals["bytes_read"],
        "docs_out": totals["docs_out"],
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "docs_per_s_per_core": round(totals["inputs_read"] / cpu, 2),
        "mb_per_s_per_core": round(totals["bytes_read"] / MB / cpu, 3),
    }


def synthetic_docs(n: int, words_per_doc: int = 100, dup_fraction: float = 0.01, seed: int = 0):
    """n documents of words drawn from Gutenberg text, plus lightly edited copies.

    Words are sampled independently (Zipfian by construction, as they come from real
    text), so unrelated documents share almost no 5-word shingles; windows cut from
    the books instead would overlap each other (100k windows over 2.2M words) and be
    near-duplicates by construction. `dup_fraction` of the documents are copies of
    others with one word changed (true Jaccard ≈ 0.9).
    """
    rng = random.Random(seed)
    words = []
    for path in sorted((shared_data() / "gutenberg").glob("*.txt.gz")):
        words += gzip.decompress(path.read_bytes()).decode("utf-8").split()
    n_dup = int(n * dup_fraction)
    texts = [" ".join(rng.choices(words, k=words_per_doc)) for _ in range(n - n_dup)]
    for _ in range(n_dup):
        w = texts[rng.randrange(n - n_dup)].split()
        w[rng.randrange(len(w))] = "changed"
        texts.append(" ".join(w))
    return texts, n_dup


def bench_minhash(n: int, repeats: int) -> dict:
    texts, n_dup = synthetic_docs(n)
    hasher = MinHasher(128, 5)
    sigs = []
    t_sig = median_cpu(lambda: sigs.append(hasher.signatures(texts)), repeats)
    clusters: list = []
    t_lsh = median_cpu(lambda: clusters.append(near_duplicate_clusters(sigs[-1], 0.8)), repeats)
    removed = sum(len(c) - 1 for c in clusters[-1])
    return {
        "documents": n,
        "planted_near_duplicates": n_dup,
        "removed": removed,
        "signature_cpu_s": round(t_sig, 2),
        "lsh_cluster_cpu_s": round(t_lsh, 2),
        "total_cpu_s": round(t_sig + t_lsh, 2),
    }


DATATROVE_SCRIPT = r"""
import json, sys, time, os
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.formatters import PIIFormatter, FTFYFormatter
from datatrove.pipeline.dedup import (MinhashConfig, MinhashDedupSignature, MinhashDedupBuckets,
    MinhashDedupCluster, MinhashDedupFilter)
from datatrove.utils.hashing import HashConfig

def steps_run(inp, work):
    ex = LocalPipelineExecutor(pipeline=[
        JsonlReader(os.path.dirname(inp), glob_pattern=os.path.basename(inp)),
        FTFYFormatter(),
        GopherQualityFilter(max_doc_words=None),
        GopherRepetitionFilter(),
        PIIFormatter(),
        JsonlWriter(work + "/out"),
    ], tasks=1, workers=1, logging_dir=work + "/logs")
    ex.run()
    stats = json.load(open(work + "/logs/stats.json"))
    return stats

def minhash_run(inp, work):
    cfg = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=14, hashes_per_bucket=8, n_grams=5)
    t0 = time.process_time()
    stages = [
        [JsonlReader(os.path.dirname(inp), glob_pattern=os.path.basename(inp)), MinhashDedupSignature(output_folder=work + "/sigs", config=cfg)],
        [MinhashDedupBuckets(input_folder=work + "/sigs", output_folder=work + "/buckets", config=cfg)],
        [MinhashDedupCluster(input_folder=work + "/buckets", output_folder=work + "/remove_ids", config=cfg)],
        [JsonlReader(os.path.dirname(inp), glob_pattern=os.path.basename(inp)), MinhashDedupFilter(input_folder=work + "/remove_ids")],
    ]
    times = []
    for i, pipe in enumerate(stages):
        t = time.process_time()
        tasks = 1 if i != 1 else cfg.num_buckets
        LocalPipelineExecutor(pipeline=pipe, tasks=tasks, workers=1, logging_dir=f"{work}/logs{i}").run()
        times.append(time.process_time() - t)
    return times

if __name__ == "__main__":
    mode, inp, work = sys.argv[1:4]
    out = steps_run(inp, work) if mode == "steps" else minhash_run(inp, work)
    print("RESULT " + json.dumps(out))
"""


def run_datatrove(python: str, mode: str, inp: Path, work: Path) -> object:
    script = work / "dt_bench.py"
    script.write_text(DATATROVE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run(
        [python, str(script), mode, str(inp), str(work)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"datatrove run failed:\n{proc.stderr[-3000:]}")


def datatrove_step_seconds(stats: list[dict]) -> dict[str, float]:
    out = {}
    for st in stats:
        name = st["name"]
        total = st.get("time_stats", {}).get(
            "total", st.get("time_stats", {}).get("global_mean", 0)
        )
        out[name] = float(total)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--minhash-docs", type=int, default=100_000)
    ap.add_argument(
        "--dt-python", default="/tmp/data/dtvenv/bin/python", help="python of a venv with datatrove"
    )
    ap.add_argument("--dt-repeats", type=int, default=2, help="repeats of the datatrove runs")
    ap.add_argument("--full-repeats", type=int, default=1, help="repeats of the full recipe run")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--only-minhash", action="store_true", help="just the 100k MinHash figures")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    shared = shared_data()
    results: dict = {"machine": f"{os.cpu_count()} cores", "python": sys.version.split()[0]}
    docs = corpus(shared)
    print(f"corpus: {len(docs)} documents, {sum(measure(d)[0] for d in docs) / MB:.1f} MB")
    results["steps"] = [] if args.only_minhash else bench_steps(docs, args.repeats)
    print(f"{'step':34s} {'docs':>6s} {'MB':>7s} {'CPU s':>8s} {'docs/s':>9s} {'MB/s':>7s}")
    for r in results["steps"]:
        print(
            f"{r['step']:34s} {r['docs']:6d} {r['bytes'] / MB:7.2f} {r['cpu_s']:8.3f} "
            f"{r['docs_per_s'] or 0:9.1f} {r['mb_per_s'] or 0:7.2f}"
        )
    if not (args.skip_full or args.only_minhash):
        results["full_pipeline"] = bench_full(args.full_repeats)
        print("full pipeline (data-mix recipe, 1 worker):", results["full_pipeline"])
    results["minhash_100k"] = bench_minhash(args.minhash_docs, args.repeats)
    print(f"MinHash dedup of {args.minhash_docs:,} docs:", results["minhash_100k"])

    if Path(args.dt_python).exists():
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            inp = tmp_path / "input.jsonl"
            # datatrove's Gopher quality filter tokenizes with spaCy (~100 s per MB here), so
            # the side-by-side uses the web articles and the four shortest books.
            books = sorted((d for d in docs if d.source == "gutenberg"), key=lambda d: len(d.text))
            docs = [d for d in docs if d.source == "web"] + books[:4]
            print(
                f"side-by-side corpus: {len(docs)} documents, {sum(measure(d)[0] for d in docs) / MB:.1f} MB"
            )
            with inp.open("w") as fh:
                for d in docs:
                    fh.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
            # Ours on the same steps datatrove has: ftfy, Gopher quality + repetition, PII.
            ours_cfg = PrepareConfig(max_words=0)
            ours_steps = {
                "ftfy": CleanStep(ours_cfg),
                "gopher_quality": build_steps(ours_cfg)[2],
                "gopher_repetition": build_steps(ours_cfg)[3],
                "pii": PIIStep(),
            }
            ours: dict[str, list[float]] = {k: [] for k in ours_steps}
            theirs: dict[str, list[float]] = {k: [] for k in ours_steps}
            names = {
                "ftfy": "🔣 FTFY",
                "gopher_quality": "🥇 Gopher Quality",
                "gopher_repetition": "👯 Gopher Repetition",
                "pii": "🕵️ PII",
            }
            for i in range(0 if args.only_minhash else args.dt_repeats):
                # Interleaved A/B: ours, then datatrove, per repeat.
                current = copy_docs(docs)
                for key, step in ours_steps.items():
                    fresh = (
                        type(step)(step.filter)
                        if isinstance(step, FilterStep)
                        else (CleanStep(ours_cfg) if key == "ftfy" else PIIStep())
                    )
                    # Wall time here, as datatrove's step timers measure wall time.
                    t0 = time.perf_counter()
                    current = list(fresh(current))
                    ours[key].append(time.perf_counter() - t0)
                work = tmp_path / f"dt{i}"
                work.mkdir()
                stats = run_datatrove(args.dt_python, "steps", inp, work)
                secs = datatrove_step_seconds(stats)
                for key, label in names.items():
                    match = [
                        v for k, v in secs.items() if label.split(" ", 1)[1].lower() in k.lower()
                    ]
                    theirs[key].append(match[0] if match else float("nan"))
            comparison = {}
            for key in ours_steps if not args.only_minhash else []:
                a, b = statistics.median(ours[key]), statistics.median(theirs[key])
                comparison[key] = {
                    "ours_s": round(a, 3),
                    "datatrove_s": round(b, 3),
                    "speedup": round(b / a, 2) if a else None,
                }
            if comparison:
                results["vs_datatrove_steps"] = comparison
                print("vs datatrove (same input, one core):", json.dumps(comparison, indent=1))
            # MinHash at 100k docs: signatures + buckets + clustering + filter.
            texts, _ = synthetic_docs(args.minhash_docs)
            mh = tmp_path / "mh.jsonl"
            with mh.open("w") as fh:
                for k, t in enumerate(texts):
                    fh.write(json.dumps({"id": str(k), "text": t}) + "\n")
            dt_times = []
            for i in range(args.dt_repeats):
                work = tmp_path / f"mh{i}"
                work.mkdir()
                dt_times.append(sum(run_datatrove(args.dt_python, "minhash", mh, work)))
            dt = statistics.median(dt_times)
            ours_t = results["minhash_100k"]["total_cpu_s"]
            results["vs_datatrove_minhash"] = {
                "ours_cpu_s": ours_t,
                "datatrove_cpu_s": round(dt, 2),
                "speedup": round(dt / ours_t, 2),
            }
            print("MinHash vs datatrove:", results["vs_datatrove_minhash"])
    else:
        print(f"datatrove comparison skipped: {args.dt_python} not found")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
