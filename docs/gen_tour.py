"""Run the tour's commands for real and write their output into docs/generated/.

Every snippet shown in docs/tour.md is the captured output of a command run
here on the tour recipe (docs/tour.yaml, a shrunken gutenberg-small), plus a
loss-curve PNG drawn from the run's metrics.jsonl. The generated files are
committed, so `mkdocs build` needs no training. Takes a few minutes on a CPU.

    python docs/gen_tour.py [--work /tmp/lmforge-tour]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "generated"
MAX_LINES = 40  # longer outputs keep their head and tail

# (snippet name, command) in the order of the tour; all run from the work folder.
COMMANDS = [
    ("prepare", "lmforge prepare tour.yaml"),
    ("tokenizer", "lmforge tokenizer train tour.yaml"),
    ("tokenize", "lmforge tokenize tour.yaml"),
    ("plan", "lmforge plan tour.yaml --gpu cpu --vocab 4096"),
    ("plan_budget", "lmforge plan --budget '$500' --gpu H100"),
    ("pretrain", "lmforge pretrain tour.yaml"),
    ("generate", "lmforge generate --checkpoint runs/tour --prompt 'It was a ' --max-tokens 60 --seed 0"),
    ("finetune", "lmforge finetune tour.yaml --checkpoint runs/tour --out runs/tour-sft"),
    ("eval", "lmforge eval --checkpoint runs/tour --checkpoint runs/tour-sft --task ppl --data ppl=../shared/data/tinyshakespeare/input.txt --task hellaswag --limit 100 --out runs/tour/eval.json"),
    ("bias", "lmforge bias --checkpoint runs/tour --limit 200 --samples 1 --out runs/tour/bias.json"),
]  # fmt: skip


def _clean(text: str, work: Path) -> str:
    from lmforge.paths import shared_data

    text = text.replace(str(work) + "/", "").replace(str(work), ".")
    text = text.replace(str(shared_data()), "../shared/data")
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    if len(lines) > MAX_LINES:
        lines = [*lines[: MAX_LINES // 2], "...", *lines[-MAX_LINES // 2 :]]
    return "\n".join(lines)


def run(name: str, command: str, work: Path) -> str:
    from lmforge.paths import shared_data

    # Commands are shown with the shared data beside the work folder; run with the real path.
    argv = shlex.split(command.replace("../shared/data", str(shared_data())))
    argv = [sys.executable, "-m", "lmforge", *argv[1:]]
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", COLUMNS="100")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    print(f"{name}: exit {proc.returncode} in {took:.0f}s", flush=True)
    if proc.returncode:
        raise SystemExit(f"{command} failed:\n{proc.stdout}\n{proc.stderr}")
    text = f"$ {command}\n" + _clean(proc.stdout + proc.stderr, work) + "\n"
    (OUT / f"{name}.txt").write_text(text, encoding="utf-8")
    return text


def loss_plot(work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        json.loads(line) for line in (work / "runs/tour/metrics.jsonl").read_text().splitlines()
    ]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(*zip(*train, strict=True), label="training loss", marker=".")
    ax.plot(*zip(*val, strict=True), label="validation loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Pre-training the tour model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # Fixed metadata so a rerun with the same numbers writes the same bytes.
    fig.savefig(OUT / "loss.png", metadata={"Software": None})
    plt.close(fig)


def tokens_example(work: Path) -> None:
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(work / "runs/tour/tokenizer.json")
    text = "It was the best of times, it was the worst of times."
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    (OUT / "tokens.txt").write_text(
        f"text:   {text!r}\n"
        f"bytes:  {len(text.encode())}\n"
        f"tokens: {len(ids)}  ({len(text.encode()) / len(ids):.2f} bytes per token)\n"
        f"ids:    {ids}\n"
        f"pieces: {pieces}\n",
        encoding="utf-8",
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default="/tmp/lmforge-tour", help="scratch folder")
    parser.add_argument("--only", nargs="*", help="snippet names to (re)generate")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "tour.yaml").write_text((HERE / "tour.yaml").read_text(), encoding="utf-8")
    OUT.mkdir(exist_ok=True)
    for name, command in COMMANDS:
        if not args.only or name in args.only:
            run(name, command, work)
        if name == "tokenizer":
            tokens_example(work)
        if name == "pretrain":
            loss_plot(work)
    report = work / "runs/tour/prepared/data_report.md"
    if report.exists():
        # The head of the report, its headings demoted to sit under the tour's "Data".
        lines = report.read_text(encoding="utf-8").splitlines()[:30]
        lines = ["##" + line if line.startswith("#") else line for line in lines]
        (OUT / "data_report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
