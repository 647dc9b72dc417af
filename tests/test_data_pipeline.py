"""The whole `prepare` pipeline: report, exclusions, mixing, resumption after SIGKILL, Ray."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from lmforge.config import PrepareConfig, PrepareSource
from lmforge.data.pipeline import mixing_copies, prepare, read_shard
from lmforge.data.sources import iter_documents

REPO = Path(__file__).resolve().parents[1]


def read_zst_jsonl(path: Path) -> list[dict]:
    with path.open("rb") as raw:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        return [json.loads(line) for line in text]


def make_inputs(tmp: Path, shared: Path) -> Path:
    """A folder of awkward inputs: duplicates, PII, a benchmark leak, bad files."""
    extra = tmp / "extra"
    extra.mkdir()
    book = gzip.decompress(next((shared / "gutenberg").glob("pg35_*.txt.gz")).read_bytes())
    (extra / "a_copy_of_time_machine.txt").write_bytes(book)  # exact duplicate after cleaning
    words = book.decode("utf-8").split(" ")
    for i in range(100, len(words), 400):
        words[i] = "changed"
    (extra / "b_near_copy.txt").write_text(" ".join(words), encoding="utf-8")
    para = (
        "We met at the station and talked about the weather, the trains and the old mill. "
        "It was a quiet afternoon, and the town was in no hurry to be anywhere else at all. "
    ) * 4
    hs = json.loads(
        gzip.decompress(
            (shared / "hellaswag" / "hellaswag_val.jsonl.gz").read_bytes()
        ).splitlines()[5]
    )
    leak = f"{para}\n\n{hs['ctx']} {hs['endings'][hs['label']]}\n\n{para}"
    records = [
        {
            "text": para + " Write to me at john.smith@example.org or call +1 (415) 555-0132.",
            "id": "pii",
        },
        {"text": leak, "id": "leak"},
        {"text": "short", "id": "short"},
    ]
    lines = [json.dumps(r) for r in records] + ["{broken json", json.dumps({"no_text": 1})]
    (extra / "c_records.jsonl").write_text("\n".join(lines) + "\n")
    (extra / "d_empty.txt").write_bytes(b"")
    (extra / "e_binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    return extra


def small_config(shared: Path, extra: Path, **kw) -> PrepareConfig:
    sources = [
        PrepareSource(
            path=str(shared / "gutenberg"),
            name="books",
            include=["pg35_*", "pg46_*", "pg1513_*"],
            license="public-domain",
        ),
        PrepareSource(path=str(extra), name="extra", license="test", weight=2.0, id_field="id"),
        PrepareSource(
            path=str(shared / "warc"),
            kind="warc",
            include=["whirlwind.warc.gz", "whirlwind.warc.wet.gz"],
            license="cc-tou",
        ),
    ]
    defaults: dict = dict(
        sources=sources,
        workers=1,
        task_bytes=150_000,
        decontaminate=["hellaswag"],
        repetition=False,  # Romeo and Juliet is a play: see test_data_clean_filters
    )
    defaults.update(kw)
    return PrepareConfig(**defaults)


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared):
    tmp = tmp_path_factory.mktemp("prepare")
    extra = make_inputs(tmp, shared)
    cfg = small_config(shared, extra)
    out = tmp / "out"
    report = prepare(cfg, out, log=lambda s: None)
    return cfg, out, report


def test_report_accounts_for_every_input(run):
    _cfg, out, report = run
    steps = {s["name"]: s for s in report["steps"]}
    # Every step's output is the next step's input.
    names = [s["name"] for s in report["steps"]]
    for a, b in itertools.pairwise(names):
        if a != "mix":  # mixing repeats documents (weight 2)
            assert steps[a]["docs_out"] == steps[b]["docs_in"], (a, b)
    for s in report["steps"]:
        if s["name"] != "mix":
            assert s["docs_in"] - s["docs_out"] == sum(s["dropped"].values()), s["name"]
    assert report["bad_input"]["counts"] == {
        "read:empty_file": 1,
        "read:binary": 1,
        "read:malformed_json": 1,
        "read:missing_field": 1,
    }
    files = {Path(e["file"]).name for e in report["bad_input"]["examples"]}
    assert files == {"d_empty.txt", "e_binary.txt", "c_records.jsonl"}
    assert report["removals"]["dedup:exact"] == 1
    assert report["removals"]["dedup:near"] == 1
    assert report["removals"]["contaminated:hellaswag"] == 1
    assert report["decontamination"]["hellaswag"]["documents"] == 1
    assert report["pii"]["EMAIL"] == 1 and report["pii"]["PHONE"] == 1
    assert report["unknown_license_sources"] == []
    # The Common Crawl page is Aragonese Wikipedia: its WARC and WET records go by language.
    assert report["removals"]["language:an"] == 2
    assert set(report["licenses"]) == {"public-domain", "test"}
    assert (out / "data_report.md").read_text().startswith("# Data preparation report")


def test_shards_are_a_data_source_and_clean(run):
    _cfg, out, report = run
    docs = list(iter_documents([str(out / "shards")]))
    assert len(docs) == report["totals"]["docs_out"]
    by_source = Counter(d.source for d in docs)
    assert by_source["books"] == 3  # repetition filter off: the play is kept too
    # extra: only the PII record survives (the copies are duplicates of the book, the leak is
    # contaminated), and weight 2 writes it twice under the same id.
    extra = [d for d in docs if d.source == "extra"]
    assert [d.id for d in extra] == ["extra/pii", "extra/pii"]
    assert "<EMAIL>" in extra[0].text and "john.smith" not in extra[0].text
    assert all("PROJECT GUTENBERG" not in d.text.upper()[:3000] for d in docs)
    time_machine = next(d for d in docs if "pg35" in d.id)
    assert time_machine.source == "books"  # the first of the duplicate cluster is kept


def test_exclusions_hold_every_dropped_document_with_reason(run):
    _cfg, out, report = run
    records = [
        r for p in sorted((out / "exclusions").glob("*.jsonl.zst")) for r in read_zst_jsonl(p)
    ]
    reasons = Counter(r["reason"] for r in records)
    assert reasons == Counter(report["removals"])
    dup = next(r for r in records if r["reason"] == "dedup:exact")
    assert dup["id"] == "extra/a_copy_of_time_machine.txt"
    bad = next(r for r in records if r["reason"] == "read:malformed_json")
    assert bad["line"] == 4 and bad["file"].endswith("c_records.jsonl")


def test_rerun_skips_finished_work_and_changed_config_is_refused(run):
    cfg, out, report = run
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    t0 = time.perf_counter()
    again = prepare(cfg, out, log=lambda s: None)
    assert time.perf_counter() - t0 < report["timing"]["wall_seconds"]
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before
    assert again["totals"] == report["totals"]
    changed = PrepareConfig(**{**cfg.__dict__, "min_chars": 10})
    with pytest.raises(ValueError, match="another config"):
        prepare(changed, out, log=lambda s: None)


def test_mixing_copies_follow_weights():
    ids = [f"doc{i}" for i in range(4000)]
    half = sum(mixing_copies(i, 0.5, seed=1) for i in ids)
    assert 1800 < half < 2200
    assert sum(mixing_copies(i, 2.5, seed=1) for i in ids) == pytest.approx(10000, rel=0.05)
    assert [mixing_copies(i, 0.5, 1) for i in ids[:50]] == [
        mixing_copies(i, 0.5, 1) for i in ids[:50]
    ]
    assert all(mixing_copies(i, 0.0, 1) == 0 for i in ids[:50])


KILL_SCRIPT = """
import sys
from lmforge.config import PrepareConfig, PrepareSource
from lmforge.data.pipeline import prepare
shared, out = sys.argv[1], sys.argv[2]
cfg = PrepareConfig(
    sources=[
        PrepareSource(path=shared + "/gutenberg", include=["pg35_*", "pg46_*"], license="pd"),
        PrepareSource(path=shared + "/web_html/html", kind="html", include=["0*", "1*"], license="mit"),
    ],
    workers=1, task_bytes=100_000, languages=[],
)
prepare(cfg, out, log=lambda s: print(s, flush=True))
"""


def run_prepare_subprocess(shared: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(shared), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def snapshot(out: Path) -> dict[str, bytes]:
    files = sorted([*(out / "shards").iterdir(), *(out / "exclusions").iterdir()])
    return {p.name: p.read_bytes() for p in files}


def test_sigkill_mid_run_then_rerun_gives_identical_output(tmp_path, shared):
    full = tmp_path / "uninterrupted"
    proc = run_prepare_subprocess(shared, full)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode() if proc.stderr else ""
    killed = tmp_path / "killed"
    proc = run_prepare_subprocess(shared, killed)
    markers = killed / "_state" / "stage1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(markers.glob("*.done"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(markers.glob("*.done")))
    total = json.loads((killed / "_state" / "run.json").read_text())["tasks"]
    assert 3 <= done < total  # killed mid-run, with finished tasks to keep
    assert not (killed / "data_report.json").exists()
    proc = run_prepare_subprocess(shared, killed)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert snapshot(killed) == snapshot(full)
    assert not list(killed.rglob("*.tmp"))
    a = json.loads((killed / "data_report.json").read_text())["totals"]
    b = json.loads((full / "data_report.json").read_text())["totals"]
    assert a == b


def test_process_pool_matches_in_process(tmp_path, run):
    cfg, out, report = run
    pool_cfg = PrepareConfig(**{**cfg.__dict__, "workers": 2})
    pool_report = prepare(pool_cfg, tmp_path / "pool", log=lambda s: None)
    assert snapshot(tmp_path / "pool") == snapshot(out)
    assert pool_report["totals"] == report["totals"]


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path, shared, run):
    pytest.importorskip("ray")
    import ray

    cfg, out, report = run
    ray_cfg = PrepareConfig(**{**cfg.__dict__, "executor": "ray", "workers": 2})
    ray_out = tmp_path / "ray"
    try:
        ray_report = prepare(ray_cfg, ray_out, log=lambda s: None)
    finally:
        ray.shutdown()
    assert snapshot(ray_out) == snapshot(out)
    assert ray_report["totals"] == report["totals"]


def test_read_shard_roundtrip(run):
    _cfg, out, _report = run
    shard = sorted((out / "shards").glob("*.jsonl.zst"))[0]
    docs = list(read_shard(shard))
    assert docs and all(d.text for d in docs)
