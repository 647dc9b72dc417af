"""Run the whole reliability suite (slow kill tests included) and print the table for BENCHMARKS.md.

    nice -n 10 python benchmarks/reliability.py            # ≈ 15–20 min on 2 busy cores
    python benchmarks/reliability.py --fuzz 200 --fast     # the default-suite subset, ≈ 2 min

The tests append one JSON line per result to $LMFORGE_RELIABILITY_LOG; this script
sets it, runs pytest on tests/test_reliability_*.py and sums the lines up. A test
that fails makes the script fail: a table is printed only for a passing suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz", type=int, default=1000, help="hypothesis examples per property")
    ap.add_argument("--corruptions", type=int, default=200, help="corruption cases per sweep")
    ap.add_argument("--fast", action="store_true", help="default-suite subset only (no -m slow)")
    args = ap.parse_args()
    log = Path(tempfile.mkdtemp(prefix="lmforge-reliability-")) / "results.jsonl"
    env = dict(
        os.environ,
        LMFORGE_RELIABILITY_LOG=str(log),
        LMFORGE_FUZZ_EXAMPLES=str(args.fuzz),
        LMFORGE_CORRUPTION_CASES=str(args.corruptions),
    )
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_reliability_*.py"))
    marker = "not slow" if args.fast else "slow or not slow"
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-m", marker, *files],
        cwd=ROOT,
        env=env,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        print(f"reliability suite FAILED (exit {done.returncode}); no table", file=sys.stderr)
        return done.returncode
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    print(table(rows, wall, args))
    return 0


def table(rows: list[dict], wall: float, args) -> str:
    kill: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        if r["test"] == "kill":
            kill[r["stage"]][0] += r["points"]
            kill[r["stage"]][1] += r["survived"]
    lines = ["| What | Cases | Outcome |", "|---|---:|---|"]
    for stage, (points, ok) in kill.items():
        lines.append(
            f"| SIGKILL during `{stage}` (seeded file-operation kill points) | {points} | "
            f"{ok}/{points} reruns bit-identical to the uninterrupted run |"
        )
    for r in rows:
        if r["test"] == "corruption":
            lines.append(
                f"| corrupted {r['kind']} (truncated / bit-flipped) | {r['cases']} | "
                f"{r['detected']}/{r['cases']} detected, named, older checkpoint used |"
            )
    for r in rows:
        if r["test"] == "disk_full":
            what = {k: v for k, v in r.items() if k not in ("test", "stage")}
            lines.append(f"| disk full during `{r['stage']}` | 1 | {what} |")
    fuzz_cases = 0
    for r in rows:
        if r["test"] == "fuzz":
            fuzz_cases += r["cases"]
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
            lines.append(f"| fuzz: {r['property']} | {r['cases']} | no crash; {outcomes} |")
    lines.append(f"| **fuzz cases in all** | {fuzz_cases} | no unhandled exception |")
    lines.append(
        f"\nWall time {wall / 60:.1f} min (`--fuzz {args.fuzz} --corruptions {args.corruptions}"
        f"{' --fast' if args.fast else ''}`)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
