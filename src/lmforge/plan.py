"""Compute planning: parameters, FLOPs, memory, time, cost and energy of a training run,
and the compute-optimal model size for a budget.

Every figure comes from a closed form written out below, with its source:

- Parameters by group: `model.transformer.count_params` (checked against the model
  in the tests).
- FLOPs per token: `model.transformer.flops_per_token` — 2 FLOPs per multiply-add
  for every weight a token meets, plus 4·L·T·C for attention scores and values;
  training is 3× forward (Kaplan et al. 2020 §2.1; PaLM, Chowdhery et al. 2022,
  appendix B). It equals what `torch.utils.flop_counter` counts (test).
- Training FLOPs: FLOPs per token × tokens.
- Memory per device (bytes), AdamW with fp32 master weights (Rajbhandari et al.
  2020, ZeRO §3.1: 16 bytes per parameter): weights 4Φ, gradients 4Φ, Adam's two
  moments 8Φ. FSDP / ZeRO-3 shards all three over the data-parallel devices and
  all-gathers one block at a time (we count two gathered blocks in flight).
- Tensor parallelism over `tp` devices (Megatron-LM, Shoeybi et al. 2019, as
  `train.parallel = fsdp+tp` implements it): the attention and MLP matrices are
  split tp ways, so their weights, gradients and optimizer state divide by tp
  and then by the dp = devices / tp FSDP shards; embeddings, norms and the head
  stay whole on every TP rank (divided by dp only). Activations inside a block
  that are per head or per MLP hidden unit divide by tp; the residual stream,
  the norms' inputs and the loss head do not (no sequence or loss parallelism).
- Activations: the tensors autograd keeps for the backward pass, counted for
  *this* implementation, tensor by tensor, in the manner of Korthikanti et al.
  2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1);
  see :func:`activation_bytes`. Attention runs through SDPA's fused kernels,
  which keep no T×T score matrix — except bf16 training on a CPU with T ≤ 256,
  where `SmallCausalAttention` keeps the fp32 probabilities (H·T per token).
  With activation checkpointing (Chen et al. 2016) only each block's input is
  kept, plus one block's activations while it is recomputed.
- Peak: weights + optimizer state + max(activations + loss head, gradients) —
  gradients grow while activations are freed during the backward pass.
- Time: training FLOPs / (devices × peak FLOP/s × MFU) (MFU as defined in PaLM,
  appendix B). Default MFU 40% on GPUs (PaLM reports 46% at 540B; nanoGPT and
  torchtitan report 35–55% on H100/A100), 30% on CPU (measured here: 40% for
  nanoGPT's baby GPT on two cores); pass `--mfu` or a measured run.
- Cost: devices × hours × price per device-hour. Energy and CO2: the model of
  `lmforge.energy` (devices × board power × hours × PUE; × grid intensity), with its
  stated assumptions, the ones the report card and the model card use too.
- Compute-optimal size: Hoffmann et al. 2022 (Chinchilla) find parameters and
  tokens should grow equally with compute, about 20 tokens per parameter
  (Table 3; confirmed by the replication of Besiroglu et al. 2024). With a law
  L(N, D) = E + A/N^α + B/D^β fitted by `lmforge scale`, the optimum under
  C = 6ND is N* = G·(C/6)^(β/(α+β)) with G = (αA/(βB))^(1/(α+β)) (Hoffmann
  et al. 2022, eq. 4), D* = C/(6N*).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lmforge.components import MLPS, POSITIONS
from lmforge.config import ModelConfig
from lmforge.energy import DEVICES, GRID_KG_PER_KWH, PUE, Device, co2_kg, cpu_power_w, energy_kwh
from lmforge.model.arith import (
    SMALL_ATTENTION_MAX_T,
    count_params,
    derived_d_ff,
    flops_per_token,
)
from lmforge.model.presets import PRESETS

GiB = 1024**3


_ALIASES = {"A100": "A100-80", "RTX 4090": "RTX4090", "4090": "RTX4090"}

DEFAULT_MFU_GPU = 0.40
DEFAULT_MFU_CPU = 0.30
DEFAULT_PUE = PUE
DEFAULT_GRID_KG_PER_KWH = GRID_KG_PER_KWH
TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022


@dataclass(frozen=True)
class Costs:
    """What a device-hour costs in money and energy (None: the device's own figure)."""

    price: float | None = None  # US$ per device-hour
    power_w: float | None = None  # watts per device
    pue: float = DEFAULT_PUE
    grid_kg_per_kwh: float = DEFAULT_GRID_KG_PER_KWH


DEFAULT_COSTS = Costs()


class PlanError(ValueError):
    """A planning request that cannot be answered; the message names the option."""


# ----------------------------------------------------------------------------- parsing

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_quantity(text: str, what: str) -> float:
    """'1T', '300B', '2.5M', '1e21', '$500', '$1.2k' → a float."""
    m = re.fullmatch(r"\s*\$?\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgtp]?)\s*", text, re.I)
    if not m:
        raise PlanError(f"{what} = {text!r}: expected a number like 1T, 300B, 2.5e9 or $500")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def find_device(name: str) -> Device:
    key = _ALIASES.get(name, name)
    for k, dev in DEVICES.items():
        if k.lower() == key.lower():
            return dev
    raise PlanError(f"unknown GPU {name!r} (known: {', '.join(DEVICES)}, or cpu)")


def parse_gpus(spec: str) -> tuple[int, str]:
    """'8xH100' → (8, 'H100'); 'H100' → (1, 'H100'); '4' → (4, '')."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[x×*]\s*)?([A-Za-z][\w\- ]*)?\s*", spec)
    if spec.strip().isdigit():
        return int(spec), ""
    if not m or not m.group(2):
        raise PlanError(f"--gpus {spec!r}: expected COUNTxNAME such as 8xH100")
    return int(m.group(1) or 1), m.group(2).strip()


def cpu_device(dtype: str, measure: bool = True) -> Device:
    """This machine's CPU: measured matmul peak, total RAM, the energy model's power
    (`lmforge.energy.cpu_power_w`); the price is left to the user."""
    import torch

    from lmforge.hardware import measure_matmul_peak

    peak = (
        measure_matmul_peak(torch.bfloat16 if dtype == "bf16" else torch.float32)
        if measure
        else 0.0
    )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return Device("cpu", peak, ram, cpu_power_w(), 0.0, fp32_flops=peak)


# ----------------------------------------------------------------------------- memory


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def block_activation_elements(
    cfg: ModelConfig, small_attention: int = 0, tp: int = 1
) -> dict[str, int]:
    """Elements autograd keeps per token in one block of *our* transformer (× B·T per layer).

    Counted from `model/transformer.py` (C width, F MLP hidden, H heads, K kv heads, D head dim):

    | kept for backward                               | elements per token     |
    |-------------------------------------------------|------------------------|
    | attn_norm input (residual stream)               | C                      |
    | qkv input (norm output)                         | C                      |
    | q, k, v (SDPA inputs; after RoPE / GQA repeat)  | (H + 2K)·D, see below  |
    | SDPA output + its log-sum-exp                   | C + H                  |
    | proj input (heads merged, contiguous)           | C                      |
    | mlp_norm input, up input                        | 2·C                    |
    | GELU: up output, GELU output                    | 2·F                    |
    | SwiGLU: [gate; up], silu(gate), product         | 4·F                    |

    RoPE writes new q and k tensors (the fused qkv output stays alive for v);
    GQA's `repeat_interleave` writes new k and v of H·D each.

    `small_attention` = T: bf16/fp16 training on a CPU with T ≤ `SMALL_ATTENTION_MAX_T`,
    where `SmallCausalAttention` replaces SDPA. It keeps fp32 copies of q, k and v
    (3·C) and the fp32 probabilities (H·T per token) instead of SDPA's inputs, output
    and log-sum-exp; its output is the proj input. QK-norm's inputs ((H + K)·D) stay
    kept by the norms. `fp32` is the part of `total` held in 4 bytes whatever the dtype
    (besides the residual stream, which `activation_bytes` counts itself).

    With tensor parallelism over `tp` ranks, everything per head or per hidden unit
    divides by tp; the two norm inputs of each sub-layer (C each) stay whole.
    """
    C, H = cfg.d_model, cfg.n_heads
    K = cfg.n_kv_heads or H
    D = C // H
    mlp = 2 * C + MLPS[cfg.mlp].kept_activations(cfg) // tp
    if small_attention:
        fp32 = (3 * C + H * small_attention) // tp
        attn = C + C + (C + ((H + K) * D if cfg.qk_norm else 0)) // tp + fp32
        return {"attention": attn, "mlp": mlp, "total": attn + mlp, "fp32": fp32}
    qkv = (H + 2 * K) * D
    extra_qk = 0
    if POSITIONS[cfg.position].rotary:
        extra_qk += (H + K) * D  # rotated q and k
    if cfg.qk_norm:
        extra_qk += (H + K) * D
    if K != H:
        extra_qk += 2 * H * D  # repeated k and v
    attn = C + C + (qkv + extra_qk + C + H + C) // tp
    return {"attention": attn, "mlp": mlp, "total": attn + mlp, "fp32": 0}


def uses_small_attention(cfg: ModelConfig, seq_len: int, dtype: str, on_gpu: bool) -> bool:
    """Whether training runs attention through `SmallCausalAttention` (see the model)."""
    return (
        not on_gpu
        and dtype == "bf16"
        and cfg.objective == "causal"
        and not cfg.dropout
        and seq_len <= SMALL_ATTENTION_MAX_T
    )


def activation_bytes(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    dtype: str = "fp32",
    checkpointing: bool = False,
    on_gpu: bool = True,
    tp: int = 1,
) -> dict[str, float]:
    """Bytes of activations kept between forward and backward, per device.

    Under bf16 autocast the matmul inputs/outputs are kept in 2 bytes while the
    residual stream (norm inputs) stays fp32. The loss head keeps the logits'
    log-softmax (B·T·V fp32). `transient` is the largest set of gradients that
    exists at once on top of the kept tensors early in the backward pass.
    """
    BT = micro_batch * seq_len
    small = uses_small_attention(cfg, seq_len, dtype, on_gpu)
    per = block_activation_elements(cfg, seq_len if small else 0, tp)
    C, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    half = _bytes(dtype)
    fp32_elems = 2 * C + per["fp32"]  # attn_norm and mlp_norm inputs stay in fp32
    block = BT * (fp32_elems * 4 + (per["total"] - fp32_elems) * half)
    head = BT * (2 * C * 4 + V * 4)  # final norm input and output, log-softmax
    # With checkpointing: each block's input (the residual stream, fp32), plus one
    # block's activations while it is recomputed.
    blocks = L * BT * C * 4 + block if checkpointing else L * block
    # Transient at the start of the backward pass, on top of what is kept: either the
    # loss head's two B·T·V fp32 gradients, or the widest gradients inside a block's
    # MLP (GELU: the gradients of the GELU output and input, 2·F; SwiGLU: 4·F), or
    # those of the small CPU attention.
    mlp_grads = MLPS[cfg.mlp].kept_activations(cfg)
    transient = max(2 * BT * V * 4, BT * mlp_grads // tp * half)
    if small:  # SmallCausalAttention's backward, in fp32: the output gradient, the q/k/v
        # gradients (4·C), and the probability gradients, which become the scores' in place
        transient = max(transient, BT * (cfg.n_heads * seq_len + 4 * cfg.d_model) // tp * 4)
    return {
        "blocks": float(blocks),
        "head": float(head),
        "transient": float(transient),
        "total": float(blocks + head + transient),
    }


@dataclass
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_checkpointed: float
    peak: float
    peak_checkpointed: float


def memory_per_device(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    dtype: str = "fp32",
    shards: int = 1,
    on_gpu: bool = True,
    tp: int = 1,
) -> Memory:
    """Bytes per device for weights, gradients, AdamW state and activations (see module doc).

    `shards` > 1 means FSDP/ZeRO-3 over that many data-parallel devices; `tp` > 1,
    tensor parallelism over that many (the devices are shards × tp).
    """
    groups = count_params(cfg)
    split = groups["attention"] + groups["mlp"]  # the matrices TP divides
    n = groups["total"] - split + split / tp  # parameters on one TP rank
    weights, grads, opt = 4.0 * n / shards, 4.0 * n / shards, 8.0 * n / shards
    if shards > 1:
        per_block = split / tp / cfg.n_layers
        weights += 2 * per_block * _bytes(dtype)  # two gathered blocks in flight
    if dtype == "bf16":
        weights += 2.0 * n / shards  # autocast's bf16 copies of the weights, cached per step
    act = activation_bytes(cfg, micro_batch, seq_len, dtype, on_gpu=on_gpu, tp=tp)["total"]
    act_ckpt = activation_bytes(
        cfg, micro_batch, seq_len, dtype, checkpointing=True, on_gpu=on_gpu, tp=tp
    )["total"]
    return Memory(
        weights,
        grads,
        opt,
        act,
        act_ckpt,
        weights + opt + max(act, grads),
        weights + opt + max(act_ckpt, grads),
    )


# ----------------------------------------------------------------------------- the plan


@dataclass
class Hardware:
    device: Device
    count: int = 1  # devices per node
    nodes: int = 1
    dtype: str = "bf16"

    @property
    def devices(self) -> int:
        return self.count * self.nodes

    @property
    def peak_per_device(self) -> float:
        if self.dtype == "bf16":
            return self.device.peak_flops
        return self.device.fp32_flops or self.device.peak_flops / 2


@dataclass
class Plan:
    model: dict[str, Any]
    params: dict[str, int]
    flops_per_token: float
    hardware: dict[str, Any]
    seq_len: int
    micro_batch: int
    tokens: float
    training_flops: float
    tokens_per_param: float
    memory_gib: dict[str, float]
    fits: dict[str, bool]
    mfu: float
    hours: float
    cost: float
    energy_kwh: float
    co2_kg: float
    assumptions: dict[str, Any] = field(default_factory=dict)
    recommendation: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # When FSDP alone does not fit: the smallest TP size that does, and its mesh and memory.
    tensor_parallel: dict[str, Any] = field(default_factory=dict)


def model_config(preset: str = "", vocab_size: int = 0, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a preset name plus field overrides (vocab 0 → 32,000 for planning)."""
    fields: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise PlanError(f"unknown preset {preset!r} (see `lmforge plan --list`)")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if vocab_size:
        fields["vocab_size"] = vocab_size
    cfg = ModelConfig(preset=preset, **{k: v for k, v in fields.items() if k != "preset"})
    if not cfg.vocab_size:
        cfg = replace(cfg, vocab_size=32000)
    return cfg


def make_plan(
    cfg: ModelConfig,
    hw: Hardware,
    seq_len: int = 0,
    micro_batch: int = 1,
    *,
    mfu: float = 0.0,
    costs: Costs = DEFAULT_COSTS,
    fsdp: bool | None = None,
    tp: int = 1,
    **target: float,
) -> Plan:
    """Everything about training `cfg` on `hw` toward one target: `tokens`, `flops`,
    `hours` or `budget` (money).

    With no target, the compute-optimal token count (20 tokens per parameter) is used.
    `tp` > 1: tensor parallelism in groups of `tp` devices of a node, FSDP across groups.
    """
    T = seq_len or cfg.context_length
    if cfg.context_length < T:
        cfg = replace(cfg, context_length=T)
    params = count_params(cfg)
    n = params["total"]
    fpt = float(flops_per_token(cfg, T))
    on_gpu = hw.device.name != "cpu"
    mfu = mfu or (DEFAULT_MFU_GPU if on_gpu else DEFAULT_MFU_CPU)
    price = hw.device.price_per_hour if costs.price is None else costs.price
    power = hw.device.power_w if costs.power_w is None else costs.power_w
    throughput = hw.devices * hw.peak_per_device * mfu  # achieved FLOP/s
    if throughput <= 0:
        raise PlanError("the hardware has no known peak FLOP/s")
    notes: list[str] = []
    tokens = _target_tokens(n, fpt, throughput, hw.devices, price, target, notes)
    total_flops = fpt * tokens
    hours = total_flops / throughput / 3600
    check_tp(cfg, hw, tp)
    sharded = fsdp if fsdp is not None else hw.devices > tp
    shard = hw.devices // tp if sharded else 1
    mem = memory_per_device(cfg, micro_batch, T, hw.dtype, shard, on_gpu=on_gpu, tp=tp)
    usable = USABLE_MEMORY_FRACTION * hw.device.memory_gib * GiB
    fits = {"plain": mem.peak <= usable, "checkpointed": mem.peak_checkpointed <= usable}
    suggestion = suggest_tp(cfg, hw, micro_batch, T, usable) if tp == 1 and sharded else {}
    notes += _fit_notes(fits, suggestion)
    energy = energy_kwh(hours, power, hw.devices, costs.pue)
    return Plan(
        model={
            k: v for k, v in asdict(cfg).items() if k not in ("init_std", "norm_eps", "dropout")
        },
        params=params,
        flops_per_token=fpt,
        hardware=_hardware_record(hw, shard, tp),
        seq_len=T,
        micro_batch=micro_batch,
        tokens=tokens,
        training_flops=total_flops,
        tokens_per_param=tokens / n,
        memory_gib={k: v / GiB for k, v in asdict(mem).items()},
        fits=fits,
        mfu=mfu,
        hours=hours,
        cost=hours * hw.devices * price,
        energy_kwh=energy,
        co2_kg=co2_kg(energy, costs.grid_kg_per_kwh),
        assumptions={
            "price_per_device_hour": price,
            "power_w_per_device": power,
            "pue": costs.pue,
            "grid_kg_co2_per_kwh": costs.grid_kg_per_kwh,
            "usable_memory_fraction": USABLE_MEMORY_FRACTION,
        },
        notes=notes,
        tensor_parallel=suggestion,
    )


# Leave ~10% of the device for the CUDA context, allocator fragmentation and buffers.
USABLE_MEMORY_FRACTION = 0.9


def _budget_hours(budget: float, price: float, devices: int) -> float:
    """Device-hours a budget in money buys, spread over `devices`."""
    if price <= 0:
        raise PlanError("--budget needs a price per device-hour (--price)")
    return budget / (price * devices)


def _target_tokens(
    n_params: int,
    fpt: float,
    throughput: float,
    devices: int,
    price: float,
    target: dict[str, float],
    notes: list[str],
) -> float:
    """Training tokens for the one target given (money → hours → FLOPs → tokens);
    with none, Chinchilla's 20 tokens per parameter (said in `notes`)."""
    unknown = set(target) - {"tokens", "flops", "hours", "budget"}
    if unknown:
        raise TypeError(f"make_plan: unknown target {', '.join(sorted(unknown))}")
    if sum(bool(x) for x in target.values()) > 1:
        raise PlanError("give one target: --tokens, --flops, --hours or --budget")
    tokens, flops = target.get("tokens", 0.0), target.get("flops", 0.0)
    hours, budget = target.get("hours", 0.0), target.get("budget", 0.0)
    if budget:
        hours = _budget_hours(budget, price, devices)
    if hours:
        flops = hours * 3600 * throughput
    if flops:
        tokens = flops / fpt
    if not tokens:
        tokens = TOKENS_PER_PARAM * n_params
        notes.append(f"no target given: {TOKENS_PER_PARAM:.0f} tokens/parameter (Chinchilla)")
    return tokens


def _fit_notes(fits: dict[str, bool], suggestion: dict[str, Any]) -> list[str]:
    """What the plan says about fitting in memory: a TP suggestion, checkpointing."""
    notes = [suggestion["note"]] if suggestion else []
    if not fits["checkpointed"]:
        notes.append(
            "does not fit even with activation checkpointing: lower the micro-batch, "
            "shard over more devices, or use tensor/pipeline parallelism"
        )
    elif not fits["plain"]:
        notes.append("fits only with activation checkpointing (≈ +33% compute for the recompute)")
    return notes


def _hardware_record(hw: Hardware, shard: int, tp: int) -> dict[str, Any]:
    return {
        "device": hw.device.name,
        "devices": hw.devices,
        "nodes": hw.nodes,
        "dtype": hw.dtype,
        "peak_flops_per_device": hw.peak_per_device,
        "memory_gib_per_device": hw.device.memory_gib,
        "fsdp_shards": shard,
        "tp": tp,
    }


def check_tp(cfg: ModelConfig, hw: Hardware, tp: int) -> None:
    """TP groups live inside a node and hold whole heads (see `train.tensor_parallel`)."""
    if tp == 1:
        return
    kv = cfg.n_kv_heads or cfg.n_heads
    if hw.count % tp:
        raise PlanError(f"--tp {tp} must divide the devices per node ({hw.count})")
    if cfg.n_heads % tp or kv % tp or derived_d_ff(cfg) % tp:
        raise PlanError(
            f"--tp {tp} must divide the heads ({cfg.n_heads}), kv heads ({kv}) "
            f"and MLP width ({derived_d_ff(cfg)})"
        )


def suggest_tp(
    cfg: ModelConfig, hw: Hardware, micro_batch: int, seq_len: int, usable: float
) -> dict[str, Any]:
    """The smallest TP size (within a node) with which the model fits when FSDP alone
    does not fit without activation checkpointing; {} when FSDP alone fits or TP cannot help.

    Prefers a TP size that fits without checkpointing (saving its ≈ 33% recompute)
    over FSDP alone with checkpointing.
    """
    on_gpu = hw.device.name != "cpu"
    alone = memory_per_device(cfg, micro_batch, seq_len, hw.dtype, hw.devices, on_gpu=on_gpu)
    if alone.peak <= usable:
        return {}
    for checkpointed in (False, True):
        if checkpointed and alone.peak_checkpointed <= usable:
            return {}  # checkpointing alone is enough (the plan's note says so)
        tp = 2
        while tp <= hw.count:
            try:
                check_tp(cfg, hw, tp)
            except PlanError:
                tp *= 2
                continue
            dp = hw.devices // tp
            mem = memory_per_device(cfg, micro_batch, seq_len, hw.dtype, dp, on_gpu, tp)
            peak = mem.peak_checkpointed if checkpointed else mem.peak
            if peak <= usable:
                how = " with activation checkpointing" if checkpointed else ""
                fsdp_peak = alone.peak_checkpointed if checkpointed else alone.peak
                note = (
                    f"FSDP alone needs {fsdp_peak / GiB:.2f} GiB per device{how}: "
                    f"tensor parallelism fits, {peak / GiB:.2f} GiB{how} with "
                    f"--train.parallel=fsdp+tp --train.tp={tp} (mesh dp × tp = {dp} × {tp})"
                )
                return {"tp": tp, "dp": dp, "checkpointed": checkpointed,
                        "peak_gib": peak / GiB, "note": note}  # fmt: skip
            tp *= 2
    return {}


# ----------------------------------------------------------------------------- sizing


def chinchilla_optimum(compute: float, law: dict[str, float] | None = None) -> tuple[float, float]:
    """(parameters, tokens) minimising loss for `compute` FLOPs under C = 6·N·D.

    Without a fitted law: D = 20·N (Hoffmann et al. 2022), so N = sqrt(C / 120).
    With a law {E, A, B, alpha, beta}: Hoffmann et al. eq. 4 (see module doc).
    """
    if law:
        a, b = law["alpha"], law["beta"]
        g = (a * law["A"] / (b * law["B"])) ** (1 / (a + b))
        n = g * (compute / 6) ** (b / (a + b))
        return n, compute / (6 * n)
    n = math.sqrt(compute / (6 * TOKENS_PER_PARAM))
    return n, TOKENS_PER_PARAM * n


def shape_for_params(target: float, vocab_size: int = 32000, seq_len: int = 2048) -> ModelConfig:
    """A Llama-style shape whose parameter count is closest to `target`.

    Width ≈ 96 × depth (between GPT-2 124M's 64 and Llama 3 8B's 128; Kaplan et
    al. 2020, fig. 5, find loss nearly flat in this aspect-ratio range), width a
    multiple of 128, head dimension 64 below width 2048 and 128 from there, GQA
    with 4 query heads per kv head once there are at least 8 heads.
    """
    best: ModelConfig | None = None
    best_err = math.inf
    for layers in range(2, 129):
        d = max(128, 128 * round(96 * layers / 128))
        head_dim = 128 if d >= 2048 else 64
        heads = d // head_dim
        kv = max(k for k in range(1, heads // 4 + 1) if heads % k == 0) if heads >= 8 else heads
        cfg = model_config(
            "",
            vocab_size=vocab_size,
            n_layers=layers,
            d_model=d,
            n_heads=heads,
            n_kv_heads=kv,
            norm="rmsnorm",
            position="rope",
            mlp="swiglu",
            bias=False,
            tie_embeddings=d < 2048,
            context_length=seq_len,
        )
        err = abs(math.log(count_params(cfg)["total"] / target))
        if err < best_err:
            best, best_err = cfg, err
    assert best is not None
    return best


def nearest_preset(n_params: float, vocab_size: int = 0) -> str:
    best, err = "", math.inf
    for name in PRESETS:
        cfg = model_config(
            name, vocab_size=vocab_size if not PRESETS[name].get("vocab_size") else 0
        )
        e = abs(math.log(count_params(cfg)["total"] / n_params))
        if e < err:
            best, err = name, e
    return best


def recommend(
    hw: Hardware,
    vocab_size: int = 32000,
    seq_len: int = 2048,
    micro_batch: int = 1,
    law: dict[str, float] | None = None,
    *,
    mfu: float = 0.0,
    costs: Costs = DEFAULT_COSTS,
    fsdp: bool | None = None,
    **budget: float,
) -> Plan:
    """The compute-optimal model and token count for a budget: `budget` (money), `hours`
    or `flops`."""
    unknown = set(budget) - {"budget", "hours", "flops"}
    if unknown:
        raise TypeError(f"recommend: unknown budget {', '.join(sorted(unknown))}")
    on_gpu = hw.device.name != "cpu"
    mfu = mfu or (DEFAULT_MFU_GPU if on_gpu else DEFAULT_MFU_CPU)
    price = hw.device.price_per_hour if costs.price is None else costs.price
    hours, flops = budget.get("hours", 0.0), budget.get("flops", 0.0)
    if budget.get("budget"):
        hours = _budget_hours(budget["budget"], price, hw.devices)
    if hours:
        flops = hours * 3600 * hw.devices * hw.peak_per_device * mfu
    if not flops:
        raise PlanError("give a budget: --budget '$500', --hours or --flops")
    n_opt, d_opt = chinchilla_optimum(flops, law)
    cfg = shape_for_params(n_opt, vocab_size, seq_len)
    plan = make_plan(cfg, hw, seq_len, micro_batch, flops=flops, mfu=mfu, costs=costs, fsdp=fsdp)
    plan.recommendation = {
        "compute_flops": flops,
        "rule": "fitted law (lmforge scale)" if law else "Chinchilla: 20 tokens/parameter",
        "optimal_params": n_opt,
        "optimal_tokens": d_opt,
        "shape": f"{cfg.n_layers} layers, width {cfg.d_model}, {cfg.n_heads} heads "
        f"({cfg.n_kv_heads} kv), SwiGLU {derived_d_ff(cfg)}, vocab {cfg.vocab_size}",
        "nearest_preset": nearest_preset(n_opt, vocab_size),
    }
    return plan


def load_law(path: str | Path) -> dict[str, float]:
    """The fitted law written by `lmforge scale` (scale.json)."""
    data = json.loads(Path(path).read_text())
    law = data.get("fit", data)
    missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in law]
    if missing:
        raise PlanError(f"{path}: not a fitted scaling law (missing {', '.join(missing)})")
    return {k: float(law[k]) for k in ("E", "A", "B", "alpha", "beta")}


# ----------------------------------------------------------------------------- display


def human(x: float, unit: str = "") -> str:
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def format_duration_hours(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def format_plan(plan: Plan) -> str:
    p, m, hw = plan.params, plan.memory_gib, plan.hardware
    lines = []
    if plan.recommendation:
        r = plan.recommendation
        lines += [
            f"compute budget        {r['compute_flops']:.3g} FLOPs ({r['rule']})",
            f"compute-optimal size  {human(r['optimal_params'])} parameters, "
            f"{human(r['optimal_tokens'])} tokens",
            f"suggested shape       {r['shape']}",
            f"nearest preset        {r['nearest_preset']}",
            "",
        ]
    cfg = plan.model
    lines.append(
        f"model                 {cfg.get('preset') or 'custom'}: {cfg['n_layers']} layers, width "
        f"{cfg['d_model']}, {cfg['n_heads']} heads, {cfg['objective']}"
    )
    lines.append(f"parameters            {human(p['total'])} ({p['total']:,})")
    for group in ("embedding", "position", "attention", "mlp", "norms", "lm_head"):
        if p[group]:
            lines.append(f"  {group:<20}{human(p[group]):>8}  {100 * p[group] / p['total']:5.1f}%")
    lines += [
        f"FLOPs per token       {human(plan.flops_per_token)} (training, sequence {plan.seq_len})",
        f"tokens                {human(plan.tokens)} ({plan.tokens_per_param:.1f} per parameter)",
        f"training FLOPs        {plan.training_flops:.3g}",
        f"hardware              {hw['devices']} × {hw['device']}"
        + (f" ({hw['nodes']} nodes)" if hw["nodes"] > 1 else "")
        + f", {hw['dtype']}, {human(hw['peak_flops_per_device'], 'FLOP/s')} peak each",
        f"memory per device     micro-batch {plan.micro_batch} × {plan.seq_len}"
        + (f", FSDP over {hw['fsdp_shards']}" if hw["fsdp_shards"] > 1 else "")
        + (f", TP over {hw['tp']}" if hw.get("tp", 1) > 1 else "")
        + f" (of {hw['memory_gib_per_device']:.0f} GiB)",
        f"  weights             {m['weights']:10.2f} GiB",
        f"  gradients           {m['gradients']:10.2f} GiB",
        f"  optimizer (AdamW)   {m['optimizer']:10.2f} GiB",
        f"  activations         {m['activations']:10.2f} GiB "
        f"({m['activations_checkpointed']:.2f} with activation checkpointing)",
        f"  peak                {m['peak']:10.2f} GiB  {'fits' if plan.fits['plain'] else 'does NOT fit'}",
        f"  peak, checkpointed  {m['peak_checkpointed']:10.2f} GiB  "
        f"{'fits' if plan.fits['checkpointed'] else 'does NOT fit'}",
        f"time                  {format_duration_hours(plan.hours)} at {100 * plan.mfu:.0f}% MFU",
        f"cost                  ${plan.cost:,.0f} at ${plan.assumptions['price_per_device_hour']:.2f} "
        "per device-hour",
        f"energy                {plan.energy_kwh:,.0f} kWh ({plan.assumptions['power_w_per_device']:.0f} W "
        f"per device, PUE {plan.assumptions['pue']})",
        f"CO2                   {plan.co2_kg:,.0f} kg CO2e at {plan.assumptions['grid_kg_co2_per_kwh']} "
        "kg/kWh",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def list_presets(vocab_size: int = 0) -> list[dict[str, Any]]:
    rows = []
    for name, fields in PRESETS.items():
        cfg = model_config(name, vocab_size=0 if fields.get("vocab_size") else vocab_size)
        family = "llama" if cfg.mlp == "swiglu" else "gpt2"
        rows.append(
            {
                "preset": name,
                "family": family,
                "objective": cfg.objective,
                "layers": cfg.n_layers,
                "width": cfg.d_model,
                "heads": cfg.n_heads,
                "kv_heads": cfg.n_kv_heads or cfg.n_heads,
                "context": cfg.context_length,
                "vocab": cfg.vocab_size,
                "params": count_params(cfg)["total"],
            }
        )
    return rows


def format_presets(rows: list[dict[str, Any]]) -> str:
    head = f"{'preset':<16}{'family':<7}{'objective':<10}{'layers':>7}{'width':>7}{'heads':>6}"
    head += f"{'kv':>4}{'context':>8}{'vocab':>8}{'params':>9}"
    out = [head]
    for r in rows:
        out.append(
            f"{r['preset']:<16}{r['family']:<7}{r['objective']:<10}{r['layers']:>7}{r['width']:>7}"
            f"{r['heads']:>6}{r['kv_heads']:>4}{r['context']:>8}{r['vocab']:>8}{human(r['params']):>9}"
        )
    out.append("(presets without their own vocabulary are shown with 32,000 tokens)")
    return "\n".join(out)
