"""One typed config tree for a whole run.

A run is described by nested dataclasses (``Config.data``, ``Config.tokenizer``,
``Config.model``, ``Config.train``, ``Config.eval``, ``Config.output``). Recipes are
YAML files with the same shape; the command line overrides any leaf with a dotted
key (``--train.lr=3e-4 --model.n_layers=6``). Everything is checked before any
work starts: unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the key and the file it came from.

Every numeric key declares its valid range next to its field (``num(default, ge=1)``);
one checker (:func:`check_ranges`) enforces them all, floats must also be finite, and
integers fit in 2**53 (exact in JSON and float arithmetic). The few rules that tie
several keys together are the small functions in ``CROSS_KEY_RULES``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import reprlib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from lmforge import components
from lmforge.presets import PRESETS

# A recipe is a few kB; these bounds keep a hostile or broken file (a YAML "billion
# laughs" alias bomb, a 10,000-deep nesting) from costing more than milliseconds.
MAX_RECIPE_BYTES = 1_000_000
MAX_YAML_NODES = 100_000  # values after expanding aliases
MAX_YAML_DEPTH = 64
MAX_EXTENDS = 32
MAX_INT = 2**53
MAX_MESSAGE_CHARS = 1000


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and where it came from.

    The message is always one line of bounded length, whatever was quoted into it.
    """

    def __init__(self, message: str):
        line = " ".join(str(message).split())
        if len(line) > MAX_MESSAGE_CHARS:
            line = line[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(line)


_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def quote(value: Any, limit: int = 80) -> str:
    """`value` as it should appear in a message: its repr, cut to about `limit` characters."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}…({len(value)} chars)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# ----------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: bounds (open or closed) and, for floats, finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        lo = self.ge if self.ge is not None else self.gt
        hi = self.le if self.le is not None else self.lt
        if lo is not None and hi is not None:
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            return f"in {left}{_num(lo)}, {_num(hi)}{right}"
        if lo is not None:
            return f"{'>=' if self.ge is not None else '>'} {_num(lo)}"
        if hi is not None:
            return f"{'<=' if self.le is not None else '<'} {_num(hi)}"
        return "any number"

    def problem(self, value: float) -> str:
        """Why `value` is outside the range ('' when it is inside)."""
        if isinstance(value, float) and not math.isfinite(value):
            return "is not a finite number"
        if isinstance(value, int) and abs(value) > MAX_INT:
            return "is too large in magnitude (integers are within ±2**53)"
        inside = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return "" if inside else "is out of range"


def _num(x: float) -> str:
    if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def num(
    default: float,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A numeric field with its valid range, e.g. ``n_layers: int = num(4, ge=1)``."""
    return field(default=default, metadata={"range": Range(ge, gt, le, lt)})


def range_of(f: dataclasses.Field) -> Range | None:
    """The declared range of a field (None for a field that is not numeric)."""
    return f.metadata.get("range")


def numeric_fields(cls: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every int/float leaf in the tree under `cls`."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{key}.")
        elif typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            yield from numeric_fields(args[0], f"{key}[].")
        elif tp in (int, float):
            yield key, f, tp


def component(kind: str, default: str) -> Any:
    """A field naming a component of `lmforge.components.REGISTRIES[kind]`."""
    return field(default=default, metadata={"registry": kind})


def _check_field(f: dataclasses.Field, value: Any, key: str, where: str) -> None:
    if "registry" in f.metadata:
        problem = components.REGISTRIES[f.metadata["registry"]].problem(value)
        if problem:
            raise ConfigError(f"{where}: {key}: {quote(value)} {problem}")
        return
    rng = range_of(f) or Range()  # a numeric key without a range must still be finite
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    problem = rng.problem(value)
    if problem:
        raise ConfigError(f"{where}: {key}: {quote(value)} {problem} (expected {rng.describe()})")


def check_ranges(obj: Any, where: str, prefix: str = "") -> None:
    """Check every declared range in the dataclass tree `obj` (the one place that does)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, where, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_ranges(item, where, f"{key}[{i}].")
        else:
            _check_field(f, value, key, where)


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the pre-training text comes from."""

    # "python-stdlib" (the running interpreter's standard library), or files/folders/globs
    # of text, or document shards (JSONL / JSONL.zst with a "text" field).
    sources: list[str] = field(default_factory=lambda: ["python-stdlib"])
    # Fraction of documents held out for validation (split by document id, deterministic).
    val_fraction: float = num(0.05, ge=0, lt=1)
    # "document": hold out whole documents (by id hash); "tail": the last val_fraction of
    # each document (nanoGPT's split of one file).
    split: Literal["document", "tail"] = "document"
    # Stop reading sources after this many bytes of text (0 = no limit).
    max_bytes: int = num(0, ge=0)
    # Prepared token shards to train on; when empty, `tokenize` writes them into the run folder.
    tokens_dir: str = ""


@dataclass
class TokenizerConfig:
    """Byte-level BPE (HF `tokenizers`) or a character vocabulary (for nanoGPT comparisons)."""

    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: int = num(4096, ge=1, le=2**32)
    # Use an existing tokenizer.json instead of training one.
    path: str = ""
    # Train the tokenizer on at most this many bytes of text (0 = all).
    train_bytes: int = num(20_000_000, ge=0)
    # An imported model's own chat template (Jinja, from its tokenizer_config.json) and
    # special tokens; fine-tuning renders conversations through it and export writes it
    # back. "" = lmforge's role-token template (<|user|>...<|end|>) and <|endoftext|>.
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""


@dataclass
class ModelConfig:
    """Shape and variant of the transformer; see `lmforge.model.transformer`."""

    # A named shape from `lmforge.presets`; explicit fields below still override it.
    preset: str = ""
    vocab_size: int = num(0, ge=0, le=2**32)  # 0 = take it from the tokenizer
    context_length: int = num(256, ge=1)
    n_layers: int = num(4, ge=1)
    d_model: int = num(256, ge=1)
    n_heads: int = num(4, ge=1)
    n_kv_heads: int = num(0, ge=0)  # 0 = n_heads (MHA); 1 = MQA; between = GQA
    # Size of one attention head; 0 = d_model / n_heads. Gemma 2 and Qwen3 set it apart
    # (q/k/v project to n_heads × head_dim, the output projection back to d_model).
    head_dim: int = num(0, ge=0)
    # 0 = derived: 4*d for GELU, 8/3*d rounded to a multiple of 64 for SwiGLU
    d_ff: int = num(0, ge=0)
    # Components by name from the registries of `lmforge.components`: the built-in ones
    # are listed in the annotations, and any registered variant is accepted.
    norm: Annotated[str, "layernorm | rmsnorm | registered"] = component("norm", "layernorm")
    position: Annotated[str, "learned | rope | registered"] = component("position", "learned")
    # gelu: the tanh approximation (GPT-2's gelu_new); gelu_exact: the erf form (nanoGPT's
    # nn.GELU(), HF "gelu"; ≈ 5× faster than the tanh form on CPUs in torch 2.13);
    # relu2: squared ReLU (So et al. 2021, "Primer"). All three are 4·C wide.
    mlp: Annotated[str, "gelu | gelu_exact | swiglu | relu2 | registered"] = component(
        "mlp", "gelu"
    )
    # softmax: scaled dot-product attention (with n_kv_heads, attn_scale, attn_softcap).
    attention: Annotated[str, "softmax | registered"] = component("attention", "softmax")
    qk_norm: bool = False
    tie_embeddings: bool = True
    bias: bool = False
    # Bias on the q/k/v projection only (Qwen2); `bias` puts one on every linear layer.
    qkv_bias: bool = False
    dropout: float = num(0.0, ge=0, lt=1)
    rope_theta: float = num(10000.0, gt=0)
    # RoPE frequency scaling for a context longer than the one trained first: "none", or
    # "llama3" (Llama 3.1+): wavelengths longer than rope_original_context /
    # rope_low_freq_factor are stretched by rope_factor, shorter than rope_original_context
    # / rope_high_freq_factor kept, and those between interpolated smoothly.
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_factor: float = num(8.0, ge=1)
    rope_low_freq_factor: float = num(1.0, gt=0)
    rope_high_freq_factor: float = num(4.0, gt=0)
    rope_original_context: int = num(8192, ge=1)
    norm_eps: float = num(1e-5, gt=0)
    objective: Literal["causal", "masked"] = "causal"
    init_std: float = num(0.02, gt=0)
    # Logit soft-capping, cap·tanh(logits/cap) (Gemma 2; modded-nanogpt); 0 = off.
    logit_softcap: float = num(0.0, ge=0)
    # Zero-initialise the residual output projections (attn.proj, mlp.down), so each block
    # starts as the identity (modded-nanogpt); False keeps GPT-2's scaled N(0, σ/√(2L)).
    zero_init_proj: bool = False
    # Where a block normalises: "pre" x + f(norm(x)) (GPT-2, Llama); "post" x + norm(f(x))
    # inside the residual branch (OLMo 2); "sandwich" x + norm(f(norm(x))) (Gemma 2).
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"
    # QK-norm over each head's D values ("head": Qwen3, Gemma 3) or over the whole q and
    # k projections, H·D and K·D values (OLMo 2).
    qk_norm_scope: Literal["head", "full"] = "head"
    # Activation of the gated MLP's gate (mlp=swiglu): silu (SwiGLU) or the tanh form of
    # GELU (GeGLU; Gemma).
    gate_act: Literal["silu", "gelu_tanh"] = "silu"
    # Multiply the token embeddings by sqrt(d_model) (Gemma).
    embed_scale: bool = False
    # Attention softmax scale; 0 = 1/sqrt(head dim). Gemma 2: query_pre_attn_scalar^-1/2.
    attn_scale: float = num(0.0, ge=0)
    # Attention-score soft-capping, cap·tanh(scores/cap) before the mask (Gemma 2); 0 = off.
    attn_softcap: float = num(0.0, ge=0)


@dataclass
class TrainConfig:
    """The optimisation loop shared by pre-training and fine-tuning."""

    max_steps: int = num(1000, ge=1)
    # Global tokens per optimizer step; gradient accumulation is derived from it.
    tokens_per_step: int = num(8192, ge=1)
    micro_batch_size: int = num(8, ge=1)
    lr: float = num(1e-3, gt=0)
    min_lr_ratio: float = num(0.1, ge=0, le=1)
    warmup_steps: int = num(50, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    # warmup-stable-decay: the last `decay_fraction` of steps decay linearly to min_lr.
    decay_fraction: float = num(0.2, gt=0, le=1)
    # muon: Muon (Jordan et al. 2024) on the blocks' weight matrices, AdamW (lr, betas,
    # weight_decay below) on embeddings, head, norms and biases; see lmforge.train.optim.
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = num(0.02, gt=0)
    muon_momentum: float = num(0.95, ge=0, lt=1)
    muon_weight_decay: float = num(0.0, ge=0)
    weight_decay: float = num(0.1, ge=0)
    beta1: float = num(0.9, ge=0, lt=1)
    beta2: float = num(0.95, ge=0, lt=1)
    eps: float = num(1e-8, gt=0)
    grad_clip: float = num(1.0, ge=0)  # max global gradient norm; 0 = no clipping
    # "bf16" = bf16 autocast (fp32 weights and optimizer state). "bf16-pure" = a bf16
    # copy of the model computes (weights, activations and the residual stream in bf16,
    # no autocast casts), fp32 master weights take the optimizer steps and fill the
    # checkpoints (Megatron-LM's bf16 mode; not with FSDP). "auto" = where the hardware
    # multiplies bf16 natively, bf16 on a CUDA GPU and bf16-pure on a CPU with
    # AVX512-BF16 or AMX; fp32 elsewhere, where emulated bf16 is slower than fp32.
    dtype: Literal["fp32", "bf16", "bf16-pure", "auto"] = "fp32"
    # Precision of fp32 matmuls (torch.set_float32_matmul_precision) during training:
    # "highest" = true fp32; "high" = TF32 on NVIDIA GPUs; "medium" = bf16 inputs with fp32
    # accumulation (oneDNN/AMX on CPUs, like TF32 on GPUs), every other op staying fp32.
    # On CPUs "medium" speeds up linear layers but slows torch 2.13's flash-attention
    # kernel badly at small head sizes (benchmarks/LOG.md): measure before using it there.
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    # torch.compile the model (inductor). On a CPU with bf16 the baby GPT's steps are
    # ≈ 5% faster side by side, after ≈ 30 s of compiling (≈ 3 s once inductor's disk
    # cache holds the graphs) (BENCHMARKS.md, issue 13 goal 1).
    compile: bool = False
    seed: int = num(1337, ge=0)
    threads: int = num(0, ge=0, le=4096)  # 0 = leave torch's default
    # `lmforge pretrain` on a CPU: train in this many single-threaded processes (DDP over
    # gloo, the same global batch) instead of one multi-threaded one; 0 = one per usable
    # core; train.threads is then the threads of all processes together. Faster for small
    # models on a machine shared with other jobs, slower on a quiet one
    # (lmforge.train.launch); 1 = one process.
    cpu_processes: int = num(1, ge=0, le=1024)
    log_every: int = num(10, ge=1)
    eval_every: int = num(250, ge=1)
    eval_tokens: int = num(65536, ge=1)
    checkpoint_every: int = num(250, ge=1)
    keep_last: int = num(3, ge=1)
    # Stop after this many consecutive non-finite steps, leaving the last good checkpoint.
    max_bad_steps: int = num(5, ge=1)
    # Loss-spike guard. "skip" drops the update of a step whose (finite) loss exceeds
    # spike_factor × the running mean of accepted losses (an EMA, active after
    # spike_warmup accepted steps); the skip is counted, and spikes count towards
    # max_bad_steps. "none" leaves training exactly as without the guard.
    spike_policy: Literal["none", "skip"] = "none"
    spike_factor: float = num(3.0, gt=1)
    spike_warmup: int = num(20, ge=0)
    # Wall-clock budget in seconds for one invocation (0 = none): training stops cleanly,
    # checkpointing first; `--resume auto` continues with a fresh budget.
    max_time_s: float = num(0.0, ge=0)
    # Peak FLOP/s for MFU; 0 = measure a matmul peak at start (CPU) or use the GPU table.
    peak_flops: float = num(0.0, ge=0)
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = False
    # Scale-out (see `lmforge.train.parallel` and docs/distributed.md). "ddp" replicates the
    # model when torchrun starts several processes; "fsdp" shards it (FSDP2), even on one.
    # "tp" splits each block's matmuls over all processes (tensor parallelism, Megatron-LM);
    # "fsdp+tp" is 2-D: TP groups of `tp` neighbouring ranks, FSDP2 across the groups.
    parallel: Literal["ddp", "fsdp", "tp", "fsdp+tp"] = "ddp"
    tp: int = num(1, ge=1, le=1024)  # TP group size for parallel = fsdp+tp
    # Recompute activations in backward, per block: "full" keeps only block inputs;
    # "selective" also keeps matmul and attention outputs and recomputes the cheap ops.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    fsdp_reshard_after_forward: bool = True  # free gathered weights after forward (ZeRO-3)
    fsdp_cpu_offload: bool = False  # keep sharded weights, grads and optimizer state on CPU
    # A collective waiting longer than this (a dead or stuck rank) fails the job.
    dist_timeout_s: float = num(600.0, gt=0, le=30 * 86_400)
    # "full": rank 0 gathers and writes one model.safetensors (read by every stage);
    # "sharded": every rank writes its own shards in parallel (torch.distributed.checkpoint),
    # resumable at any world size; `lmforge checkpoint consolidate` makes it "full".
    checkpoint_format: Literal["full", "sharded"] = "full"


@dataclass
class EvalConfig:
    """Evaluation after training."""

    samples: int = num(3, ge=0)
    sample_tokens: int = num(160, ge=0)
    temperature: float = num(0.8, ge=0)
    top_k: int = num(50, ge=0)
    prompts: list[str] = field(default_factory=list)
    # Tasks of `lmforge.eval.tasks` run by `lmforge run` on every model of the run
    # ("ppl" scores the run's validation documents); see `lmforge eval --help`.
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    limit: int = num(200, ge=0)  # examples (or validation documents) per task; 0 = all


@dataclass
class BiasConfig:
    """The bias audit (`lmforge bias`, the bias stage of `lmforge run`); see `lmforge.bias`."""

    # "crows_pairs" (shared copy) or [NAME=]PATH of CSV/JSONL minimal pairs
    benchmarks: list[str] = field(default_factory=lambda: ["crows_pairs"])
    limit: int = num(0, ge=0)  # first N sets per benchmark (0 = all)
    probes: bool = True  # template probes (occupations, traits, continuations)
    axes: list[str] = field(default_factory=list)  # probe axes; empty = all
    samples: int = num(3, ge=0)  # continuations per prompt: 1 greedy + (samples - 1) sampled
    max_new_tokens: int = num(24, ge=1)
    lexicon: str = ""  # YAML/JSON word lists (default: lmforge.bias.lexicon)
    probe_spec: str = ""  # YAML/JSON probe subjects and templates
    seed: int = num(0, ge=0)


@dataclass
class FinetuneConfig:
    """Fine-tuning: task data, starting point and method; see `lmforge.finetune`."""

    # instruction | chat | summarization | translation | code-docstring | creative | text
    task: str = "code-docstring"
    # JSONL / CSV / Parquet files, or parallel-text prefixes (PREFIX.{source_lang,target_lang});
    # "shared:REL" is read from the shared data folder. Empty for code-docstring and
    # creative (built-in).
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    source_lang: str = "en"
    target_lang: str = "de"
    # lmforge checkpoint or run folder, or a HF model folder; "" = a new model from `model`.
    init: str = ""
    method: Literal["full", "lora"] = "full"
    lora_rank: int = num(8, ge=1)
    lora_alpha: float = num(16.0, gt=0)
    lora_dropout: float = num(0.0, ge=0, lt=1)
    lora_targets: list[str] = field(
        default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.up", "mlp.down"]
    )
    # Parameter names or prefixes to keep frozen in full fine-tuning (e.g. tok_emb, blocks.0).
    freeze: list[str] = field(default_factory=list)
    max_examples: int = num(0, ge=0)  # per split; 0 = all
    # Greedy generations scored with the task metric at each evaluation (0 = loss only).
    eval_examples: int = num(100, ge=0)
    max_new_tokens: int = num(64, ge=1)
    # Fine-tuning's own schedule, so one recipe can hold both: each replaces its train.*
    # namesake in the fine-tuning stage; 0 = inherit it (fine-tuning then runs with
    # train.max_steps / train.lr / train.tokens_per_step).
    max_steps: int = num(0, ge=0)  # 0 = train.max_steps
    lr: float = num(0.0, ge=0)  # 0 = train.lr
    tokens_per_step: int = num(0, ge=0)  # 0 = train.tokens_per_step
    # sft: next-token loss on the responses (task data). dpo / simpo: preference tuning on
    # {prompt, chosen, rejected} records (`lmforge.finetune.preference`), with `method`
    # full or lora as for sft.
    objective: Literal["sft", "dpo", "simpo"] = "sft"
    dpo_beta: float = num(0.1, gt=0, le=100)  # DPO's β (Rafailov et al. 2023)
    simpo_beta: float = num(2.0, gt=0, le=100)  # SimPO's β (Meng et al. 2024)
    simpo_gamma: float = num(0.5, ge=0, le=100)  # SimPO's target reward margin γ
    # Conservative DPO / SimPO: the chance ε that a preference label is flipped.
    pref_label_smoothing: float = num(0.0, ge=0, lt=0.5)
    # Tokens per packed training row for a RoPE model; 0 = its context_length, at most
    # 2048 (an imported model may allow 131072 positions: rows that long would not fit).
    seq_len: int = num(0, ge=0)


RUN_STAGES = (
    "prepare",
    "tokenizer",
    "tokenize",
    "pretrain",
    "finetune",
    "eval",
    "bias",
    "export",
    "report",
)


@dataclass
class RunConfig:
    """`lmforge run`: the stages a recipe runs, in this order (see `lmforge.run`)."""

    stages: list[str] = field(
        default_factory=lambda: ["tokenizer", "tokenize", "pretrain", "eval", "report"]
    )
    export_formats: list[str] = field(default_factory=lambda: ["hf"])


@dataclass
class OutputConfig:
    """Where a run writes its files."""

    dir: str = "runs/default"


@dataclass
class PrepareSource:
    """One input of `lmforge prepare` (see `lmforge.data.readers`)."""

    # A file, folder or glob; "python-stdlib"; or a HF dataset (a local folder or hub name).
    path: str = ""
    kind: Literal[
        "auto",
        "text",
        "code",
        "jsonl",
        "json",
        "csv",
        "parquet",
        "html",
        "warc",
        "hf",
        "python-stdlib",
    ] = "auto"
    name: str = ""  # label in shard names and the report (default: derived from the path)
    license: str = "unknown"  # declared licence; "unknown" is flagged in the report
    text_field: str = "text"  # for JSONL / JSON / CSV / Parquet / HF records
    id_field: str = ""  # record field holding a stable id (default: file:line)
    include: list[str] = field(default_factory=list)  # globs on relative paths; empty = all
    exclude: list[str] = field(default_factory=list)
    weight: float = num(1.0, ge=0)  # mixing weight: < 1 down-samples, > 1 repeats documents
    hf_split: str = "train"


@dataclass
class PrepareConfig:
    """The data preparation pipeline (`lmforge prepare`); see `lmforge.data.pipeline`."""

    sources: list[PrepareSource] = field(default_factory=list)
    output: str = ""  # default: <output.dir>/prepared; train on <output>/shards
    executor: Literal["local", "ray"] = "local"
    workers: int = num(0, ge=0, le=4096)  # 0 = one per CPU core
    # executor=ray: "" starts a private local Ray; "auto" or "HOST:PORT" joins a running
    # cluster (`ray start --head`), never starting one
    ray_address: str = ""
    ray_max_retries: int = num(3, ge=0, le=100)  # reruns of a task whose worker or node died
    task_bytes: int = num(8_000_000, ge=1)  # input files are grouped into tasks of about this size
    seed: int = num(0, ge=0)  # for mixing (down/up-sampling) decisions
    write_exclusions: bool = True  # keep dropped documents, with their reason
    max_file_bytes: int = num(64_000_000, ge=1)  # larger inputs are skipped (counted)
    max_line_bytes: int = num(8_000_000, ge=1)  # longer JSONL/CSV lines are skipped (counted)
    # cleaning
    fix_unicode: bool = True  # ftfy on prose
    strip_boilerplate: bool = True  # Project Gutenberg headers / licence footers
    # filters (0 disables a bound)
    min_chars: int = num(200, ge=0)
    max_chars: int = num(0, ge=0)
    quality: bool = True  # Gopher quality heuristics (prose)
    max_words: int = num(0, ge=0)  # Gopher used 100,000 for web pages; books are longer
    repetition: bool = True  # Gopher repetition heuristics (prose)
    languages: list[str] = field(default_factory=lambda: ["en"])  # empty = keep any
    min_language_score: float = num(0.5, ge=0, le=1)
    max_flagged_word_ratio: float = num(0.01, ge=0, le=1)  # word-list adult/toxic filter
    code_filters: bool = True
    # PII
    pii: bool = True
    # deduplication
    dedup_exact: bool = True
    dedup_minhash: bool = True
    minhash_threshold: float = num(0.8, gt=0, le=1)
    shingle_size: int = num(5, ge=1)
    num_perm: int = num(128, ge=1)
    bands: int = num(0, ge=0)  # 0 = derived from threshold and num_perm
    # decontamination: "hellaswag", "crows_pairs", or PATH[:FIELD] of a JSONL/text eval split
    decontaminate: list[str] = field(default_factory=list)
    decontam_ngram: int = num(13, ge=1)  # GPT-3 (Brown et al. 2020, app. C) used 13-grams
    decontam_action: Literal["drop", "flag"] = "drop"
    # bias (lmforge.bias), after deduplication: counterfactual data augmentation of a
    # fraction of the documents ("add" a swapped copy, or "replace" the original), and
    # term/co-occurrence statistics written into data_report.json ("bias" section)
    cda_ratio: float = num(0.0, ge=0, le=1)  # 0 = off
    cda_mode: Literal["add", "replace"] = "add"
    cda_axes: list[str] = field(default_factory=lambda: ["gender"])
    cda_names: bool = False  # also swap given names (capitalised only)
    bias_lexicon: str = ""  # YAML/JSON word lists (default: lmforge.bias.lexicon)
    bias_statistics: bool = True
    bias_window: int = num(0, ge=0)  # co-occurrence within N words (0 = within a sentence)
    # steps registered by name (lmforge.data.registry), each {name: NAME, OPTION: value}
    steps: list[dict[str, Any]] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)  # modules to import: they register steps


@dataclass
class Config:
    """A whole run."""

    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)


