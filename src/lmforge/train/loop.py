"""The training loop shared by pre-training and fine-tuning.

One straight loop: for each optimizer step, accumulate gradients over the
micro-batches that make up `tokens_per_step`, skip the update if anything is
non-finite, clip, step, log, evaluate, checkpoint. Every quantity that decides
the numbers (learning rate, data, RNG) is a function of the step or is saved in
the checkpoint, so `resume="auto"` continues bit-for-bit on CPU.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmforge import __version__
from lmforge.config import Config, dump_yaml, to_dict
from lmforge.fileio import write_text_atomic
from lmforge.hardware import peak_flops, pick_device, resolve_dtype
from lmforge.model.transformer import flops_per_token
from lmforge.train.checkpoint import (
    CheckpointError,
    clean_stale_temporaries,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    require_state_keys,
    resolve_checkpoint,
    save_checkpoint,
    set_aside,
    unwrap,
)
from lmforge.train.dist import DistInfo, all_reduce_mean, all_reduce_sum, dist_info, print0
from lmforge.train.optim import Muon, muon_param_groups
from lmforge.train.parallel import (
    RankFailure,
    as_rank_failure,
    clip_grad_norm,
    full_state,
    grad_sync,
    parallelize,
)
from lmforge.train.progress import ProgressBar
from lmforge.train.schedule import lr_at
from lmforge.train.tensor_parallel import data_rank, optimizer_context

Batch = tuple[torch.Tensor, torch.Tensor]
EvalHook = Callable[[nn.Module, int], dict[str, float]]

# Told of every validation result as (run folder, step, metrics); one that returns True
# asks the loop to stop cleanly (checkpoint, then return `interrupted`). `lmforge sweep`
# prunes hopeless trials through this; nothing else registers one.
ValidationListener = Callable[[Path, int, dict[str, float]], bool]
VALIDATION_LISTENERS: list[ValidationListener] = []


class BatchSource(Protocol):
    """Where `Trainer` gets its micro-batches: ``batch(step, micro, micro_batch_size,
    accum_steps, rank, world_size)`` gives (inputs, targets). `lmforge.shards.SampleBatches`
    is the base of the project's sources."""

    @property
    def batch(self) -> Callable[..., Batch]: ...


@dataclass
class StepResult:
    """What one `Trainer.train_step` did."""

    loss: torch.Tensor  # mean over the step's micro-batches (and ranks), a 0-d tensor
    grad_norm: torch.Tensor  # before clipping
    lr: float
    finite: bool  # loss and gradient norm finite (otherwise the update was skipped)
    data_s: float  # seconds spent getting the step's batches


