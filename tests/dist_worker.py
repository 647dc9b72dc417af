"""Training jobs for tests/test_distributed.py, run in-process or under `torchrun`.

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py JOBS.json

JOBS.json is a list of jobs ``{"run_dir", "tokens_dir", "overrides", "resume", "kill",
"hang", "logits"}`` run one after another in the same process group. ``kill = {"rank": R,
"step": S}`` makes rank R die by SIGKILL when it asks for the first batch of step S (a crash,
as an out-of-memory kill would be), once: a marker file in the run folder keeps the
workers that torchrun restarts (``--max-restarts``) alive; with ``resume = "auto"`` they
continue from the newest checkpoint. (Not TORCHELASTIC_RESTART_COUNT: each agent counts
its own restarts, and an agent restarted by another node's failure counts none.)
``hang = {"rank": R, "step": S}`` makes rank R stop taking part (sleep) there.
``logits = PATH`` saves the trained model's logits on `fixed_tokens` there (rank 0).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.config import Config, load_config
from lmforge.model.transformer import Transformer
from lmforge.shards import TokenLoader, split_info
from lmforge.train.dist import dist_info, init_distributed
from lmforge.train.loop import Trainer

# Two CPU processes on a shared machine: 32 tokens of context, 8 sequences per step.
BASE_OVERRIDES = [
    "model.context_length=32",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=4",
    "train.max_steps=20",
    "train.tokens_per_step=256",
    "train.micro_batch_size=2",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=10",
    "train.keep_last=5",
    "train.peak_flops=1e11",
    "train.device=cpu",
    "train.threads=1",
    "train.dist_timeout_s=60",
]


class DieAt:
    """A batch source that kills its own process at (rank, step): a crashed worker.

    With `once` (a file), only if that file does not exist yet; it is created first."""

    def __init__(self, inner: TokenLoader, rank: int, step: int, once: Path | None = None):
        self.inner, self.rank, self.step, self.once = inner, rank, step, once

    def batch(self, step, micro, micro_batch_size, accum_steps, rank, world_size):
        if rank == self.rank and step == self.step:
            if self.once is not None:
                if self.once.exists():
                    return self.inner.batch(
                        step, micro, micro_batch_size, accum_steps, rank, world_size
                    )
                self.once.touch()
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.batch(step, micro, micro_batch_size, accum_steps, rank, world_size)


class HangAt(DieAt):
    """A batch source whose process stops taking part at (rank, step): a hung worker."""

    def batch(self, step, micro, micro_batch_size, accum_steps, rank, world_size):
        if rank == self.rank and step == self.step:
            print(f"rank {rank} hangs at step {step}", flush=True)
            time.sleep(3600)
        return self.inner.batch(step, micro, micro_batch_size, accum_steps, rank, world_size)


def job_config(job: dict[str, Any]) -> Config:
    vocab = split_info(job["tokens_dir"], "train").vocab_size
    overrides = [
        *BASE_OVERRIDES,
        f"model.vocab_size={vocab}",
        f"output.dir={job['run_dir']}",
        *job.get("overrides", []),
    ]
    return load_config(None, overrides)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    cfg = job_config(job)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    data: Any = TokenLoader(job["tokens_dir"], "train", cfg.model.context_length, cfg.train.seed)
    if job.get("kill"):
        once = Path(job["run_dir"]) / "killed-once" if job["kill"].get("once") else None
        data = DieAt(data, job["kill"]["rank"], job["kill"]["step"], once)
    if job.get("hang"):
        data = HangAt(data, job["hang"]["rank"], job["hang"]["step"])
    trainer = Trainer(cfg, model, job["run_dir"], data)
    result = trainer.fit(resume=job.get("resume", ""))
    if job.get("logits"):  # the trained (possibly parallel) model's logits on fixed tokens
        trainer.train_model.eval()
        with torch.no_grad():
            logits = trainer.train_model(fixed_tokens(cfg))
        if dist_info().is_main:
            torch.save(logits, job["logits"])
    return result


def fixed_tokens(cfg: Config) -> torch.Tensor:
    """Two rows of token ids that do not depend on the run (for comparing logits)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.model.vocab_size, (2, cfg.model.context_length), generator=gen)


def losses(run_dir: str | Path) -> dict[int, float]:
    """Training loss per step from a run's metrics.jsonl (log_every = 1)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def make_tokens(out_dir: Path, text: str) -> Path:
    """Character-level train/val token shards of `text` (split by document tail)."""
    from lmforge.data.document import Document
    from lmforge.shards import tokenize_documents
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer([text], "char", 0)
    docs = [Document(id=f"part{i}", text=text[i::4]) for i in range(4)]
    tokenize_documents(docs, tok, out_dir, val_fraction=0.1, split="tail")
    return out_dir


def main() -> None:
    torch.set_num_threads(1)
    jobs = json.loads(Path(sys.argv[1]).read_text())
    init_distributed(torch.device("cpu"), timeout_s=job_config(jobs[0]).train.dist_timeout_s)
    for job in jobs:
        run_job(job)
    if dist_info().world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
