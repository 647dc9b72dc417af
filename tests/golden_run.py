"""The 100-step golden loss curve: baby GPT, char-level tinyshakespeare, 1 thread, fp32.

Regenerate (only when a change is *meant* to alter numerics, and say so in the commit):
    python tests/golden_run.py --write
How far overrides move the curve (the measurements behind test_golden.py's tolerances):
    python tests/golden_run.py model.init_std=0.0200002
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
GOLDEN = Path(__file__).parent / "golden" / "shakespeare_char_100.json"


def run_golden(tmp: Path, dtype: str = "fp32", overrides: tuple[str, ...] = ()) -> dict:
    from lmforge.config import load_config
    from lmforge.paths import shared_data
    from lmforge.pretrain import pretrain

    torch.set_num_threads(1)
    cfg = load_config(
        "shakespeare-char",
        [
            f"data.sources=[{shared_data() / 'tinyshakespeare' / 'input.txt'}]",
            "train.max_steps=100",
            f"train.dtype={dtype}",  # the recipe says auto (bf16 on AMX CPUs); the golden is fp32
            "train.warmup_steps=10",
            "train.log_every=10",
            "train.eval_every=100",
            "train.eval_tokens=6400",
            "train.checkpoint_every=100",
            "train.peak_flops=1e11",
            f"output.dir={tmp / 'run'}",
            *overrides,
        ],
    )
    pretrain(cfg)
    curve, val = {}, None
    for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            curve[str(rec["step"])] = rec["loss"]
        if "val_loss" in rec:
            val = rec["val_loss"]
    return {"train_loss": curve, "val_loss": val, "torch": torch.__version__}


if __name__ == "__main__":
    overrides = tuple(a for a in sys.argv[1:] if "=" in a)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_golden(Path(tmp), overrides=overrides)
    print(json.dumps(result, indent=1))
    if overrides:
        golden = json.loads(GOLDEN.read_text())
        shifts = [abs(result["train_loss"][s] - v) for s, v in golden["train_loss"].items()]
        print(f"curve moved by {min(shifts):.2e} to {max(shifts):.2e} nats per logged step")
    elif "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(result, indent=1) + "\n")