# ----------------------------------------------------------------------------- YAML


class _Refused(yaml.composer.ComposerError):
    """YAML that parses but exceeds a bound (too deep, too many values, recursive)."""


class _RefusedYAML(ConfigError):
    """A recipe or override value refused by _BoundedLoader (never read as plain text)."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents too deep or too large once aliases expand.

    Aliases point at one shared node, so composing a "billion laughs" file is cheap; it
    is every later walk over the values (merging, checking, quoting) that explodes. Each
    composed node's expanded size is recorded; an alias adds the size of its target.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def _refuse(self, problem: str) -> typing.NoReturn:
        raise _Refused(None, None, problem, self.peek_event().start_mark)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        """YAML forbids a key twice in one mapping; PyYAML keeps the last silently, so a
        recipe with two `train:` sections would lose the first."""
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                if key.value in seen:
                    raise _Refused(
                        None, None, f"key {quote(key.value)} appears twice", key.start_mark
                    )
                seen.add(key.value)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            target = self.anchors.get(self.peek_event().anchor)
            if target is not None and id(target) not in self._sizes:
                self._refuse("an alias refers to the value that contains it")
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            self._refuse(f"values nested more than {MAX_YAML_DEPTH} deep")
        node = super().compose_node(parent, index)
        self._depth -= 1
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
            self._refuse_duplicate_keys(node)
        size = 1 + sum(self._sizes[id(c)] for c in children)
        if size > MAX_YAML_NODES:
            self._refuse(f"more than {MAX_YAML_NODES:,} values once aliases are expanded")
        self._sizes[id(node)] = size
        return node


# Numbers as YAML 1.2 reads them. PyYAML follows YAML 1.1, where `010` is octal 8, `1:30`
# is 90 (base 60) and `3e-4` (no dot) is text: surprises in a recipe.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_BoundedLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"), list("-+0123456789")
)
_BoundedLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    base = {"0x": 16, "0o": 8}.get(text[:2], 10)
    return int(text[2:] if base != 10 else text, base)


_BoundedLoader.add_constructor(_INT, _construct_int)


def _load_yaml(text: str, where: str) -> Any:
    """Parse YAML safely (plain data only) within bounds; errors become one-line ConfigErrors."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader already refuses control characters
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        error = _RefusedYAML if isinstance(exc, _Refused) else ConfigError
        raise error(f"{where}{at}: not valid YAML: {exc.problem}{context}") from None
    except (yaml.YAMLError, ValueError, OverflowError) as exc:  # e.g. a 5,000-digit integer
        raise ConfigError(f"{where}: not valid YAML: {quote(str(exc))}") from None
    finally:
        if loader is not None:
            loader.dispose()