@dataclass
class _LogWindow:
    """What `Trainer.fit` gathers between two log lines."""

    t: float  # perf_counter() at the last log line (eval time added back)
    step: int  # the step of the last log line
    loss_sum: torch.Tensor  # summed loss of the finite steps since
    n_finite: int = 0  # steps since the last log line whose loss counts in its mean
    data_s: float = 0.0  # time spent getting batches since the last log line

    def add(self, result: StepResult) -> None:
        self.data_s += result.data_s
        if result.finite:
            self.loss_sum += result.loss
            self.n_finite += 1

    def restart(self, step: int) -> None:
        self.loss_sum.zero_()
        self.n_finite = 0
        self.data_s = 0.0
        self.t, self.step = time.perf_counter(), step


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights; no checkpoint holds them."""


class ResumeConfigError(ValueError):
    """The requested config cannot continue a checkpoint (another model shape or vocabulary)."""


# What a resume may change. Keys that decide the model's shape or vocabulary, or the
# optimizer's state layout, must match the checkpoint (else the restore cannot succeed).
# Budget and bookkeeping keys change freely. Any other changed key (learning rate, data,
# dtype, ...) is allowed with a note: the resumed run then differs from an uninterrupted one.
RESUME_REFUSED = ("model.", "tokenizer.kind", "tokenizer.vocab_size", "train.optimizer")
RESUME_FREE = (
    *(
        f"train.{k}"
        for k in [
            "max_steps",
            "max_time_s",
            "log_every",
            "eval_every",
            "eval_tokens",
            "checkpoint_every",
            "keep_last",
            "tensorboard",
            "threads",
            "cpu_processes",
            "dist_timeout_s",
            "checkpoint_format",
            "peak_flops",
            "max_bad_steps",
        ]
    ),
    "output.",
    "eval.",
    "bias.",
    "run.",
    "name",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def resume_config_changes(
    saved: dict[str, Any], requested: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """(refused, noted) differences between a checkpoint's config and the requested one,
    each as ``key: checkpoint A, requested B``."""
    old, new = _flat(saved), _flat(requested)
    refused: list[str] = []
    noted: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a == b or key.startswith(RESUME_FREE):
            continue
        line = f"{key}: checkpoint {a}, requested {b}"
        (refused if key.startswith(RESUME_REFUSED) else noted).append(line)
    return refused, noted


class MetricsLog:
    """Append-only `metrics.jsonl` (and TensorBoard when asked and installed)."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        self.tb: Any = None
        # Opened at the first record, not here: a refused resume leaves the run folder as it was.
        self._want_tb = enabled and tensorboard

    def _open_tensorboard(self) -> None:
        self._want_tb = False
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        except ImportError:
            print0("tensorboard is not installed; metrics go to metrics.jsonl only")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the resumed run will redo."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill or a full disk: its step is redone
            if record.get("step", 0) <= step:
                keep.append(line)
        # Replaced atomically: a kill here must not lose the records before `step`.
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._want_tb:
            self._open_tensorboard()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (weights, embeddings); never decay norms and biases (nanoGPT, GPT-3)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "muon":
        groups = muon_param_groups(
            model,
            lr=t.lr,
            weight_decay=t.weight_decay,
            muon_lr=t.muon_lr,
            muon_momentum=t.muon_momentum,
            muon_weight_decay=t.muon_weight_decay,
            betas=(t.beta1, t.beta2),
            eps=t.eps,
        )
        return Muon(groups)
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay),
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
        # The fused kernel is one pass over all parameters; it exists on CPU and CUDA.
        fused=True,
    )


