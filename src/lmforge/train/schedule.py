"""Learning-rate schedules: a pure function of the step, so resuming needs no state."""

from __future__ import annotations

import math

from lmforge.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    - linear warm-up over `warmup_steps` (Goyal et al. 2017);
    - cosine: half-cosine from lr to lr·min_lr_ratio (Loshchilov & Hutter 2017);
    - wsd: warmup-stable-decay, constant then a linear decay over the last
      `decay_fraction` of steps (Hu et al. 2024, MiniCPM);
    - constant.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    total = cfg.max_steps
    if cfg.schedule == "wsd":
        decay_start = int(total * (1 - cfg.decay_fraction))
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, total - decay_start)
        return peak + (floor - peak) * min(frac, 1.0)
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))
