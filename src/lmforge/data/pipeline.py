"""The preparation pipeline: tasks, stages, executors, atomic shards and resumption.

A run has three stages::

    1. per task (parallel)   read → clean → filters → PII → decontaminate,
                             + exact hash and MinHash signature of every kept document
    2. once                  exact + near-duplicate clusters over the whole run
    3. per task (parallel)   drop duplicates, apply mixing weights, write final shards

Output folder::

    shards/NNNNN-SOURCE.jsonl.zst   the prepared documents (a valid `data.sources` entry)
    exclusions/*.jsonl.zst          every dropped document or skipped input, with reason
    data_report.json / .md          what happened (see `lmforge.data.report`)
    _state/                         intermediate files and completion markers

Every file is written under a temporary name and renamed into place; a task's
completion marker (holding its statistics) is written last. A rerun skips tasks
whose marker exists and redoes the others from scratch, so a killed run resumes at
the first unfinished task and its output is byte-identical to an uninterrupted run:
every output depends only on its task's input and the config, never on timing.

Executors know nothing about the steps: `LocalExecutor` (a process pool, or the
current process for one worker) and `RayExecutor` (a private local Ray, or a running
cluster it joins) run ``run_task(stage, cfg, task, out)`` over the tasks and return the
statistics in task order. On Ray a task whose node dies is rerun elsewhere; each attempt
leaves a file under ``_state/attempts`` and the report counts the tasks run twice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmforge.config import PrepareConfig
from lmforge.data import registry
from lmforge.data.dedup import (
    MinHasher,
    content_hash,
    exact_duplicate_clusters,
    lsh_params,
    near_duplicate_clusters,
)
from lmforge.data.document import Document
from lmforge.data.readers import Task, plan_tasks, source_name
from lmforge.data.steps import (
    ReadStep,
    StepStats,
    build_post_dedup_steps,
    build_steps,
    doc_example,
    merge_step_stats,
)
from lmforge.fileio import atomic_path, fsync_replace, iter_json_lines, write_json_atomic

ZSTD_LEVEL = 3
STATE = "_state"

# ----------------------------------------------------------------------------- files


class DocShardWriter:
    """A JSONL.zst file of documents (or exclusion records) written under ``.tmp`` and
    renamed into place on `close`. (`lmforge.shards.ShardWriter` writes token shards.)"""

    def __init__(self, path: Path):
        import zstandard

        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.raw = self.tmp.open("wb")
        # Single-threaded compression with a fixed level: the same input always gives
        # the same bytes (a resumed run must reproduce an uninterrupted one exactly).
        self.zfh: IO[bytes] = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(self.raw)
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            self.zfh.write(line.encode("utf-8", errors="replace"))
        except OSError as exc:
            raise self._write_error(exc) from exc
        self.count += 1

    def close(self) -> None:
        try:
            self.zfh.close()  # also closes self.raw
            fsync_replace(self.tmp, self.path)
        except OSError as exc:
            raise self._write_error(exc) from exc

    def _write_error(self, exc: OSError) -> OSError:
        """Disk full (or similar): name the file; the task stays unfinished and reruns."""
        return OSError(exc.errno, f"{exc.strerror or exc} while writing", str(self.tmp))


# The old name, kept for callers that patch it (tests of a full disk).
ShardWriter = DocShardWriter


def read_shard(path: Path) -> Iterator[Document]:
    for _, rec in iter_json_lines(path):
        yield Document(rec["id"], rec["text"], rec["source"], rec["license"], rec["meta"])


def doc_record(doc: Document) -> dict[str, Any]:
    return doc.to_json()


# ----------------------------------------------------------------------------- stages


def _exclusion_writer(path: Path | None) -> tuple[Callable[..., None], Callable[[], None]]:
    if path is None:
        return (lambda *a: None), (lambda: None)
    writer = DocShardWriter(path)

    def on_drop(doc: Document | None, reason: str, step: str, info: dict[str, Any]) -> None:
        rec: dict[str, Any] = {**info, "reason": reason, "step": step}
        if doc is not None:
            rec.update(
                id=doc.id, source=doc.source, license=doc.license, text=doc.text, meta=doc.meta
            )
        writer.write(rec)

    return on_drop, writer.close


def run_stage1(cfg: PrepareConfig, task: Task, out: Path) -> dict[str, Any]:
    """Read, clean, filter, redact and decontaminate one task; hash and sign what is kept."""
    state = out / STATE / "stage1"
    src = cfg.sources[task.source_index]
    excl_path = (
        out / "exclusions" / f"{task.name}-stage1.jsonl.zst" if cfg.write_exclusions else None
    )
    on_drop, close_excl = _exclusion_writer(excl_path)
    read = ReadStep(src, cfg, on_drop)
    steps = build_steps(cfg, on_drop)
    hasher = MinHasher(cfg.num_perm, cfg.shingle_size, seed=cfg.seed + 42)
    writer = DocShardWriter(state / f"{task.name}.jsonl.zst")
    hashes: list[int] = []
    sigs: list[np.ndarray] = []
    ids: list[str] = []
    sign = StepStats("minhash_signatures")
    t_start = time.perf_counter()
    stream: Iterator[Document] = read(task)
    for step in steps:
        stream = step(stream)
    for doc in stream:
        t0 = time.process_time()
        if cfg.dedup_exact:
            hashes.append(content_hash(doc.text))
        if cfg.dedup_minhash:
            sigs.append(hasher.signature(doc.text))
        sign.add_in(doc)
        sign.add_out(doc)
        sign.seconds += time.process_time() - t0
        ids.append(doc.id)
        writer.write(doc_record(doc))
    writer.close()
    close_excl()
    write_json_atomic(state / f"{task.name}.ids.json", ids)
    sig_arr = np.stack(sigs) if sigs else np.zeros((0, cfg.num_perm), dtype=np.uint32)
    for kind, arr in (("hash", np.asarray(hashes, dtype=np.uint64)), ("sig", sig_arr)):
        with atomic_path(state / f"{task.name}.{kind}.npy", ".tmp.npy") as tmp:
            np.save(tmp, arr)
    return {
        "task": task.name,
        "source": source_name(src),
        "files": len(task.files),
        "kept": writer.count,
        "wall_seconds": round(time.perf_counter() - t_start, 4),
        "steps": [read.stats.to_json(), *[s.stats.to_json() for s in steps], sign.to_json()],
    }


def run_stage3(cfg: PrepareConfig, task: Task, out: Path) -> dict[str, Any]:
    """Drop the task's duplicates, apply its source's mixing weight, write the final shard."""
    src = cfg.sources[task.source_index]
    name = source_name(src)
    removed = json.loads((out / STATE / "dedup.json").read_text())["removed"].get(task.name, {})
    excl_path = (
        out / "exclusions" / f"{task.name}-stage3.jsonl.zst" if cfg.write_exclusions else None
    )
    on_drop, close_excl = _exclusion_writer(excl_path)
    dedup = StepStats("dedup")
    mix = StepStats("mix")
    output = StepStats("output")
    writer = DocShardWriter(out / "shards" / f"{task.name}-{name}.jsonl.zst")
    t_start = time.perf_counter()
    cpu_start = time.process_time()

    def mixed() -> Iterator[Document]:
        for pos, doc in enumerate(read_shard(out / STATE / "stage1" / f"{task.name}.jsonl.zst")):
            dedup.add_in(doc)
            reason = removed.get(str(pos))
            if reason:
                dedup.add_drop(reason, doc_example(doc))
                on_drop(doc, reason, "dedup", {})
                continue
            dedup.add_out(doc)
            mix.add_in(doc)
            copies = mixing_copies(doc.id, src.weight, cfg.seed)
            if copies == 0:
                mix.add_drop("mix:downsampled", doc_example(doc))
                on_drop(doc, "mix:downsampled", "mix", {})
                continue
            for k in range(copies):
                if k:  # repeats keep the id, so tokenize puts every copy in the same split
                    doc = Document(doc.id, doc.text, doc.source, doc.license, {**doc.meta})
                    doc.meta["repeat"] = k
                    mix.counters["repeated_copies"] += 1
                mix.add_out(doc)
                yield doc

    # Steps on the deduplicated, mixed documents (bias statistics, counterfactual
    # augmentation: a swapped copy is a near-duplicate by design, so it comes after dedup).
    post_steps = build_post_dedup_steps(cfg, on_drop)
    stream = mixed()
    for step in post_steps:
        stream = step(stream)
    for doc in stream:
        output.add_in(doc)
        output.add_out(doc)
        lang = doc.meta.get("code_language") or doc.meta.get("language") or "unknown"
        output.counters[f"language:{lang}"] += 1
        output.counters[f"license:{doc.license}"] += 1
        output.counters[f"source:{doc.source}"] += 1
        writer.write(doc_record(doc))
    writer.close()
    close_excl()
    # Dropping duplicates, mixing and writing happen in one loop: its time is the
    # dedup step's (the clustering itself is timed in stage 2), less the post-dedup steps.
    dedup.seconds = time.process_time() - cpu_start - sum(s.stats.seconds for s in post_steps)
    return {
        "task": task.name,
        "source": name,
        "written": writer.count,
        "wall_seconds": round(time.perf_counter() - t_start, 4),
        "steps": [
            dedup.to_json(),
            mix.to_json(),
            *[s.stats.to_json() for s in post_steps],
            output.to_json(),
        ],
    }


def mixing_copies(doc_id: str, weight: float, seed: int) -> int:
    """How many times a document appears in the mix: ⌊w⌋, plus one with probability frac(w).

    The draw is a hash of (seed, id), so it is the same on every run and executor.
    """
    if weight == 1.0:
        return 1
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2**64
    whole = int(weight)
    return whole + (1 if u < weight - whole else 0)


STAGES: dict[str, Callable[[PrepareConfig, Task, Path], dict[str, Any]]] = {
    "stage1": run_stage1,
    "stage3": run_stage3,
}


def run_task(
    stage: str,
    cfg: PrepareConfig,
    task: Task,
    out: str,
    steps: dict[str, tuple[type, str]] | None = None,
) -> dict[str, Any]:
    """Run one task of a stage unless its completion marker exists; return its statistics.

    `steps`: the driver's registered steps (`registry.snapshot`), for a worker process
    that did not import the module registering them.
    """
    registry.restore(steps)
    out_dir = Path(out)
    marker = out_dir / STATE / stage / f"{task.name}.done"
    if marker.exists():
        return json.loads(marker.read_text(encoding="utf-8"))
    stats = STAGES[stage](cfg, task, out_dir)
    write_json_atomic(marker, stats)  # last: the task counts as done only now
    return stats


def run_dedup(cfg: PrepareConfig, tasks: list[Task], out: Path) -> dict[str, Any]:
    """Stage 2: clusters over the whole run; the first document (run order) of each is kept."""
    marker = out / STATE / "dedup.json"
    if marker.exists():
        return json.loads(marker.read_text(encoding="utf-8"))["summary"]
    t0 = time.process_time()
    state = out / STATE / "stage1"
    owners: list[tuple[str, int]] = []  # global row → (task, position in task)
    hashes, sigs = [], []
    doc_ids: list[str] = []
    for task in tasks:
        task_ids = json.loads((state / f"{task.name}.ids.json").read_text(encoding="utf-8"))
        doc_ids += task_ids
        h = np.load(state / f"{task.name}.hash.npy")
        s = np.load(state / f"{task.name}.sig.npy")
        n = len(task_ids)
        owners.extend((task.name, i) for i in range(n))
        hashes.append(h)
        sigs.append(s)
    removed: dict[str, dict[str, str]] = {}
    summary: dict[str, Any] = {"documents": len(owners)}
    exact_removed: set[int] = set()
    clusters_out: list[dict[str, Any]] = []
    if cfg.dedup_exact and owners:
        all_h = np.concatenate(hashes)
        clusters = exact_duplicate_clusters([int(x) for x in all_h])
        for c in clusters:
            for i in c[1:]:
                exact_removed.add(i)
                t, p = owners[i]
                removed.setdefault(t, {})[str(p)] = "dedup:exact"
        summary["exact_examples"] = [
            {"size": len(c), "members": [doc_ids[i] for i in c[:10]]}
            for c in sorted(clusters, key=len, reverse=True)[:10]
        ]
        summary["exact_clusters"] = len(clusters)
        summary["exact_removed"] = len(exact_removed)
    if cfg.dedup_minhash and owners:
        all_s = np.concatenate(sigs)
        keep_rows = np.array(
            [i for i in range(len(owners)) if i not in exact_removed], dtype=np.int64
        )
        bands = cfg.bands or lsh_params(cfg.minhash_threshold, cfg.num_perm)[0]
        clusters = near_duplicate_clusters(all_s[keep_rows], cfg.minhash_threshold, bands)
        n_removed = 0
        for c in clusters:
            rows = [int(keep_rows[i]) for i in c]
            for i in rows[1:]:
                t, p = owners[i]
                removed.setdefault(t, {})[str(p)] = "dedup:near"
                n_removed += 1
            clusters_out.append(
                {
                    "size": len(rows),
                    "members": [doc_ids[i] for i in rows[:10]],
                }
            )
        summary.update(
            near_clusters=len(clusters),
            near_removed=n_removed,
            bands=bands,
            rows=cfg.num_perm // bands,
            largest_clusters=sorted(clusters_out, key=lambda c: -c["size"])[:10],
        )
    summary["seconds"] = round(time.process_time() - t0, 4)
    write_json_atomic(marker, {"removed": removed, "summary": summary})
    return summary


# ----------------------------------------------------------------------------- executors


Call = tuple[str, PrepareConfig, Task, str, dict[str, tuple[type, str]]]


class Executor:
    """Runs `run_task` over the tasks of a stage; subclasses say where (`run_all`)."""

    def map(
        self,
        stage: str,
        cfg: PrepareConfig,
        tasks: list[Task],
        out: str,
        log: Callable[[str], None],
    ) -> list[dict[str, Any]]:
        steps = registry.snapshot()
        return self.run_all([(stage, cfg, t, out, steps) for t in tasks], log)

    def run_all(self, calls: list[Call], log: Callable[[str], None]) -> list[dict[str, Any]]:
        raise NotImplementedError


class LocalExecutor(Executor):
    """A process pool (spawned workers), or the calling process when workers == 1."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)

    def run_all(self, calls: list[Call], log: Callable[[str], None]) -> list[dict[str, Any]]:
        if self.workers == 1 or len(calls) <= 1:
            results = []
            for call in calls:
                results.append(run_task(*call))
                log(f"{call[0]} task {call[2].name} done")
            return results
        import multiprocessing as mp

        with ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(run_task, *call) for call in calls]
            results = []
            for call, fut in zip(calls, futures, strict=True):
                results.append(fut.result())
                log(f"{call[0]} task {call[2].name} done")
            return results