class _Bf16Compute:
    """A bf16 copy of a model for `train.dtype = bf16-pure` (Micikevicius et al. 2018's
    fp32 master weights; Megatron-LM's bf16 mode).

    Forward and backward run on bf16 weights and activations with no autocast casts
    (≈ 13% faster per step than autocast on the baby GPT on an AMX CPU). Gradients
    accumulate in fp32 buffers across micro-batches (under DDP, in bf16 until the last
    micro-batch's all-reduce) and become the master weights' gradients; the optimizer
    updates the fp32 masters, and `publish` rounds them into the bf16 copy.
    Checkpoints hold the masters, so resuming is exact.
    """

    def __init__(self, master: nn.Module):
        import copy

        self.model = copy.deepcopy(master).to(torch.bfloat16)
        named = dict(master.named_parameters())
        pairs = [(named[n], p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.masters: list[torch.Tensor] = [m for m, _ in pairs]
        self.params: list[torch.Tensor] = [p for _, p in pairs]
        # fp32 accumulators: views into one flat buffer, so that clipping is one norm
        # and one multiply rather than one of each per tensor (≈ 1% of a baby-GPT step).
        sizes = [m.numel() for m in self.masters]
        device = self.masters[0].device if self.masters else None
        self.flat_grad = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        self.grads = [
            g.view_as(m) for g, m in zip(self.flat_grad.split(sizes), self.masters, strict=True)
        ]
        self.has_grad = [False] * len(self.params)

    def collect(self, first: bool) -> None:
        """Add this micro-batch's bf16 gradients into the fp32 buffers (copy on the first)."""
        if first:
            self.has_grad = [False] * len(self.params)
            for i, p in enumerate(self.params):
                if p.grad is None:  # keep `clip`'s flat norm free of last step's values
                    self.grads[i].zero_()
        copy_i = [
            i for i, p in enumerate(self.params) if p.grad is not None and not self.has_grad[i]
        ]
        add_i = [i for i, p in enumerate(self.params) if p.grad is not None and self.has_grad[i]]
        for idx, op in ((copy_i, torch._foreach_copy_), (add_i, torch._foreach_add_)):
            if idx:
                op([self.grads[i] for i in idx], [self.params[i].grad for i in idx])  # type: ignore[misc]
        for i in copy_i:
            self.has_grad[i] = True
        for p in self.params:
            p.grad = None

    def attach(self) -> None:
        """Give the master weights their accumulated fp32 gradients."""
        for m, buf, has in zip(self.masters, self.grads, self.has_grad, strict=True):
            m.grad = buf if has else None

    def clip(self, max_norm: float) -> torch.Tensor:
        """`clip_grad_norm_` on the accumulated gradients: their total norm, and the
        gradients scaled by min(1, max_norm / (norm + 1e-6)), as torch computes it."""
        norm = torch.linalg.vector_norm(self.flat_grad)
        if max_norm < math.inf:
            self.flat_grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    @torch.no_grad()
    def publish(self) -> None:
        """Round the master weights into the bf16 copy (after each optimizer step)."""
        torch._foreach_copy_(self.params, self.masters)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Trainer:
    """Runs `cfg.train` on `model` with batches from `train_data`.

    `val_data` returns a fresh iterable of validation batches; `tokens_per_byte`
    turns validation loss into bits per byte; `eval_hooks` add in-loop metrics.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        run_dir: str | Path,
        train_data: BatchSource,
        val_data: Callable[[], Iterable[Batch]] | None = None,
        tokens_per_byte: float | None = None,
        eval_hooks: list[EvalHook] | None = None,
        extra_state: dict[str, Any] | None = None,
        extra_files: dict[str, bytes] | None = None,
        log: Callable[[str], None] = print0,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist: DistInfo = dist_info()
        self.device = pick_device(cfg.train.device)
        # "auto" becomes bf16 or fp32 here, and the run's config.yaml records which.
        cfg.train.dtype = resolve_dtype(cfg.train.dtype, self.device)  # type: ignore[assignment]
        self.model = model.to(self.device)
        self.train_data = train_data
        self.val_data = val_data
        self.tokens_per_byte = tokens_per_byte
        self.eval_hooks = eval_hooks or []
        self.extra_state = extra_state or {}
        self.extra_files = extra_files or {}
        self.log = log
        t, m = cfg.train, cfg.model
        # Ranks of one tensor-parallel group read the same batches (`data_rank`).
        self.data_rank, self.data_world = data_rank(cfg, self.dist)
        micro_tokens = t.micro_batch_size * m.context_length * self.data_world
        if t.tokens_per_step % micro_tokens:
            raise ValueError(
                f"train.tokens_per_step = {t.tokens_per_step} is not a multiple of "
                f"micro_batch_size × context_length × world_size = {micro_tokens}"
            )
        self.accum_steps = t.tokens_per_step // micro_tokens
        # bf16-pure: a bf16 copy of the model computes forward and backward; `self.model`
        # keeps the fp32 master weights that the optimizer updates and checkpoints hold.
        self.compute: _Bf16Compute | None = None
        compute_model = self.model
        if t.dtype == "bf16-pure":
            if t.parallel == "fsdp":
                raise ValueError(
                    "train.dtype = bf16-pure does not combine with train.parallel = fsdp "
                    "(FSDP has its own bf16 policy): use train.dtype = bf16"
                )
            self.compute = _Bf16Compute(self.model)
            compute_model = self.compute.model
        # Parallelize first: FSDP replaces the parameters with shards the optimizer must hold.
        self.train_model = parallelize(compute_model, cfg, self.device, self.dist)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if t.dtype == "bf16"
            else nullcontext()
        )
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.dist.is_main, t.tensorboard)
        self.flops_per_token = flops_per_token(unwrap(model).cfg, m.context_length)  # type: ignore[arg-type]
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0
        self.consecutive_bad = 0
        self.spike_steps = 0  # updates skipped by train.spike_policy
        self.loss_ema: float | None = None  # running mean of accepted losses (spike guard)
        self.loss_seen = 0
        self._last_update = 0  # the last step whose update reached the weights (from 1)
        self.elapsed_before = 0.0
        self._stop_signal: str | None = None
        # what clipping reads (after `parallelize`, whose FSDP replaces the parameters)
        self._clip_params = [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "bad_steps": self.bad_steps,
            "consecutive_bad": self.consecutive_bad,
            "spike_steps": self.spike_steps,
            "loss_ema": self.loss_ema,
            "loss_seen": self.loss_seen,
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self._t0),
            "data": {"next_step": self.step, "seed": self.cfg.train.seed},
            "config": to_dict(self.cfg),
            "code_version": __version__,
            **self.extra_state,
        }

    def save(self) -> Path | None:
        if not self.weights_finite():  # never let a checkpoint hold them
            raise TrainingDiverged(
                self._diverged(f"after step {self.step} the weights are non-finite", broken=True)
            )
        path = None
        if self.cfg.train.checkpoint_format == "sharded":  # every rank writes its shards
            from lmforge.train.sharded import save_sharded

            t = self.cfg.train
            state = self.state()
            return save_sharded(
                self.run_dir,
                self.step,
                self.model,
                self.optimizer,
                state,
                t.keep_last,
                self.extra_files,
            )
        # Under FSDP every rank takes part in gathering the full state to rank 0.
        model_state, optim_state = full_state(self.model, self.optimizer)
        if self.dist.is_main:
            path = save_checkpoint(
                self.run_dir,
                self.step,
                model_state,
                optim_state,
                self.state(),
                self.cfg.train.keep_last,
                self.extra_files,
            )
        from lmforge.train.dist import barrier

        barrier()
        return path

    def _check_resume_config(self, path: Path, state: dict[str, Any]) -> None:
        require_state_keys(state, path)
        if not isinstance(state.get("config"), dict):
            return  # written without a config: the weights' shapes are still checked
        refused, noted = resume_config_changes(state["config"], to_dict(self.cfg))
        if refused:
            raise ResumeConfigError(
                f"{path}: cannot resume with another model shape or vocabulary: "
                + "; ".join(refused)
                + ". Drop those overrides to continue this run, or train into a new output.dir; "
                "nothing was written"
            )
        if noted:
            self.log(
                "resuming with changed settings (the run will differ from an uninterrupted "
                "one): " + "; ".join(noted)
            )

    def _candidates(self, resume: str) -> list[Path]:
        """Checkpoints to try, newest first; refuses to train over an earlier run's ones."""
        if resume == "auto":
            return list(reversed(list_checkpoints(self.run_dir)))
        if resume:
            return [resolve_checkpoint(resume)]
        existing = list_checkpoints(self.run_dir)
        if existing:
            raise CheckpointError(
                f"{self.run_dir / 'checkpoints'}: holds checkpoints of an earlier run (newest "
                f"{existing[-1].name}); continue it with --resume auto, or train into a new "
                "output.dir"
            )
        return []

    def restore(self, resume: str) -> None:
        """Load the checkpoint `resume` names ('auto': the newest that loads, falling back
        to older ones). With checkpoints present and none loadable, or a config that cannot
        continue them, nothing is written and the error says why."""
        candidates = self._candidates(resume)
        if not candidates:
            if resume:
                self.log("no checkpoint to resume from; starting from step 0")
            return
        failed: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                state = load_checkpoint(
                    path,
                    self.model,
                    self.optimizer,
                    check=lambda st, p=path: self._check_resume_config(p, st),
                    log=self.log,
                )
                break
            except CheckpointError as exc:
                if resume != "auto":
                    raise
                self.log(f"skipping checkpoint: {exc}")
                failed.append((path, str(exc)))
        else:
            why = "; ".join(f"{p.name}: {msg.replace(str(p) + '/', '')}" for p, msg in failed)
            raise CheckpointError(
                f"--resume auto: no checkpoint in {self.run_dir / 'checkpoints'} loads ({why}); "
                "nothing was written or deleted. Repair or move them away, or resume from "
                "another checkpoint with --resume PATH"
            )
        if failed and self.dist.is_main:  # out of the way of this run's new checkpoints
            for bad, _msg in failed:
                self.log(f"moved the checkpoint that did not load to {set_aside(bad)}")
        if self.compute is not None:
            self.compute.publish()
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.bad_steps = int(state["bad_steps"])
        self.consecutive_bad = int(state["consecutive_bad"])
        self.spike_steps = int(state.get("spike_steps", 0))
        self.loss_ema = state.get("loss_ema")
        self.loss_seen = int(state.get("loss_seen", 0))
        self.elapsed_before = float(state["elapsed_s"])
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.val_data is None:
            return self._hook_metrics({})  # in-loop hooks run with or without validation data
        model = self.train_model
        model.eval()
        # Sum and count across ranks: the validation batches may be split between ranks
        # (pretrain does), or each rank may see all of them; the mean is right either way.
        sums = torch.zeros(2, device=self.device)  # loss sum, batch count
        for x, y in self.val_data():
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast:
                loss = model(x, y)
            sums[0] += loss.float()
            sums[1] += 1
        model.train()
        total, count = all_reduce_sum(sums).tolist()
        val_loss = total / max(count, 1.0)
        out = {"val_loss": val_loss}
        if self.tokens_per_byte:
            out["val_bpb"] = val_loss / math.log(2) * self.tokens_per_byte
        return self._hook_metrics(out)

    def _hook_metrics(self, out: dict[str, float]) -> dict[str, float]:
        for hook in self.eval_hooks:
            out.update(hook(self.model, self.step))
        return out

    # ------------------------------------------------------------------ loop

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signal.Signals(signum).name

    def _is_spike(self, loss: float) -> bool:
        """Whether `loss` is a spike (train.spike_policy); if not, fold it into the running mean."""
        t = self.cfg.train
        if (
            self.loss_ema is not None
            and self.loss_seen >= t.spike_warmup
            and loss > t.spike_factor * self.loss_ema
        ):
            return True
        # EMA over roughly the last 10 accepted steps: it trails a falling loss from above,
        # so ordinary progress never looks like a spike.
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        self.loss_seen += 1
        return False

    def train_step(self) -> StepResult:
        """One optimizer step: its micro-batches forward and backward, clipping, and the
        update (skipped, and counted, for a non-finite loss or gradient, or a loss spike).
        Advances `self.step`; raises `TrainingDiverged` after `train.max_bad_steps`
        skipped updates in a row.

        `fit` calls it between its logs, evaluations and checkpoints; a benchmark may
        call it alone, after `self.train_model.train()`.
        """
        t, opt = self.cfg.train, self.optimizer
        lr = lr_at(self.step, t)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        step_loss, data_s = self._accumulate()
        grad_norm = self._clip()
        step_loss = all_reduce_mean(step_loss)
        finite = bool(torch.isfinite(step_loss)) and bool(torch.isfinite(grad_norm))
        spike = finite and t.spike_policy == "skip" and self._is_spike(step_loss.item())
        n = self.step + 1  # steps are counted from 1, as in metrics.jsonl and checkpoint names
        self._update_or_skip(n, step_loss, grad_norm, finite, spike)
        opt.zero_grad(set_to_none=True)
        if self.compute is not None:
            self.compute.publish()
        self.step += 1
        self.tokens_seen += t.tokens_per_step
        self._check_bad_streak(n)
        return StepResult(step_loss, grad_norm, lr, finite, data_s)

    def _accumulate(self) -> tuple[torch.Tensor, float]:
        """Forward and backward over the step's micro-batches: (summed loss, data seconds)."""
        t, model = self.cfg.train, self.train_model
        step_loss = torch.zeros((), device=self.device)
        data_s = 0.0
        for micro in range(self.accum_steps):
            t_data = time.perf_counter()
            x, y = self.train_data.batch(
                self.step,
                micro,
                t.micro_batch_size,
                self.accum_steps,
                self.data_rank,
                self.data_world,
            )
            x, y = (
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
            )
            data_s += time.perf_counter() - t_data
            sync = micro == self.accum_steps - 1
            # A fresh context each time: DDP's no_sync() cannot be entered twice.
            with grad_sync(model, sync), self.autocast:
                loss = model(x, y)
                if self.accum_steps > 1:  # (a division by 1 is an op each way)
                    loss = loss / self.accum_steps
            with grad_sync(model, sync):
                loss.backward()
            # Under DDP the bf16 gradients stay in place until the last micro-batch,
            # whose backward all-reduces them; alone, each micro-batch's go to fp32.
            if self.compute is not None and (sync or self.dist.world_size == 1):
                self.compute.collect(first=micro == 0 or self.dist.world_size > 1)
            step_loss += loss.detach()
        return step_loss, data_s

    def _clip(self) -> torch.Tensor:
        """Clip the accumulated gradients to train.grad_clip; their norm before clipping."""
        t = self.cfg.train
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        if self.compute is not None:
            self.compute.attach()
            return self.compute.clip(max_norm)
        return clip_grad_norm(self._clip_params, max_norm)

    def _update_or_skip(
        self, n: int, step_loss: torch.Tensor, grad_norm: torch.Tensor, finite: bool, spike: bool
    ) -> None:
        """Step the optimizer, or count and report the skipped update of step `n`."""
        t = self.cfg.train
        if finite and not spike:
            with optimizer_context(self.model):
                self.optimizer.step()
            self.consecutive_bad = 0
            self._last_update = n
        elif spike:
            self.spike_steps += 1
            self.consecutive_bad += 1
            self.log(
                f"step {n}: loss {step_loss.item():.4f} > train.spike_factor "
                f"{t.spike_factor} × running mean {self.loss_ema:.4f}; update skipped"
            )
        else:
            # A non-finite loss or gradient never reaches the weights or the moments.
            self.bad_steps += 1
            self.consecutive_bad += 1
            what = f"loss {step_loss.item()}, gradient norm {grad_norm.item()}"
            self.log(f"step {n}: non-finite {what}; update skipped")
            if not self.weights_finite():  # no skipped update can bring them back
                raise TrainingDiverged(self._diverged(f"step {n} ({what})", broken=True))

    def _check_bad_streak(self, n: int) -> None:
        """Raise `TrainingDiverged` once train.max_bad_steps updates in a row were skipped."""
        t = self.cfg.train
        if self.consecutive_bad >= t.max_bad_steps:
            kinds = " or loss spikes" if self.spike_steps else ""
            raise TrainingDiverged(
                self._diverged(
                    f"{self.consecutive_bad} consecutive steps with a non-finite loss or "
                    f"gradient{kinds}, steps {n - self.consecutive_bad + 1}-{n} "
                    f"(train.max_bad_steps = {t.max_bad_steps}); the weights are finite and "
                    "none of these steps updated them",
                    broken=False,
                )
            )

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every weight is finite (on every rank: collective under DDP/FSDP)."""
        bad = torch.zeros((), device=self.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP shard
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad += 1
        return all_reduce_sum(bad).item() == 0

    def _diverged(self, what: str, broken: bool) -> str:
        """The stop message: what went wrong, the probable cause, what is on disk."""
        t = self.cfg.train
        # settings that enter the forward pass or the update; budgets and factors may be inf
        update_keys = "lr min_lr_ratio weight_decay beta1 beta2 eps grad_clip muon_lr muon_momentum"
        suspects = [
            f"{section}.{k} = {v}"
            for section, values in (("model", vars(self.cfg.model)), ("train", vars(t)))
            for k, v in values.items()
            if isinstance(v, float)
            and not math.isfinite(v)
            and (section == "model" or k in (*update_keys.split(), "muon_weight_decay"))
        ]
        if broken:
            last = self._last_update
            what += (
                f"; the weights are non-finite since the update of step {last}"
                if last
                else "; the weights were non-finite before the first update"
            )
        if suspects:
            cause = f"{', '.join(suspects)} is not a finite number: set a finite value"
        elif broken:
            cause = f"the updates diverged: lower train.lr (now {t.lr}) or set train.grad_clip"
        else:
            cause = f"check the data, or lower train.lr (now {t.lr})"
        good = latest_checkpoint(self.run_dir, log=lambda _m: None) if self.dist.is_main else None
        on_disk = (
            f"the newest checkpoint, {good}, holds finite weights: resume from it with "
            "--resume auto after the change"
            if good is not None
            else "no checkpoint was written: start again after the change"
        )
        return f"training stopped: {what}. Probable cause: {cause}; {on_disk}"

    def fit(self, resume: str = "") -> dict[str, Any]:
        t = self.cfg.train
        self._t0 = time.perf_counter()
        if not self._prepare_run(resume):
            self.log(f"already trained to step {self.step}; nothing to do")
            return {"step": self.step, "tokens": self.tokens_seen, **self.evaluate()}

        peak = t.peak_flops or peak_flops(self.device, "bf16" if "bf16" in t.dtype else t.dtype)
        old_handlers = self._catch_signals()
        self.train_model.train()
        # Only touched when asked for: torch refuses to read the legacy setting once a
        # program has used the per-backend API (torch.backends.*.fp32_precision).
        old_precision = None
        if t.matmul_precision != "highest":
            old_precision = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(t.matmul_precision)
        window = _LogWindow(time.perf_counter(), self.step, torch.zeros((), device=self.device))
        summary: dict[str, Any] = {}
        eval_metrics: dict[str, float] = {}
        bar = ProgressBar(t.max_steps, self.step, self.dist.is_main)
        try:
            while self.step < t.max_steps:
                result = self.train_step()
                bar.update(self.step)
                window.add(result)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    summary.update(self._log_line(window, result, peak, bar))
                if self.step % t.eval_every == 0 or self.step == t.max_steps:
                    t_eval = time.perf_counter()
                    eval_metrics = self._scheduled_eval()
                    window.t += time.perf_counter() - t_eval  # keep eval out of tokens/s
                stop, eval_metrics = self._stop_check(eval_metrics)
                if self.step % t.checkpoint_every == 0 or self.step == t.max_steps or stop:
                    self.save()
                if stop:
                    self._log_stop()
                    break
        except RuntimeError as exc:
            failure = self._rank_failure(exc)
            if failure is None:
                raise
            raise failure from exc
        finally:
            if old_precision is not None:
                torch.set_float32_matmul_precision(old_precision)
            bar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            sys.stdout.flush()

        summary.update(
            step=self.step,
            tokens=self.tokens_seen,
            bad_steps=self.bad_steps,
            elapsed_s=self.elapsed_before + time.perf_counter() - self._t0,
            peak_flops=peak,
            interrupted=bool(self._stop_signal),
            **eval_metrics,
        )
        return summary

    def _prepare_run(self, resume: str) -> bool:
        """Restore, then (only then) tidy the run folder and write its config.yaml; False
        when the run is already trained to train.max_steps."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.restore(resume)
        # Only now, with the restore done, does anything in the run folder change.
        if self.dist.is_main:
            for name in clean_stale_temporaries(self.run_dir):
                self.log(f"removed {name}, left in checkpoints/ by a writer that died")
            write_text_atomic(self.run_dir / "config.yaml", dump_yaml(self.cfg))
        return self.step < self.cfg.train.max_steps

    def _catch_signals(self) -> dict[Any, Any]:
        """Turn SIGTERM and SIGINT into a clean stop (main thread only); the old handlers."""
        import threading

        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        return old_handlers

    def _log_line(
        self, window: _LogWindow, result: StepResult, peak: float, bar: ProgressBar
    ) -> dict[str, Any]:
        """Write the metrics record and log line of the steps since the last one; start a
        new window. Returns the summary's loss, tokens/s and MFU."""
        t = self.cfg.train
        now = time.perf_counter()
        n = self.step - window.step
        dt = now - window.t
        tok_s = n * t.tokens_per_step / max(dt, 1e-9)
        mfu = tok_s * self.flops_per_token / peak if peak else 0.0
        # over the steps whose loss was finite; none finite: null, not a made-up 0
        mean_loss = window.loss_sum.item() / window.n_finite if window.n_finite else None
        elapsed = self.elapsed_before + now - self._t0
        eta = (t.max_steps - self.step) * dt / max(n, 1)
        lr = result.lr
        record = {
            "step": self.step,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": result.grad_norm.item(),
            "tokens": self.tokens_seen,
            "tokens_per_s": tok_s,
            "mfu": mfu,
            "elapsed_s": elapsed,
            "bad_steps": self.bad_steps,
            # the loader's share of step time (batches, and copies to the device)
            "data_ms": 1000 * window.data_s / max(n, 1),
            "data_frac": window.data_s / max(dt, 1e-9),
        }
        if t.spike_policy != "none":
            record["spike_steps"] = self.spike_steps
        self.metrics.write(record)
        self.log(
            f"step {self.step:>6}/{t.max_steps} | loss {_fmt(mean_loss, '.4f')} | lr {lr:.2e} | "
            f"{tok_s / 1000:.1f}k tok/s | MFU {100 * mfu:.1f}% | "
            f"ETA {format_duration(eta)}"
        )
        bar.update(
            self.step,
            f"loss {_fmt(mean_loss, '.3f')} | {tok_s / 1000:.1f}k tok/s | MFU {100 * mfu:.0f}%",
        )
        window.restart(self.step)
        return {"loss": mean_loss, "tokens_per_s": tok_s, "mfu": mfu}

    def _scheduled_eval(self) -> dict[str, float]:
        """Evaluate, record and log; a validation listener may ask the loop to stop."""
        eval_metrics = self.evaluate()
        if eval_metrics:
            self.metrics.write({"step": self.step, **eval_metrics})
            self.log(
                f"eval @ {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
            )
            if any([f(self.run_dir, self.step, eval_metrics) for f in VALIDATION_LISTENERS]):
                self._stop_signal = "stop asked by a validation listener"
        return eval_metrics

    def _stop_check(self, eval_metrics: dict[str, float]) -> tuple[bool, dict[str, float]]:
        """Whether to stop after this step (a signal, a listener, or out of time: the same
        answer on every rank), and the evaluation the summary reports."""
        t = self.cfg.train
        # The budget is per invocation: a resumed run gets a fresh one.
        out_of_time = t.max_time_s and (time.perf_counter() - self._t0) >= t.max_time_s
        stop = bool(out_of_time or self._stop_signal)
        if self.dist.world_size > 1:  # every rank stops at the same step
            stop_flag = torch.tensor(float(stop), device=self.device)
            stop = all_reduce_mean(stop_flag).item() > 0
        if stop and not self._stop_signal and self.step % t.eval_every:
            # Out of time: evaluate the model being left behind, so the summary
            # describes it (not the last scheduled evaluation).
            eval_metrics = self.evaluate()
            if eval_metrics:
                self.metrics.write({"step": self.step, **eval_metrics})
        return stop, eval_metrics

    def _log_stop(self) -> None:
        t = self.cfg.train
        why = (
            f"signal {self._stop_signal}"
            if self._stop_signal
            else f"time budget {t.max_time_s:.0f}s"
        )
        self.log(
            f"stopped at step {self.step} ({why}); checkpoint saved, resume with --resume auto"
        )

    def _rank_failure(self, exc: RuntimeError) -> RankFailure | None:
        """A failed peer rank as one reported error; None for any other RuntimeError."""
        failure = as_rank_failure(exc, self.run_dir)
        if failure is None:
            return None
        # Said here, while this loop's signal handler is still in place: the launcher
        # ends the surviving ranks with SIGTERM as soon as it sees a dead one, and once
        # `finally` restores the default handler that signal would end this process
        # before the exception reached anyone who prints it.
        print(f"lmforge: error: {failure}", file=sys.stderr, flush=True)
        failure.reported = True
        return failure
