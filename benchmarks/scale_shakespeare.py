"""`lmforge scale` on tinyshakespeare (char level): fit on an iso-FLOP ladder, predict a held-out rung.

tinyshakespeare is one file; it is cut into 100 consecutive parts so the
document-level train/validation split has a validation set (≈ 10%). Then:

    lmforge scale shakespeare-char --out OUT --budgets 6e9,2e10,6e10 --predict-flops 2e11 \
        --held-out larger ...

and the figures (rungs, fit, prediction vs measurement, wall time) are printed.
Run it on a quiet machine with `nice -n 5 python benchmarks/scale_shakespeare.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lmforge.paths import shared_data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="/tmp/lmforge-scale")
    ap.add_argument("--budgets", default="6e9,2e10,6e10")
    ap.add_argument("--predict-flops", default="2e11")
    ap.add_argument("--held-out", default="larger", choices=["larger", "optimal"])
    args = ap.parse_args()
    out = Path(args.out)
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    text = (shared_data() / "tinyshakespeare" / "input.txt").read_text()
    n = 100
    step = len(text) // n
    for i in range(n):
        part = text[i * step : (i + 1) * step if i < n - 1 else len(text)]
        (corpus / f"part{i:03d}.txt").write_text(part)
    cmd = [
        sys.executable, "-m", "lmforge", "scale", "shakespeare-char",
        "--out", str(out / "scale"),
        "--budgets", args.budgets,
        "--predict-flops", args.predict_flops,
        "--held-out", args.held_out,
        f"--data.sources=[{corpus}]",
        "--train.eval_tokens=16384",
        "--train.tokens_per_step=2048",
        "--train.micro_batch_size=32",
        "--train.lr=3e-3",
        "--train.warmup_steps=20",
        "--train.threads=1",  # tiny models: one thread beats two on a busy 2-core machine
        "--train.peak_flops=1e11",  # skip the matmul-peak measurement in every rung
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    report = json.loads((out / "scale" / "scale.json").read_text())
    h = report["held_out"]
    print(
        json.dumps(
            {
                "rungs": len(report["rungs"]),
                "fit": report["fit"],
                "held_out": {
                    k: h[k] for k in ("name", "params", "tokens", "predicted", "val_loss")
                },
                "relative_error": h["relative_error"],
                "prediction_p05_p95": [
                    report["bootstrap"]["prediction"]["p05"],
                    report["bootstrap"]["prediction"]["p95"],
                ],
                "wall_min": (time.perf_counter() - t0) / 60,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
