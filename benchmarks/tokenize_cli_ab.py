"""`lmforge tokenize` as a whole command: this checkout against an older commit.

    python benchmarks/tokenize_cli_ab.py [--base 7fae689] [--mb 20] [--runs 3] [--shape books]

The older commit's `src/` is exported with `git archive` into a temporary folder and run
with ``PYTHONPATH`` pointing at it. Both sides run `lmforge tokenize quickstart` on the
same folder of text files (the shared Gutenberg books repeated to about `--mb` MB, as
`tokenize_speed.py` builds it; a fixed folder, so changes to built-in corpora between
the commits do not count; `--shape code` takes `tokenize_speed.py`'s 100 MB of distinct
Python files instead) with the same tokenizer file (trained once on the books),
interleaved A B A B ..., each a fresh process (startup and imports included). Prints
the median wall and CPU seconds of each side and their ratio, and checks that both
wrote byte-identical shard files. The default base is the last commit before goal 5
of issue 13 (the fast tokenize path).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from lmforge.data.sources import iter_documents
from lmforge.tokenizer import train_bpe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenize_speed import build_corpus

REPO = Path(__file__).resolve().parents[1]


def export(commit: str, dest: Path) -> Path:
    data = subprocess.run(
        ["git", "archive", commit, "src"], cwd=REPO, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def tokenize(src: Path, corpus: Path, tok: Path, out: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "lmforge", "tokenize", "quickstart", f"--data.sources=[{corpus}]"]
    cmd += [f"--tokenizer.path={tok}", f"--output.dir={out}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="7fae689")
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/lmforge-tokenize-speed")
    ap.add_argument("--shape", choices=["books", "docs", "code"], default="books")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-tok-ab-") as tmp:
        work = Path(tmp)
        sides = {"base": export(args.base, work / "export"), "this": REPO / "src"}
        books = build_corpus(Path(args.workdir), "books", args.mb)
        corpus = (
            books
            if args.shape == "books"
            else build_corpus(Path(args.workdir), args.shape, args.mb)
        )
        tok = work / "tokenizer.json"
        train_bpe((d.text for d in iter_documents([str(books / "c00_*.txt")])), 4096).save(tok)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        for r in range(args.runs):
            for name, src in sides.items():
                times[name].append(tokenize(src, corpus, tok, work / f"out-{name}"))
                wall, cpu = times[name][-1]
                print(f"run {r + 1} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
               for k, v in times.items()}  # fmt: skip
        for k, (w, c) in med.items():
            print(
                f"{k:>4} ({args.base if k == 'base' else 'checkout'}): {w:.2f} s wall, {c:.2f} s CPU"
            )
        print(f"speed-up: {med['base'][0] / med['this'][0]:.2f}x wall, "
              f"{med['base'][1] / med['this'][1]:.2f}x CPU")  # fmt: skip
        a, b = work / "out-base" / "tokens", work / "out-this" / "tokens"
        names = sorted(p.name for p in a.glob("*.bin"))
        same = names == sorted(p.name for p in b.glob("*.bin")) and all(
            (a / n).read_bytes() == (b / n).read_bytes() for n in names
        )
        print(f"shard files byte-identical: {same} ({len(names)} files)")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
