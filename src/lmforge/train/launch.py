"""CPU training with several single-threaded processes instead of one multi-threaded one.

On a CPU, a small model's step is a long chain of small ops; with N intra-op
threads each op ends in a barrier where N threads wait for the slowest one, and
on a shared machine a descheduled thread stalls all of them. Data parallelism
across processes (DDP over gloo, one thread each) has one synchronisation per
step, the gradient all-reduce. Measured on the baby GPT (benchmarks/LOG.md): 2
processes of 1 thread ran 1.7–1.9× faster than 1 process of 2 threads while
other jobs loaded the machine, but 1.5× slower on a quiet machine (52 against
≈ 35 ms per step: the all-reduce and DDP's hooks cost more than the barriers).
So it is an option for shared machines, not a default.

`lmforge pretrain` with `train.cpu_processes` ≠ 1 on a CPU re-runs itself under
`torch.distributed.run` with N processes, each taking micro_batch_size / N rows
of every micro-batch, so the global batch, the data order and the optimiser are
those of the one-process run (gradients are averaged over the same tokens).
"""

from __future__ import annotations

import os
import subprocess
import sys

from lmforge.config import Config
from lmforge.hardware import pick_device


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_process_count(cfg: Config) -> int:
    """How many processes `lmforge pretrain` should start for `cfg` (1 = train in this one)."""
    t = cfg.train
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:  # already a torchrun worker
        return 1
    if pick_device(t.device).type != "cpu":
        return 1
    n = t.cpu_processes or usable_cores()
    if n <= 1 or t.micro_batch_size % n:
        return 1  # a micro-batch that does not split evenly trains in one process
    return n


def relaunch_command(n: int, argv: list[str], cfg: Config) -> list[str]:
    """The torchrun command line that runs `lmforge ARGV` in `n` CPU processes."""
    t = cfg.train
    # train.threads is the whole run's budget here, shared by the processes.
    threads = max(1, (t.threads or usable_cores()) // n)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "lmforge",
        *argv,
        f"--train.micro_batch_size={t.micro_batch_size // n}",
        f"--train.threads={threads}",
        "--train.cpu_processes=1",
    ]


def relaunch(n: int, argv: list[str], cfg: Config) -> int:
    """Run `lmforge ARGV` under torchrun with `n` processes; return its exit status.

    Ctrl-C reaches the workers through torchrun (they checkpoint and stop); this
    process waits for them rather than leaving them behind.
    """
    cmd = relaunch_command(n, argv, cfg)
    threads = cmd[-2].split("=", 1)[1]
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    print(
        f"lmforge: training in {n} CPU processes of {threads} thread(s) each "
        f"(train.cpu_processes; set it to 1 for one process)",
        flush=True,
    )
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # torchrun got the signal too and is stopping the workers
