"""Load test of the arena: N concurrent annotators submit M votes to `lmforge serve` on loopback.

Starts the app with uvicorn in a subprocess on 127.0.0.1 (a free port; nothing
leaves the machine), creates a study with synthetic outputs (this measures the
voting path, not generation), then runs one asyncio task per annotator: open
the invitation link, and repeatedly load the vote page and submit a vote.
A fraction of votes is submitted twice with the same vote id (a double click /
a client retry). At the end the store must hold every vote exactly once.

    python benchmarks/serve_load.py                      # 50 annotators, 2,000 votes
    python benchmarks/serve_load.py --annotators 10 --votes 200

Prints vote-submission and page-load latency (p50/p90/p99/max) and the
throughput, and exits non-zero if any vote is missing or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lmforge.serve.store import Store, StudySettings

HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))
    return xs[k]


def field(html: str, name: str) -> str:
    m = re.search(rf'name="{name}" value="([^"]*)"', html)
    if not m:
        raise RuntimeError(f"vote page lacks the {name} field:\n{html[:500]}")
    return m.group(1)


async def annotator(
    base: str,
    study_id: int,
    token: str,
    n_votes: int,
    duplicate_fraction: float,
    rng: random.Random,
    vote_ms: list[float],
    page_ms: list[float],
    sent: list[str],
    duplicates: list[int],
) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as client:
        r = await client.get(f"/a/{token}", follow_redirects=True)
        r.raise_for_status()
        for _ in range(n_votes):
            t0 = time.perf_counter()
            page = await client.get(f"/arena/{study_id}")
            page_ms.append(1000 * (time.perf_counter() - t0))
            page.raise_for_status()
            data = {
                "csrf": field(page.text, "csrf"),
                "item_id": field(page.text, "item_id"),
                "vote_uid": field(page.text, "vote_uid"),
                "choice": rng.choice(["left", "right", "tie", "both_bad"]),
                "comment": rng.choice(["", "", "fine", "A rambles"]),
            }
            copies = 2 if rng.random() < duplicate_fraction else 1
            for _ in range(copies):
                t0 = time.perf_counter()
                r = await client.post(f"/arena/{study_id}/vote", data=data)
                vote_ms.append(1000 * (time.perf_counter() - t0))
                if r.status_code != 303:
                    raise RuntimeError(f"vote answered {r.status_code}: {r.text[:300]}")
            sent.append(data["vote_uid"])
            duplicates[0] += copies - 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--annotators", type=int, default=50)
    ap.add_argument("--votes", type=int, default=2000, help="total votes (split evenly)")
    ap.add_argument("--duplicate-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the figures as JSON here")
    args = ap.parse_args()

    per_annotator = math.ceil(args.votes / args.annotators)
    n_models = 3
    # Enough items that every annotator can cast its share: prompts × pairs of models.
    n_prompts = math.ceil(per_annotator / (n_models * (n_models - 1) // 2))
    work = Path(tempfile.mkdtemp(prefix="lmforge-serve-load-"))
    runs = work / "runs"
    runs.mkdir()
    db = runs / "serve.sqlite"
    store = Store(db)
    prompts = [f"Prompt {p}: write a haiku about tokenizers." for p in range(n_prompts)]
    outputs = {
        (p, m): f"Output of model {m} for prompt {p}. " * 8
        for p in range(n_prompts)
        for m in range(n_models)
    }
    models = [(f"model-{m}", f"model-{m}") for m in range(n_models)]
    study_id = store.create_study("load test", prompts, models, StudySettings(), outputs)
    tokens = [store.add_annotator(study_id, f"annotator-{i}") for i in range(args.annotators)]
    store.close()

    port = free_port()
    base = f"http://{HOST}:{port}"
    code = (
        "import uvicorn; from lmforge.serve import create_app; "
        f"uvicorn.run(create_app({str(runs)!r}, db_path={str(db)!r}), "
        f"host={HOST!r}, port={port}, log_level='warning')"
    )
    server = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=1.0)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)

        vote_ms: list[float] = []
        page_ms: list[float] = []
        sent: list[str] = []
        duplicates = [0]
        counts = [per_annotator] * args.annotators
        # The last annotators take one vote fewer so the total is exactly --votes.
        for i in range(per_annotator * args.annotators - args.votes):
            counts[-1 - i] -= 1

        async def run_all() -> None:
            await asyncio.gather(
                *(
                    annotator(
                        base,
                        study_id,
                        tok,
                        n,
                        args.duplicate_fraction,
                        random.Random(args.seed * 1000 + i),
                        vote_ms,
                        page_ms,
                        sent,
                        duplicates,
                    )
                    for i, (tok, n) in enumerate(zip(tokens, counts, strict=True))
                )
            )

        t0 = time.perf_counter()
        asyncio.run(run_all())
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)

    stored = Store(db).votes(study_id)
    uids = [v["vote_uid"] for v in stored]
    missing = set(sent) - set(uids)
    extra = set(uids) - set(sent)
    duplicated = len(uids) - len(set(uids))
    ok = len(stored) == args.votes and not missing and not extra and not duplicated
    figures = {
        "annotators": args.annotators,
        "votes_sent": len(sent),
        "double_submissions": duplicates[0],
        "votes_stored": len(stored),
        "missing": len(missing),
        "duplicated": duplicated,
        "exactly_once": ok,
        "wall_s": wall,
        "votes_per_s": len(sent) / wall,
        "vote_ms": {q: percentile(vote_ms, p) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": max(vote_ms), "mean": statistics.fmean(vote_ms)},
        "page_ms": {q: percentile(page_ms, p) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": max(page_ms), "mean": statistics.fmean(page_ms)},
        "cpus": os.cpu_count(),
    }
    print(json.dumps(figures, indent=1))
    print(
        f"\n{args.annotators} annotators, {len(sent)} votes (+{duplicates[0]} double submissions) "
        f"in {wall:.1f}s ({figures['votes_per_s']:.0f} votes/s); stored {len(stored)}, "
        f"missing {len(missing)}, duplicated {duplicated}"
    )
    v, p = figures["vote_ms"], figures["page_ms"]
    print(f"vote POST latency: p50 {v['p50']:.1f} ms, p99 {v['p99']:.1f} ms, max {v['max']:.1f} ms")
    print(
        f"vote page GET latency: p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms, max {p['max']:.1f} ms"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