ATTEMPTS = f"{STATE}/attempts"


def record_attempt(stage: str, task: Task, out: str) -> None:
    """Leave one file per attempt of a task: Ray reruns a task whose worker or node died
    without telling the driver, so the count of attempts lives beside the outputs."""
    import ray

    folder = Path(out) / ATTEMPTS / stage
    folder.mkdir(parents=True, exist_ok=True)
    info = json.dumps({"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()})
    for n in itertools.count(1):
        try:  # O_EXCL: two attempts never take the same number, even on a shared filesystem
            fd = os.open(folder / f"{task.name}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, info.encode())
        os.close(fd)
        return


def run_ray_task(
    stage: str, cfg: PrepareConfig, task: Task, out: str, steps: dict[str, tuple[type, str]]
) -> dict[str, Any]:
    record_attempt(stage, task, out)
    return run_task(stage, cfg, task, out, steps)


def count_retries(out: Path) -> dict[str, Any]:
    """Tasks of this run attempted more than once (their worker or node died, or a
    transient OSError), from the attempt files of `record_attempt`."""
    retried: dict[str, list[str]] = {}
    attempts = 0
    for folder in sorted((out / ATTEMPTS).glob("*")):
        per_task = Counter(f.name.rsplit(".", 1)[0] for f in folder.iterdir())
        attempts += sum(per_task.values())
        again = sorted(name for name, n in per_task.items() if n > 1)
        if again:
            retried[folder.name] = again
    return {
        "attempts": attempts,
        "retried_tasks": sum(len(v) for v in retried.values()),
        "retried": retried,
    }


def join_cluster(ray: Any, address: str) -> None:
    """`ray.init` on a running cluster; one clear line when there is none."""
    import socket

    def refuse(why: object) -> RuntimeError:
        return RuntimeError(
            f"prepare.ray_address={address}: no Ray cluster to join ({why}); start one "
            "with `ray start --head`, or leave ray_address empty for a local Ray"
        )

    if address != "auto":
        host, _, port = address.rpartition(":")
        # ray.init waits for minutes on a closed port; a refused connection says it at once
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as exc:
            raise refuse(exc) from None
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        raise refuse(exc) from None


class RayExecutor(Executor):
    """Runs tasks as Ray remote functions: on a private local Ray (``address=""``), or on
    a running cluster (``"auto"`` or ``"HOST:PORT"``), which it joins and never starts.

    A task whose worker or node dies is rerun elsewhere (`max_retries` times); since a
    task writes every file under a temporary name and its marker last, a rerun starts
    from clean and a finished task is never redone.
    """

    def __init__(self, workers: int, address: str = "", max_retries: int = 3):
        import ray

        if not ray.is_initialized():
            if address:
                join_cluster(ray, address)
            else:
                ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        self.ray = ray
        self.max_retries = max_retries
        # OSError too: a shared filesystem has transient failures; bad input never raises.
        # (Ray's type stubs allow only a bool for retry_exceptions; a list is documented.)
        options: dict[str, Any] = {"max_retries": max_retries, "retry_exceptions": [OSError]}
        self.remote = ray.remote(**options)(run_ray_task)

    def run_all(self, calls: list[Call], log: Callable[[str], None]) -> list[dict[str, Any]]:
        from ray.exceptions import RayError

        stage = calls[0][0] if calls else ""
        refs = [self.remote.remote(*call) for call in calls]
        try:
            results = self.ray.get(refs)
        except RayError as exc:
            # a task error (its cause) or a worker/node lost more often than max_retries
            cause = getattr(exc, "cause", None) or exc
            why = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
            raise RuntimeError(
                f"prepare {stage}: a Ray task failed after {self.max_retries} retries ({why}); "
                "rerun the same command: finished tasks are kept"
            ) from None
        log(f"{stage}: {len(calls)} tasks done on Ray")
        return list(results)


def make_executor(cfg: PrepareConfig, workers: int) -> Executor:
    if cfg.executor == "ray":
        return RayExecutor(workers, cfg.ray_address, cfg.ray_max_retries)
    return LocalExecutor(workers)


def local_path(path: str) -> str:
    """A plain path as is; an fsspec URL (``file:///data/corpus``) as the local path it
    names. Every node of a cluster opens the same path, so the filesystem must be shared
    (NFS, a mounted bucket); object stores without a mount are refused in one line."""
    if "://" not in path and not path.startswith("file:"):
        return path
    from fsspec.core import url_to_fs

    fs, local = url_to_fs(path)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if "file" not in protocols:
        raise ValueError(
            f"{path}: prepare reads and writes filesystems mounted on every node; "
            f"mount the {protocols[0]}:// store (e.g. s3fs, gcsfuse) and give its path"
        )
    return str(local)


# ----------------------------------------------------------------------------- driver


# Where and on how many workers the tasks run changes no output: a run killed on a
# cluster resumes on another cluster or on the local executor.
_EXECUTOR_KEYS = ("executor", "workers", "ray_address", "ray_max_retries")


def fingerprint(cfg: PrepareConfig, tasks: list[Task]) -> str:
    # Keys added later count only when set, so a run started before them still resumes.
    config = {
        k: v
        for k, v in asdict(cfg).items()
        if k not in _EXECUTOR_KEYS and not (k in ("steps", "plugins") and not v)
    }
    data = json.dumps({"config": config, "tasks": [asdict(t) for t in tasks]}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def prepare(
    cfg: PrepareConfig, out: str | Path, force: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the whole pipeline into `out` (resuming a previous run of the same config)."""
    from lmforge.data.report import build_report, write_report

    if not cfg.sources:
        raise ValueError("prepare.sources is empty: name at least one source in the recipe")
    sources = [s if s.kind == "hf" else replace(s, path=local_path(s.path)) for s in cfg.sources]
    cfg = replace(cfg, sources=sources)
    out = Path(local_path(str(out)))
    if force and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    registry.check_steps(cfg)  # an unknown step or option stops the run before any work
    tasks = plan_tasks(cfg.sources, cfg.task_bytes)
    fp = fingerprint(cfg, tasks)
    run_file = out / STATE / "run.json"
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != fp:
            raise ValueError(
                f"{out} holds a prepare run with another config or other inputs "
                f"(fingerprint {previous.get('fingerprint')} ≠ {fp}); use another folder or --force"
            )
        log(f"resuming the run in {out}")
    for sub in ("shards", "exclusions", f"{STATE}/stage1", f"{STATE}/stage3"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, {"fingerprint": fp, "tasks": len(tasks)})
    shutil.rmtree(out / ATTEMPTS, ignore_errors=True)  # the report counts this run's retries
    workers = cfg.workers or os.cpu_count() or 1
    executor = make_executor(cfg, workers)
    log(
        f"prepare: {len(cfg.sources)} sources, {len(tasks)} tasks, {cfg.executor} executor, {workers} workers"
    )
    t1 = time.perf_counter()
    stage1 = executor.map("stage1", cfg, tasks, str(out), log)
    t2 = time.perf_counter()
    dedup = run_dedup(cfg, tasks, out)
    t3 = time.perf_counter()
    stage3 = executor.map("stage3", cfg, tasks, str(out), log)
    t4 = time.perf_counter()
    timing: dict[str, Any] = {
        "plan_seconds": round(t1 - t0, 3),
        "stage1_seconds": round(t2 - t1, 3),
        "dedup_seconds": round(t3 - t2, 3),
        "stage3_seconds": round(t4 - t3, 3),
        "wall_seconds": round(t4 - t0, 3),
        "workers": workers,
        "executor": cfg.executor,
    }
    if cfg.ray_address:
        timing["ray_address"] = cfg.ray_address
    report = build_report(cfg, tasks, stage1, dedup, stage3, timing, count_retries(out))
    write_report(report, out)
    return report


__all__ = [
    "DocShardWriter",
    "LocalExecutor",
    "RayExecutor",
    "merge_step_stats",
    "mixing_copies",
    "prepare",
    "read_shard",
    "run_task",
]