# ----------------------------------------------------------------------------- building


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce_number(value: Any, tp: type, key: str, where: str) -> Any:
    """An int or float for a numeric key (int → float widening, integral float → int)."""
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: {quote(value)} should be an integer")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key}: {quote(value)} should be a number")
    try:
        return float(value) + 0.0  # + 0.0 turns -0.0 into 0.0
    except OverflowError:
        raise ConfigError(f"{where}: {key}: {quote(value)} is too large for a number") from None


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp` (int → float widening allowed)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {key}: {quote(value)} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {key}: {quote(value)} should be {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {key}: {quote(value)} should be a list")
            value = [value]  # a single string where a list is expected
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: {key}: {quote(value)} should be null")
        return None
    if tp in (int, float):
        return _coerce_number(value, tp, key, where)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: {key}: {quote(value)} should be true or false")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: {key}: {quote(value)} should be a string")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: {quote(value)} should be a mapping of settings")
        return _build(tp, value, key, where)
    return value


def _unknown_key(key: str, full: str, names: set[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    if close:
        hint = f"did you mean '{close[0]}'?"
    elif len(names) <= 12:
        hint = f"known here: {', '.join(sorted(names))}"
    else:
        hint = "`lmforge config` lists the keys"
    return ConfigError(f"{where}: unknown key {quote(full)} ({hint})")


def _build(cls: Any, values: dict[str, Any], prefix: str, where: str) -> Any:
    """The dataclass `cls` from `values`: types coerced and ranges checked, key by key."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise _unknown_key(key, full, set(fields), where)
        kwargs[key] = _coerce(value, hints[key], full, where)
        _check_field(fields[key], kwargs[key], full, where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data, suitable for YAML/JSON."""
    return dataclasses.asdict(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- recipes


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    folder = resources.files("lmforge") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _recipe_text(recipe: str, referrer: str) -> tuple[str, str, str]:
    """(text, name for messages, identity for cycle detection) of a recipe path or name."""
    path = Path(recipe)
    by = f" (extends: in {referrer})" if referrer else ""
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {quote(recipe)}{by}")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise ConfigError(f"{recipe}: larger than {MAX_RECIPE_BYTES:,} bytes; not a recipe")
        try:
            return path.read_text(encoding="utf-8"), recipe, str(path.resolve())
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"{recipe}: cannot read the recipe: {reason}") from None
    res = resources.files("lmforge") / "recipes" / f"{recipe}.yaml"
    if not res.is_file():
        names = ", ".join(builtin_recipes())
        raise ConfigError(
            f"no recipe file or built-in recipe named {quote(recipe)}{by} (built-in: {names})"
        )
    return res.read_text(encoding="utf-8"), f"recipe '{recipe}'", f"builtin:{recipe}"


def _beside(parent: str, where: str, identity: str) -> str:
    """`extends: FILE` names a file next to the recipe that extends it, or (as before this
    was so) one relative to the working folder."""
    candidate = Path(where).parent / parent
    if identity.startswith("builtin:") or Path(parent).is_absolute() or not candidate.is_file():
        return parent
    return str(candidate)


def _read_recipe(recipe: str, chain: tuple[tuple[str, str], ...] = ()) -> tuple[dict, str]:
    """Read a recipe by path or built-in name; `extends: NAME` layers it on another.

    `chain` holds (name, identity) of the recipes that extend this one, to name a cycle.
    """
    text, where, identity = _recipe_text(recipe, chain[-1][0] if chain else "")
    chain = (*chain, (where, identity))
    if identity in [ident for _, ident in chain[:-1]]:
        start = [ident for _, ident in chain].index(identity)
        names = " -> ".join(name for name, _ in chain[start:])
        raise ConfigError(f"recipes extend each other in a cycle: {names}")
    if len(chain) > MAX_EXTENDS:
        raise ConfigError(f"{where}: more than {MAX_EXTENDS} recipes deep in extends:")
    data = _load_yaml(text, where) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a recipe must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{where}: extends: {quote(parent)} should be a recipe name or file")
        base, _ = _read_recipe(_beside(parent, where, identity), chain)
        data = _merge(base, data)
    return data, where


# ----------------------------------------------------------------------------- overrides

_DECIMAL_INT = re.compile(r"[+-]?[0-9][0-9_]*")
_DECIMAL_FLOAT = re.compile(r"[+-]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9][0-9_]*)([eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?\.?(nan|inf|infinity)", re.IGNORECASE)


def _override_value(raw: str, key: str) -> Any:
    """The value of `--key=raw`: a decimal number, or a YAML scalar/list, or the raw text."""
    where = f"command line: {key}"
    text = raw.strip()
    if _DECIMAL_INT.fullmatch(text):
        try:
            return int(text)
        except ValueError:  # Python refuses int() of more than 4,300 digits
            raise ConfigError(f"{where}: {quote(raw)} has too many digits") from None
    if _DECIMAL_FLOAT.fullmatch(text) or _NON_FINITE.fullmatch(text):
        value = float(text.replace(".nan", "nan").replace(".inf", "inf"))
        if math.isinf(value) and not _NON_FINITE.fullmatch(text):
            raise ConfigError(f"{where}: {quote(raw)} is too large for a number")
        return value
    if raw == "":
        return ""
    try:
        value = _load_yaml(raw, where)
    except _RefusedYAML:
        raise
    except ConfigError:
        return raw  # not YAML: the text itself
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # YAML 1.1 reads 0x10, 010 (octal), 0b11 and 1:30 (base 60) as numbers: refuse them
        raise ConfigError(f"{where}: {quote(raw)} is not a decimal number")
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=3e-4", "--model.n_layers=6"]`` into a nested dict.

    Decimal numbers (``3e-4``, ``1_000``, ``nan``) are read as Python reads them; anything
    else as YAML (``true``, ``[a, b]``, ``null``), or as text when it is not YAML.
    """
    out: dict[str, Any] = {}
    for item in items:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {quote(item)} should look like --section.key=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"override {quote(item)} has an empty key (use --section.key=value)")
        value = _override_value(raw, key)
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # e.g. --train=5 --train.lr=3e-4
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"override {quote(item)}: '{prefix}' was given a value earlier")
        node[parts[-1]] = value
    return out


# ----------------------------------------------------------------------------- loading


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a recipe (path or built-in name) and overrides."""
    data: dict[str, Any] = {}
    where = "defaults"
    if recipe:
        data, where = _read_recipe(recipe)
    cfg = _build(Config, data, "", where)
    if overrides:
        cfg = _build(Config, _merge(to_dict(cfg), parse_overrides(overrides)), "", "command line")
        where = f"{where} with command-line overrides"
    apply_preset(cfg, data, overrides or [])
    # data.sources given on purpose: on the command line, or in the recipe unless the
    # command line is what adds the prepare stage (then the prepared shards replace it).
    cli = parse_overrides(overrides or [])
    adds_prepare = "sources" in (cli.get("prepare") or {}) or "stages" in (cli.get("run") or {})
    explicit = "sources" in (cli.get("data") or {}) or (
        "sources" in (data.get("data") or {}) and not adds_prepare
    )
    derive_data_sources(cfg, explicit, where)
    validate(cfg, where)
    return cfg


def derive_data_sources(cfg: Config, explicit: bool, where: str) -> None:
    """Point `data.sources` at the prepared shards when the recipe prepares its own data.

    A recipe with `prepare.sources` trains on what `prepare` writes, so the resolved
    config (`lmforge config`, the run's `config.yaml`) must say so rather than show the
    default source: `lmforge run` reads `<output.dir>/prepared/shards` when its stages
    include prepare; standalone commands read `<prepare.output>/shards`.
    """
    if not cfg.prepare.sources:
        return
    if "prepare" in cfg.run.stages:
        shards = str(Path(cfg.output.dir) / "prepared" / "shards")
        if explicit and cfg.data.sources != [shards]:
            raise ConfigError(
                f"{where}: data.sources = {cfg.data.sources} but this recipe prepares its own "
                f"data and trains on {shards}; remove data.sources or drop prepare from run.stages"
            )
    elif explicit:
        return
    else:
        folder = cfg.prepare.output or str(Path(cfg.output.dir) / "prepared")
        shards = str(Path(folder) / "shards")
    cfg.data.sources = [shards]


def config_from_dict(data: dict[str, Any], where: str = "saved config") -> Config:
    """Rebuild a Config saved with a run or checkpoint."""
    cfg = _build(Config, data, "", where)
    validate(cfg, where)
    return cfg


def apply_preset(cfg: Config, recipe_data: dict[str, Any], overrides: list[str]) -> None:
    """Fill model fields from a named preset unless the recipe or command line set them."""
    if not cfg.model.preset:
        return
    if cfg.model.preset not in PRESETS:
        names = ", ".join(PRESETS)
        raise ConfigError(
            f"model.preset: {quote(cfg.model.preset)} is not a preset (known: {names})"
        )
    explicit = set((recipe_data.get("model") or {}).keys())
    explicit |= set(parse_overrides(overrides).get("model", {}).keys())
    for key, value in PRESETS[cfg.model.preset].items():
        if key not in explicit:
            setattr(cfg.model, key, value)


# ----------------------------------------------------------------------------- cross-key rules
# Each rule gets the whole config and returns (key, what is wrong) or None; ranges of
# single keys are declared on the fields and checked by check_ranges.

Problem = tuple[str, str] | None


def _heads_fit(cfg: Config) -> Problem:
    m = cfg.model
    if m.d_model % m.n_heads:
        return "model.n_heads", f"= {m.n_heads} must divide model.d_model = {m.d_model}"
    if m.n_heads % (m.n_kv_heads or m.n_heads):
        return "model.n_kv_heads", f"= {m.n_kv_heads} must divide model.n_heads = {m.n_heads}"
    return None


def _position_fits(cfg: Config) -> Problem:
    """The `model.position` component accepts the shape (RoPE: an even head size)."""
    problem = components.POSITIONS[cfg.model.position].check(cfg.model)
    return ("model.position", problem) if problem else None


def _batch_fits(cfg: Config) -> Problem:
    t, ctx = cfg.train, cfg.model.context_length
    rows, rows_key = ctx, "model.context_length"
    if cfg.finetune.seq_len and cfg.model.position == "rope":  # a fine-tuned model's config
        rows, rows_key = min(ctx, cfg.finetune.seq_len), "finetune.seq_len"
    micro_tokens = t.micro_batch_size * rows
    if t.tokens_per_step % micro_tokens:
        return "train.tokens_per_step", (
            f"= {t.tokens_per_step} must be a multiple of train.micro_batch_size × "
            f"{rows_key} = {t.micro_batch_size} × {rows} = {micro_tokens}"
        )
    return None


def _muon_not_sharded(cfg: Config) -> Problem:
    if cfg.train.optimizer == "muon" and cfg.train.parallel == "fsdp":
        return "train.optimizer", (
            "= muon needs whole weight matrices; FSDP shards them (use train.parallel=ddp)"
        )
    return None


def _tp_fits(cfg: Config) -> Problem:
    """Tensor parallelism splits heads and the MLP's hidden width between `train.tp` ranks."""
    t, m = cfg.train, cfg.model
    if t.tp > 1 and t.parallel != "fsdp+tp":
        return "train.tp", f"= {t.tp} needs train.parallel=fsdp+tp (tp alone uses every process)"
    if t.parallel not in ("tp", "fsdp+tp"):
        return None
    if t.optimizer == "muon":
        return "train.optimizer", "= muon needs whole weight matrices; TP splits them"
    if t.dtype == "bf16-pure":
        return "train.dtype", "= bf16-pure does not combine with TP: use train.dtype=bf16"
    for key, value in (("n_heads", m.n_heads), ("n_kv_heads", m.n_kv_heads or m.n_heads)):
        if value % t.tp:
            return f"model.{key}", (
                f"= {value} is not divisible by train.tp = {t.tp}: each TP rank holds whole heads"
            )
    return None


def _known_names(cfg: Config) -> Problem:
    if not _DEVICE.fullmatch(cfg.train.device):
        return (
            "train.device",
            f"= {quote(cfg.train.device)} is not auto, cpu, cuda[:N], mps or xpu[:N]",
        )
    for i, stage in enumerate(cfg.run.stages):
        if stage not in RUN_STAGES:
            return f"run.stages[{i}]", f"= {quote(stage)} is not a stage ({', '.join(RUN_STAGES)})"
    for i, fmt in enumerate(cfg.run.export_formats):
        if fmt not in ("hf", "gguf"):
            return f"run.export_formats[{i}]", f"= {quote(fmt)} is not 'hf' or 'gguf'"
    return None


def _prepare_consistent(cfg: Config) -> Problem:
    pc = cfg.prepare
    if pc.bands and pc.num_perm % pc.bands:
        return "prepare.bands", f"= {pc.bands} must divide prepare.num_perm = {pc.num_perm}"
    for i, src in enumerate(pc.sources):
        if not src.path:
            return f"prepare.sources[{i}].path", "is required"
    return None


def _bpe_vocab_fits_bytes(cfg: Config) -> Problem:
    tk = cfg.tokenizer
    if tk.kind == "bpe" and not tk.path and tk.vocab_size < 300:
        return "tokenizer.vocab_size", (
            f"= {tk.vocab_size} must be at least 300 for byte-level BPE (256 bytes + specials)"
        )
    return None


def _sharded_checkpoints_without_tp(cfg: Config) -> Problem:
    t = cfg.train
    if t.checkpoint_format == "sharded" and t.parallel in ("tp", "fsdp+tp"):
        return "train.checkpoint_format", (
            f"= sharded is not available with train.parallel = {t.parallel} yet (its shards "
            "would keep tensor parallelism's row order); use train.checkpoint_format=full"
        )
    return None


def _rope_scaling_ramp(cfg: Config) -> Problem:
    m = cfg.model
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        return "model.rope_high_freq_factor", (
            f"= {m.rope_high_freq_factor:g} must exceed model.rope_low_freq_factor = "
            f"{m.rope_low_freq_factor:g} (the ramp between them would be empty)"
        )
    return None


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:[0-9]+)?")

CROSS_KEY_RULES = (
    _heads_fit,
    _position_fits,
    _batch_fits,
    _muon_not_sharded,
    _tp_fits,
    _known_names,
    _prepare_consistent,
    _bpe_vocab_fits_bytes,
    _rope_scaling_ramp,
    _sharded_checkpoints_without_tp,
)


def validate(cfg: Config, where: str = "config") -> None:
    """Reject impossible values before any work starts: every declared range, then the
    rules that tie several keys together."""
    check_ranges(cfg, where)
    for rule in CROSS_KEY_RULES:
        problem = rule(cfg)
        if problem:
            raise ConfigError(f"{where}: {problem[0]} {problem[1]}")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
