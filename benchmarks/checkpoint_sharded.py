"""Checkpoint save: gathered to rank 0 (`full`) against every rank its shards (`sharded`).

Two CPU processes (gloo) hold one FSDP2-sharded model with AdamW state after a real
step and save it once. Each save runs in fresh processes, the formats alternating
(A B A B ...) so a drifting machine speed hits both, and a save's memory is not
hidden by pages an earlier save left to the allocator. Per save: the wall time
(barrier to barrier, what the training loop waits) and each rank's peak resident
memory above its resident memory just before the save (VmHWM after minus VmRSS
before, the peak reset through /proc/self/clear_refs).

    python benchmarks/checkpoint_sharded.py                      # ≈ 80M parameters, 3 pairs
    python benchmarks/checkpoint_sharded.py --d-model 512 --layers 4 --pairs 2

It starts itself under `torch.distributed.run --standalone --nproc_per_node 2`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as tdist

    from lmforge.config import load_config
    from lmforge.model.transformer import Transformer
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.dist import init_distributed
    from lmforge.train.parallel import full_state, shard_model
    from lmforge.train.sharded import save_sharded

    torch.set_num_threads(1)
    device = torch.device("cpu")
    info = init_distributed(device, timeout_s=1800)
    shape = [
        f"model.vocab_size={args.vocab}",
        f"model.n_layers={args.layers}",
        f"model.d_model={args.d_model}",
        f"model.n_heads={args.d_model // 64}",
        "model.context_length=64",
        "train.parallel=fsdp",
        "train.device=cpu",
    ]
    cfg = load_config(None, shape)
    torch.manual_seed(0)
    model = shard_model(Transformer(cfg.model), cfg, device)
    n_params = sum(p.numel() for p in model.parameters())  # DTensor numel: the global count
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, args.vocab, (1, 16))
    model(x, x).backward()
    optimizer.step()  # AdamW's state exists: 2 more tensors the size of the weights

    def gathered(run: Path, step: int) -> None:
        weights, optim = full_state(model, optimizer)
        if info.is_main:
            save_checkpoint(run, step, weights, optim, {"step": step}, keep_last=1)
        tdist.barrier()

    def sharded(run: Path, step: int) -> None:
        save_sharded(run, step, model, optimizer, {"step": step}, keep_last=1)

    save = gathered if args.format == "full" else sharded
    tdist.barrier()
    rss = _status_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    save(Path(args.out), 1)
    tdist.barrier()
    seconds = time.perf_counter() - t0
    peaks: list = [None] * info.world_size
    tdist.all_gather_object(peaks, (_status_kib("VmHWM") - rss) / 1024)
    if info.is_main:
        size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
        print(
            json.dumps({"params": n_params, "seconds": seconds, "peak_mib": peaks, "bytes": size})
        )
    tdist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--format", choices=["full", "sharded"], help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    rows: dict[str, list[dict]] = {"full": [], "sharded": []}
    for _ in range(args.pairs):
        for name in rows:
            out = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                __file__,
                "--worker",
                *sys.argv[1:],
                f"--format={name}",
                f"--out={out}",
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            result = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            shutil.rmtree(out, ignore_errors=True)
            rows[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"{rows['full'][0]['params'] / 1e6:.1f}M parameters, AdamW, 2 ranks (FSDP2, gloo)")
    print("| format | save s (median) | rank-0 peak MiB (median) | rank-1 peak MiB | on disk MiB |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        secs = statistics.median(r["seconds"] for r in runs)
        peak0 = statistics.median(r["peak_mib"][0] for r in runs)
        peak1 = statistics.median(r["peak_mib"][1] for r in runs)
        print(
            f"| {name} | {secs:.2f} | {peak0:.0f} | {peak1:.0f} | {runs[0]['bytes'] / 2**20:.0f} |"
        )
    print("all saves:", json.dumps(rows))


if __name__ == "__main__":
    main()
