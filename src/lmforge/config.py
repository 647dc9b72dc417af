"""One typed config tree for a whole run.

A run is described by nested dataclasses (``Config.data``, ``Config.tokenizer``,
``Config.model``, ``Config.train``, ``Config.eval``, ``Config.output``). Recipes are
YAML files with the same shape; the command line overrides any leaf with a dotted
key (``--train.lr=3e-4 --model.n_layers=6``). Everything is checked before any
work starts: unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and where it came from."""


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the pre-training text comes from."""

    # "python-stdlib" (the running interpreter's standard library), or files/folders/globs
    # of text, or document shards (JSONL / JSONL.zst with a "text" field).
    sources: list[str] = field(default_factory=lambda: ["python-stdlib"])
    # Fraction of documents held out for validation (split by document id, deterministic).
    val_fraction: float = 0.05
    # "document": hold out whole documents (by id hash); "tail": the last val_fraction of
    # each document (nanoGPT's split of one file).
    split: Literal["document", "tail"] = "document"
    # Stop reading sources after this many bytes of text (0 = no limit).
    max_bytes: int = 0
    # Prepared token shards to train on; when empty, `tokenize` writes them into the run folder.
    tokens_dir: str = ""


@dataclass
class TokenizerConfig:
    """Byte-level BPE (HF `tokenizers`) or a character vocabulary (for nanoGPT comparisons)."""

    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: int = 4096
    # Use an existing tokenizer.json instead of training one.
    path: str = ""
    # Train the tokenizer on at most this many bytes of text (0 = all).
    train_bytes: int = 20_000_000


@dataclass
class ModelConfig:
    """Shape and variant of the transformer; see `lmforge.model.transformer`."""

    # A named shape from `lmforge.model.presets`; explicit fields below still override it.
    preset: str = ""
    vocab_size: int = 0  # 0 = take it from the tokenizer
    context_length: int = 256
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (MHA); 1 = MQA; between = GQA
    d_ff: int = 0  # 0 = derived: 4*d for GELU, 8/3*d rounded to a multiple of 64 for SwiGLU
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    position: Literal["learned", "rope"] = "learned"
    # gelu: the tanh approximation (GPT-2's gelu_new); gelu_exact: the erf form (nanoGPT's
    # nn.GELU(), HF "gelu"; ≈ 5× faster than the tanh form on CPUs in torch 2.13);
    # relu2: squared ReLU (So et al. 2021, "Primer"). All three are 4·C wide.
    mlp: Literal["gelu", "gelu_exact", "swiglu", "relu2"] = "gelu"
    qk_norm: bool = False
    tie_embeddings: bool = True
    bias: bool = False
    # Bias on the q/k/v projection only (Qwen2); `bias` puts one on every linear layer.
    qkv_bias: bool = False
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    objective: Literal["causal", "masked"] = "causal"
    init_std: float = 0.02
    # Logit soft-capping, cap·tanh(logits/cap) (Gemma 2; modded-nanogpt); 0 = off.
    logit_softcap: float = 0.0
    # Zero-initialise the residual output projections (attn.proj, mlp.down), so each block
    # starts as the identity (modded-nanogpt); False keeps GPT-2's scaled N(0, σ/√(2L)).
    zero_init_proj: bool = False


@dataclass
class TrainConfig:
    """The optimisation loop shared by pre-training and fine-tuning."""

    max_steps: int = 1000
    # Global tokens per optimizer step; gradient accumulation is derived from it.
    tokens_per_step: int = 8192
    micro_batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    # warmup-stable-decay: the last `decay_fraction` of steps decay linearly to min_lr.
    decay_fraction: float = 0.2
    # muon: Muon (Jordan et al. 2024) on the blocks' weight matrices, AdamW (lr, betas,
    # weight_decay below) on embeddings, head, norms and biases; see lmforge.train.optim.
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
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
    seed: int = 1337
    threads: int = 0  # 0 = leave torch's default
    # `lmforge pretrain` on a CPU: train in this many single-threaded processes (DDP over
    # gloo, the same global batch) instead of one multi-threaded one; 0 = one per usable
    # core; train.threads is then the threads of all processes together. Faster for small
    # models on a machine shared with other jobs, slower on a quiet one
    # (lmforge.train.launch); 1 = one process.
    cpu_processes: int = 1
    log_every: int = 10
    eval_every: int = 250
    eval_tokens: int = 65536
    checkpoint_every: int = 250
    keep_last: int = 3
    # Stop after this many consecutive non-finite steps, leaving the last good checkpoint.
    max_bad_steps: int = 5
    # Loss-spike guard. "skip" drops the update of a step whose (finite) loss exceeds
    # spike_factor × the running mean of accepted losses (an EMA, active after
    # spike_warmup accepted steps); the skip is counted, and spikes count towards
    # max_bad_steps. "none" leaves training exactly as without the guard.
    spike_policy: Literal["none", "skip"] = "none"
    spike_factor: float = 3.0
    spike_warmup: int = 20
    # Wall-clock budget in seconds for one invocation (0 = none): training stops cleanly,
    # checkpointing first; `--resume auto` continues with a fresh budget.
    max_time_s: float = 0.0
    # Peak FLOP/s for MFU; 0 = measure a matmul peak at start (CPU) or use the GPU table.
    peak_flops: float = 0.0
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = False
    # Scale-out (see `lmforge.train.parallel` and docs/distributed.md). "ddp" replicates the
    # model when torchrun starts several processes; "fsdp" shards it (FSDP2), even on one.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Recompute activations in backward, per block: "full" keeps only block inputs;
    # "selective" also keeps matmul and attention outputs and recomputes the cheap ops.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    fsdp_reshard_after_forward: bool = True  # free gathered weights after forward (ZeRO-3)
    fsdp_cpu_offload: bool = False  # keep sharded weights, grads and optimizer state on CPU
    # A collective waiting longer than this (a dead or stuck rank) fails the job.
    dist_timeout_s: float = 600.0


@dataclass
class EvalConfig:
    """Evaluation after training."""

    samples: int = 3
    sample_tokens: int = 160
    temperature: float = 0.8
    top_k: int = 50
    prompts: list[str] = field(default_factory=list)
    # Tasks of `lmforge.eval.tasks` run by `lmforge run` on every model of the run
    # ("ppl" scores the run's validation documents); see `lmforge eval --help`.
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    limit: int = 200  # examples (or validation documents) per task; 0 = all


@dataclass
class BiasConfig:
    """The bias audit (`lmforge bias`, the bias stage of `lmforge run`); see `lmforge.bias`."""

    # "crows_pairs" (shared copy) or [NAME=]PATH of CSV/JSONL minimal pairs
    benchmarks: list[str] = field(default_factory=lambda: ["crows_pairs"])
    limit: int = 0  # first N sets per benchmark (0 = all)
    probes: bool = True  # template probes (occupations, traits, continuations)
    axes: list[str] = field(default_factory=list)  # probe axes; empty = all
    samples: int = 3  # continuations per prompt: 1 greedy + (samples - 1) sampled
    max_new_tokens: int = 24
    lexicon: str = ""  # YAML/JSON word lists (default: lmforge.bias.lexicon)
    probe_spec: str = ""  # YAML/JSON probe subjects and templates
    seed: int = 0


@dataclass
class FinetuneConfig:
    """Fine-tuning: task data, starting point and method; see `lmforge.finetune`."""

    # instruction | chat | summarization | translation | code-docstring | text
    task: str = "code-docstring"
    # JSONL / CSV / Parquet files, or parallel-text prefixes (PREFIX.{source_lang,target_lang});
    # "shared:REL" is read from the shared data folder. Empty for code-docstring (built-in).
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    source_lang: str = "en"
    target_lang: str = "de"
    # lmforge checkpoint or run folder, or a HF model folder; "" = a new model from `model`.
    init: str = ""
    method: Literal["full", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(
        default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.up", "mlp.down"]
    )
    # Parameter names or prefixes to keep frozen in full fine-tuning (e.g. tok_emb, blocks.0).
    freeze: list[str] = field(default_factory=list)
    max_examples: int = 0  # per split; 0 = all
    # Greedy generations scored with the task metric at each evaluation (0 = loss only).
    eval_examples: int = 100
    max_new_tokens: int = 64
    # Replace train.max_steps / train.lr / train.tokens_per_step when fine-tuning (0 = keep),
    # so one recipe can hold both the pre-training and the fine-tuning schedule.
    max_steps: int = 0
    lr: float = 0.0
    tokens_per_step: int = 0


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
    weight: float = 1.0  # mixing weight: < 1 down-samples, > 1 repeats documents
    hf_split: str = "train"


@dataclass
class PrepareConfig:
    """The data preparation pipeline (`lmforge prepare`); see `lmforge.data.pipeline`."""

    sources: list[PrepareSource] = field(default_factory=list)
    output: str = ""  # default: <output.dir>/prepared; train on <output>/shards
    executor: Literal["local", "ray"] = "local"
    workers: int = 0  # 0 = one per CPU core
    task_bytes: int = 8_000_000  # input files are grouped into tasks of about this size
    seed: int = 0  # for mixing (down/up-sampling) decisions
    write_exclusions: bool = True  # keep dropped documents, with their reason
    max_file_bytes: int = 64_000_000  # larger inputs are skipped (counted)
    max_line_bytes: int = 8_000_000  # longer JSONL/CSV lines are skipped (counted)
    # cleaning
    fix_unicode: bool = True  # ftfy on prose
    strip_boilerplate: bool = True  # Project Gutenberg headers / licence footers
    # filters (0 disables a bound)
    min_chars: int = 200
    max_chars: int = 0
    quality: bool = True  # Gopher quality heuristics (prose)
    max_words: int = 0  # Gopher used 100,000 for web pages; books are longer
    repetition: bool = True  # Gopher repetition heuristics (prose)
    languages: list[str] = field(default_factory=lambda: ["en"])  # empty = keep any
    min_language_score: float = 0.5
    max_flagged_word_ratio: float = 0.01  # word-list adult/toxic filter
    code_filters: bool = True
    # PII
    pii: bool = True
    # deduplication
    dedup_exact: bool = True
    dedup_minhash: bool = True
    minhash_threshold: float = 0.8
    shingle_size: int = 5
    num_perm: int = 128
    bands: int = 0  # 0 = derived from threshold and num_perm
    # decontamination: "hellaswag", "crows_pairs", or PATH[:FIELD] of a JSONL/text eval split
    decontaminate: list[str] = field(default_factory=list)
    decontam_ngram: int = 13  # GPT-3 (Brown et al. 2020, app. C) used 13-grams
    decontam_action: Literal["drop", "flag"] = "drop"
    # bias (lmforge.bias), after deduplication: counterfactual data augmentation of a
    # fraction of the documents ("add" a swapped copy, or "replace" the original), and
    # term/co-occurrence statistics written into data_report.json ("bias" section)
    cda_ratio: float = 0.0  # 0 = off
    cda_mode: Literal["add", "replace"] = "add"
    cda_axes: list[str] = field(default_factory=lambda: ["gender"])
    cda_names: bool = False  # also swap given names (capitalised only)
    bias_lexicon: str = ""  # YAML/JSON word lists (default: lmforge.bias.lexicon)
    bias_statistics: bool = True
    bias_window: int = 0  # co-occurrence within N words (0 = within a sentence)


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


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp` (int → float widening allowed)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {key} = {value!r} should be {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            if isinstance(value, str):  # a single string where a list is expected
                value = [value]
            else:
                raise ConfigError(f"{where}: {key} = {value!r} should be a list")
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: {key} should be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} = {value!r} should be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: {key} = {value!r} should be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} = {value!r} should be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} = {value!r} should be a string")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} should be a mapping of settings")
        return _build(tp, value, key, where)
    return value


def _build(cls: Any, values: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}: unknown key '{full}' (known here: {known})")
        kwargs[key] = _coerce(value, hints[key], full, where)
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


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    folder = resources.files("lmforge") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_recipe(recipe: str) -> tuple[dict[str, Any], str]:
    """Read a recipe by path or built-in name; `extends: NAME` layers it on another."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"recipe file not found: {recipe}")
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        res = resources.files("lmforge") / "recipes" / f"{recipe}.yaml"
        if not res.is_file():
            names = ", ".join(builtin_recipes())
            raise ConfigError(
                f"no recipe file or built-in recipe named '{recipe}' (built-in: {names})"
            )
        text, where = res.read_text(encoding="utf-8"), f"recipe '{recipe}'"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a recipe must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent:
        base, _ = _read_recipe(str(parent))
        data = _merge(base, data)
    return data, where


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=3e-4", "--model.n_layers=6"]`` into a nested dict.

    Values are read as YAML scalars, so ``true``, ``3e-4`` and ``[a, b]`` work.
    """
    out: dict[str, Any] = {}
    for item in items:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override '{item}' should look like --section.key=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" as a string; accept the number forms people type.
            for number in (int, float):
                try:
                    value = number(raw)
                    break
                except ValueError:
                    continue
        node = out
        parts = key.split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"override '{item}' has an empty key (use --section.key=value)")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # e.g. --train=5 --train.lr=3e-4
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"override '{item}': '{prefix}' was given a value earlier")
        node[parts[-1]] = value
    return out


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a recipe (path or built-in name) and overrides."""
    data: dict[str, Any] = {}
    where = "defaults"
    if recipe:
        data, where = _read_recipe(recipe)
    cfg = _build(Config, data, "", where)
    if overrides:
        cfg = _build(Config, _merge(to_dict(cfg), parse_overrides(overrides)), "", "command line")
    apply_preset(cfg, data, overrides or [])
    explicit = "sources" in (data.get("data") or {}) or "sources" in (
        parse_overrides(overrides or []).get("data") or {}
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
    from lmforge.model.presets import PRESETS

    if cfg.model.preset not in PRESETS:
        names = ", ".join(PRESETS)
        raise ConfigError(f"model.preset = '{cfg.model.preset}' is not a preset (known: {names})")
    explicit = set((recipe_data.get("model") or {}).keys())
    explicit |= set(parse_overrides(overrides).get("model", {}).keys())
    for key, value in PRESETS[cfg.model.preset].items():
        if key not in explicit:
            setattr(cfg.model, key, value)


def validate(cfg: Config, where: str = "config") -> None:
    """Reject impossible values before any work starts."""

    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{where}: {key} {msg}")

    m, t = cfg.model, cfg.train
    for key in ("n_layers", "d_model", "n_heads", "context_length"):
        if getattr(m, key) <= 0:
            bad(f"model.{key}", f"= {getattr(m, key)} must be positive")
    if m.vocab_size < 0:
        bad("model.vocab_size", "must be positive (or 0 to take it from the tokenizer)")
    if m.d_model % m.n_heads:
        bad("model.n_heads", f"= {m.n_heads} must divide model.d_model = {m.d_model}")
    kv = m.n_kv_heads or m.n_heads
    if kv < 0 or m.n_heads % kv:
        bad("model.n_kv_heads", f"= {m.n_kv_heads} must divide model.n_heads = {m.n_heads}")
    if m.position == "rope" and (m.d_model // m.n_heads) % 2:
        bad("model.position", "= rope needs an even head dimension (d_model / n_heads)")
    if not 0.0 <= m.dropout < 1.0:
        bad("model.dropout", f"= {m.dropout} must be in [0, 1)")
    if m.d_ff < 0:
        bad("model.d_ff", "must be positive (or 0 to derive it)")
    if t.lr <= 0 or not math.isfinite(t.lr):
        bad("train.lr", f"= {t.lr} must be a positive number")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        bad("train.min_lr_ratio", f"= {t.min_lr_ratio} must be in [0, 1]")
    if t.max_steps <= 0:
        bad("train.max_steps", f"= {t.max_steps} must be positive")
    if t.warmup_steps < 0:
        bad("train.warmup_steps", "must not be negative")
    if t.micro_batch_size <= 0:
        bad("train.micro_batch_size", "must be positive")
    if t.cpu_processes < 0:
        bad("train.cpu_processes", "must not be negative (0 = one per core)")
    if t.tokens_per_step <= 0:
        bad("train.tokens_per_step", "must be positive")
    micro_tokens = t.micro_batch_size * m.context_length
    if t.tokens_per_step % micro_tokens:
        bad(
            "train.tokens_per_step",
            f"= {t.tokens_per_step} must be a multiple of micro_batch_size × context_length "
            f"= {t.micro_batch_size} × {m.context_length} = {micro_tokens}",
        )
    if not 0.0 < t.decay_fraction <= 1.0:
        bad("train.decay_fraction", "must be in (0, 1]")
    if t.grad_clip < 0:
        bad("train.grad_clip", "must not be negative (0 disables clipping)")
    if t.dist_timeout_s <= 0:
        bad("train.dist_timeout_s", "must be positive")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        bad("train.beta1/beta2", "must be in [0, 1)")
    if t.optimizer == "muon":
        if t.muon_lr <= 0 or not math.isfinite(t.muon_lr):
            bad("train.muon_lr", f"= {t.muon_lr} must be a positive number")
        if not 0.0 <= t.muon_momentum < 1.0:
            bad("train.muon_momentum", f"= {t.muon_momentum} must be in [0, 1)")
        if t.parallel == "fsdp":
            bad(
                "train.optimizer",
                "= muon needs whole weight matrices; FSDP shards them (use train.parallel=ddp)",
            )
    if m.logit_softcap < 0:
        bad("model.logit_softcap", f"= {m.logit_softcap} must not be negative (0 = off)")
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_last", "max_bad_steps"):
        if getattr(t, key) <= 0:
            bad(f"train.{key}", "must be positive")
    if not t.spike_factor > 1.0:
        bad("train.spike_factor", f"= {t.spike_factor} must be greater than 1")
    if t.spike_warmup < 0:
        bad("train.spike_warmup", "must not be negative")
    for i, stage in enumerate(cfg.run.stages):
        if stage not in RUN_STAGES:
            bad(f"run.stages[{i}]", f"= {stage!r} is not a stage ({', '.join(RUN_STAGES)})")
    for i, fmt in enumerate(cfg.run.export_formats):
        if fmt not in ("hf", "gguf"):
            bad(f"run.export_formats[{i}]", f"= {fmt!r} is not 'hf' or 'gguf'")
    if not 0.0 <= cfg.prepare.cda_ratio <= 1.0:
        bad("prepare.cda_ratio", f"= {cfg.prepare.cda_ratio} must be in [0, 1]")
    if cfg.prepare.bias_window < 0:
        bad("prepare.bias_window", "must not be negative (0 = within a sentence)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        bad("data.val_fraction", "must be in [0, 1)")
    pc = cfg.prepare
    if not 0.0 < pc.minhash_threshold <= 1.0:
        bad("prepare.minhash_threshold", "must be in (0, 1]")
    if pc.num_perm <= 0 or pc.shingle_size <= 0 or pc.decontam_ngram <= 0:
        bad("prepare.num_perm/shingle_size/decontam_ngram", "must be positive")
    if pc.bands < 0 or (pc.bands and pc.num_perm % pc.bands):
        bad("prepare.bands", f"= {pc.bands} must divide prepare.num_perm = {pc.num_perm}")
    for i, src in enumerate(pc.sources):
        if not src.path:
            bad(f"prepare.sources[{i}].path", "is required")
        if src.weight < 0:
            bad(f"prepare.sources[{i}].weight", "must not be negative")
    if cfg.tokenizer.kind == "bpe" and not cfg.tokenizer.path and cfg.tokenizer.vocab_size < 300:
        bad(
            "tokenizer.vocab_size", "must be at least 300 for byte-level BPE (256 bytes + specials)"
        )


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
