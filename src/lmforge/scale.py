"""`lmforge scale`: fit a scaling law on the user's own data and predict a larger run.

1. A ladder of small models is trained on an iso-FLOP grid (Hoffmann et al. 2022,
   "approach 2"): for each compute budget C, several sizes N, each trained on
   D = C / flops_per_token(N) tokens with its cosine schedule ending at D.
2. L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2) is fitted to the final
   validation losses, as Chinchilla does: Huber loss (δ = 1e-3) on log L, written as
   log L = LSE(a − α log N, b − β log D, e) with A = eᵃ, B = eᵇ, E = eᵉ, minimised
   by L-BFGS from a grid of starting points (their appendix D.2). Uncertainty: a
   bootstrap over rungs (resample the rungs, refit) gives intervals for every
   parameter and for the prediction.
3. A held-out rung at a larger budget (the shape the fit finds compute-optimal
   there, or with `held_out="larger"` the smallest shape larger than every rung)
   is predicted from the fit, then trained and measured; `scale.json` holds the fit, the prediction and the measurement,
   `scale.png` the plot.

Each rung is an ordinary `pretrain` run in its own folder; finished rungs (with
a `summary.json`) are skipped, so an interrupted ladder resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import Config, ModelConfig
from lmforge.fileio import write_text_atomic
from lmforge.model.transformer import count_params, flops_per_token
from lmforge.train.dist import print0

# Ladder shapes (layers, width, heads): from ~20k to ~1M parameters for a small vocabulary.
DEFAULT_SHAPES: list[tuple[int, int, int]] = [
    (1, 16, 2),
    (1, 24, 2),
    (2, 24, 2),
    (1, 32, 2),
    (2, 32, 2),
    (2, 48, 2),
    (2, 64, 4),
    (3, 96, 4),
    (4, 128, 4),
]
MIN_TOKENS_PER_PARAM = 4.0  # outside this band a rung says little about the optimum
MAX_TOKENS_PER_PARAM = 250.0
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, appendix D.2


def shape_config(base: ModelConfig, layers: int, width: int, heads: int) -> ModelConfig:
    return replace(base, n_layers=layers, d_model=width, n_heads=heads, n_kv_heads=0, d_ff=0)


def plan_ladder(
    base: ModelConfig,
    budgets: list[float],
    shapes: list[tuple[int, int, int]],
    tokens_per_step: int,
    max_per_budget: int = 4,
) -> list[dict[str, Any]]:
    """Rungs for each budget: shapes whose token count D = C / FLOPs-per-token is sensible."""
    rungs = []
    for c in budgets:
        chosen = []
        for layers, width, heads in shapes:
            cfg = shape_config(base, layers, width, heads)
            n = count_params(cfg)["total"]
            steps = max(1, round(c / flops_per_token(cfg) / tokens_per_step))
            tokens = steps * tokens_per_step
            if MIN_TOKENS_PER_PARAM <= tokens / n <= MAX_TOKENS_PER_PARAM:
                chosen.append(
                    {
                        "budget": c,
                        "shape": [layers, width, heads],
                        "params": n,
                        "steps": steps,
                        "tokens": tokens,
                        "flops": flops_per_token(cfg) * tokens,
                    }
                )
        # Keep an even spread of sizes around the middle of the band.
        if len(chosen) > max_per_budget:
            idx = np.linspace(0, len(chosen) - 1, max_per_budget).round().astype(int)
            chosen = [chosen[i] for i in sorted(set(idx))]
        rungs += chosen
    return rungs


# ----------------------------------------------------------------------------- fitting


def law_loss(params: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Predicted loss for the fit parameters (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = params
    return np.exp(a - alpha * np.log(n)) + np.exp(b - beta * np.log(d)) + np.exp(e)


def _objective(params: np.ndarray, n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> float:
    a, b, e, alpha, beta = params
    terms = np.stack([a - alpha * np.log(n), b - beta * np.log(d), np.full_like(n, e)])
    lse = np.logaddexp.reduce(terms, axis=0)
    r = lse - np.log(loss)
    huber = np.where(
        np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)
    )
    return float(huber.sum())


def fit_law(
    n: np.ndarray, d: np.ndarray, loss: np.ndarray, starts: list[np.ndarray] | None = None
) -> dict[str, Any]:
    """Fit E + A/N^α + B/D^β (Huber on log loss, L-BFGS-B from a grid of starts)."""
    from scipy.optimize import minimize

    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    if starts is None:
        e0 = math.log(max(loss.min() * 0.7, 1e-3))
        starts = [
            np.array([a0, b0, e0, alpha0, beta0])
            for a0 in (0.0, 5.0, 10.0)
            for b0 in (0.0, 5.0, 10.0)
            for alpha0 in (0.3, 0.8)
            for beta0 in (0.3, 0.8)
        ]
    best = None
    for x0 in starts:
        res = minimize(
            _objective,
            x0,
            args=(n, d, loss),
            method="L-BFGS-B",
            bounds=[(-10, 40), (-10, 40), (-5, 3), (0.0, 3.0), (0.0, 3.0)],
        )
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None
    a, b, e, alpha, beta = best.x
    return {
        "E": math.exp(e),
        "A": math.exp(a),
        "B": math.exp(b),
        "alpha": float(alpha),
        "beta": float(beta),
        "objective": float(best.fun),
        "_x": best.x.tolist(),
    }


def predict(fit: dict[str, Any], n: float, d: float) -> float:
    return float(law_loss(np.asarray(fit["_x"]), np.array([n]), np.array([d]))[0])


def bootstrap(
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    target: tuple[float, float],
    samples: int,
    seed: int,
    x0: list[float],
) -> dict[str, Any]:
    """Refit on rungs resampled with replacement; 5–95% intervals of parameters and prediction."""
    rng = np.random.default_rng(seed)
    rows: list[list[float]] = []
    k = len(n)
    for _ in range(samples):
        idx = rng.integers(0, k, size=k)
        if len(set(idx.tolist())) < 4:
            continue
        # Start from the full-data fit (and the grid's corners would cost 36× more).
        f = fit_law(n[idx], d[idx], loss[idx], starts=[np.asarray(x0)])
        rows.append([f["E"], f["A"], f["B"], f["alpha"], f["beta"], predict(f, *target)])
    arr = np.array(rows)
    names = ["E", "A", "B", "alpha", "beta", "prediction"]
    return {
        name: {
            "p05": float(np.percentile(arr[:, i], 5)),
            "p50": float(np.percentile(arr[:, i], 50)),
            "p95": float(np.percentile(arr[:, i], 95)),
        }
        for i, name in enumerate(names)
    } | {"samples": len(rows)}


# ----------------------------------------------------------------------------- running


def run_rung(cfg: Config, rung: dict[str, Any], out: Path, tokens_per_step: int) -> dict[str, Any]:
    """Train one rung with `pretrain` (skipped when its summary exists) and return its record."""
    from lmforge.pretrain import pretrain

    layers, width, heads = rung["shape"]
    name = f"L{layers}_d{width}_s{rung['steps']}"
    run_dir = out / "rungs" / name
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        steps = rung["steps"]
        rcfg = replace(
            cfg,
            model=shape_config(cfg.model, layers, width, heads),
            train=replace(
                cfg.train,
                max_steps=steps,
                tokens_per_step=tokens_per_step,
                warmup_steps=max(1, min(cfg.train.warmup_steps, steps // 10)),
                eval_every=steps,
                log_every=max(1, steps // 5),
                checkpoint_every=steps,
                keep_last=1,
            ),
            output=replace(cfg.output, dir=str(run_dir)),
        )
        t0 = time.perf_counter()
        summary = pretrain(rcfg, resume="auto")  # an interrupted rung continues
        summary["wall_s"] = time.perf_counter() - t0
        write_text_atomic(summary_path, json.dumps(summary, indent=1))
    summary = json.loads(summary_path.read_text())
    return {
        **rung,
        "name": name,
        "val_loss": summary["val_loss"],
        "wall_s": summary.get("wall_s", 0.0),
    }


def _tokenized(cfg: Config, out: Path) -> Config:
    """Train the tokenizer and tokenize the data into `out`; `cfg` pointing at both."""
    from lmforge.pretrain import tokenize_stage, tokenizer_stage

    tok = tokenizer_stage(cfg, out)
    tokens_dir = tokenize_stage(cfg, tok, out)
    cfg = replace(
        cfg,
        data=replace(cfg.data, tokens_dir=str(tokens_dir)),
        tokenizer=replace(
            cfg.tokenizer,
            path=str(out / "tokenizer.json") if not cfg.tokenizer.path else cfg.tokenizer.path,
        ),
        model=replace(cfg.model, vocab_size=cfg.model.vocab_size or tok.vocab_size, preset=""),
    )
    if not cfg.tokenizer.path or not Path(cfg.tokenizer.path).exists():
        tok.save(out / "tokenizer.json")
    return cfg


def _held_out_rung(
    cfg: Config,
    fit: dict[str, Any],
    ladder_max_params: float,
    predict_flops: float,
    shapes: list[tuple[int, int, int]],
    tps: int,
    held_out: str,
) -> dict[str, Any]:
    """The rung to predict at `predict_flops`: the compute-optimal shape by the fit, or
    (held_out = "larger") the smallest shape larger than every rung of the ladder."""
    candidates = plan_ladder(cfg.model, [predict_flops], shapes, tps, max_per_budget=len(shapes))
    if not candidates:
        raise ValueError(f"no shape fits the held-out budget {predict_flops:.2g}")
    if held_out == "larger":
        # Extrapolate in N as well as in compute: the smallest shape larger than every rung.
        bigger = [r for r in candidates if r["params"] > ladder_max_params]
        if not bigger:
            raise ValueError(f"no shape at {predict_flops:.2g} FLOPs is larger than the ladder's")
        return min(bigger, key=lambda r: r["params"])
    # the compute-optimal shape by the fit
    return min(candidates, key=lambda r: predict(fit, r["params"], r["tokens"]))


def scale(
    cfg: Config,
    out: str | Path,
    budgets: list[float],
    predict_flops: float = 0.0,
    shapes: list[tuple[int, int, int]] | None = None,
    bootstrap_samples: int = 100,
    held_out: str = "optimal",
) -> dict[str, Any]:
    """Train the ladder, fit the law, predict and then train the held-out rung; write scale.json/png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cfg = _tokenized(cfg, out)
    shapes = shapes or DEFAULT_SHAPES
    tps = cfg.train.tokens_per_step
    ladder = plan_ladder(cfg.model, budgets, shapes, tps)
    if len(ladder) < 5:
        raise ValueError(
            f"only {len(ladder)} rungs fit the budgets {budgets} (need ≥ 5 for a 5-parameter fit): "
            "widen --budgets"
        )
    print0(f"scale: {len(ladder)} rungs on budgets {', '.join(f'{c:.2g}' for c in budgets)} FLOPs")
    results = []
    for i, rung in enumerate(ladder):
        print0(
            f"scale: rung {i + 1}/{len(ladder)}: shape {rung['shape']}, {rung['params']:,} params, "
            f"{rung['tokens']:,} tokens, {rung['flops']:.2g} FLOPs"
        )
        results.append(run_rung(cfg, rung, out, tps))
    n = np.array([r["params"] for r in results], dtype=np.float64)
    d = np.array([r["tokens"] for r in results], dtype=np.float64)
    loss = np.array([r["val_loss"] for r in results], dtype=np.float64)
    fit = fit_law(n, d, loss)

    # The held-out rung: the largest shape's neighbourhood at a larger budget, sized by the fit.
    predict_flops = predict_flops or 3 * max(budgets)
    best = _held_out_rung(cfg, fit, float(n.max()), predict_flops, shapes, tps, held_out)
    predicted = predict(fit, best["params"], best["tokens"])
    boot = bootstrap(
        n, d, loss, (best["params"], best["tokens"]), bootstrap_samples, cfg.train.seed, fit["_x"]
    )
    print0(
        f"scale: fit E={fit['E']:.3f} A={fit['A']:.3g} α={fit['alpha']:.3f} B={fit['B']:.3g} "
        f"β={fit['beta']:.3f}; held-out rung {best['shape']} ({best['params']:,} params, "
        f"{best['tokens']:,} tokens): predicted loss {predicted:.4f} "
        f"[{boot['prediction']['p05']:.4f}, {boot['prediction']['p95']:.4f}]"
    )
    held = run_rung(cfg, best, out, tps)
    error = (predicted - held["val_loss"]) / held["val_loss"]
    print0(f"scale: held-out measured {held['val_loss']:.4f}; prediction error {100 * error:+.2f}%")
    report = {
        "fit": {k: v for k, v in fit.items() if not k.startswith("_")},
        "fit_x": fit["_x"],
        "bootstrap": boot,
        "rungs": results,
        "held_out": {**held, "predicted": predicted, "relative_error": error},
        "wall_s": time.perf_counter() - t_start,
        "loss_unit": "nats per token (validation)",
    }
    write_text_atomic(out / "scale.json", json.dumps(report, indent=1))
    plot(report, out / "scale.png")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Validation loss against compute; fitted iso-FLOP curves; the held-out rung."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.asarray(report["fit_x"])
    rungs = report["rungs"]
    budgets = sorted({r["budget"] for r in rungs})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))  # type: ignore[attr-defined]
    for c, color in zip(budgets, colors, strict=True):
        rs = [r for r in rungs if r["budget"] == c]
        ax[0].scatter(
            [r["params"] for r in rs],
            [r["val_loss"] for r in rs],
            color=color,
            label=f"C = {c:.2g} FLOPs",
        )
        ns = np.geomspace(
            min(r["params"] for r in rs) / 1.5, max(r["params"] for r in rs) * 1.5, 50
        )
        ratio = np.mean([r["tokens"] * r["params"] for r in rs])
        ax[0].plot(ns, law_loss(x, ns, ratio / ns), color=color, lw=1)
    h = report["held_out"]
    for key, marker, size, color in (
        ("val_loss", "*", 160, "crimson"),
        ("predicted", "x", 80, "black"),
    ):
        what = "measured" if key == "val_loss" else "predicted"
        label = f"held-out, {what} {h[key]:.3f}"
        ax[0].scatter([h["params"]], [h[key]], marker=marker, s=size, color=color, label=label)
    ax[0].set_xscale("log")
    ax[0].set_xlabel("parameters N")
    ax[0].set_ylabel("validation loss (nats/token)")
    ax[0].set_title("iso-FLOP ladder and fitted L(N, D)")
    ax[0].legend(fontsize=8)
    measured = [r["val_loss"] for r in rungs]
    fitted = [
        float(law_loss(x, np.array([r["params"]]), np.array([r["tokens"]]))[0]) for r in rungs
    ]
    ax[1].scatter(fitted, measured, label="ladder rungs")
    ax[1].scatter(
        [h["predicted"]], [h["val_loss"]], marker="*", s=160, color="crimson", label="held-out rung"
    )
    lo, hi = min([*measured, *fitted, h["val_loss"]]), max([*measured, *fitted, h["val_loss"]])
    ax[1].plot([lo, hi], [lo, hi], color="gray", lw=1)
    ax[1].set_xlabel("predicted loss")
    ax[1].set_ylabel("measured loss")
    f = report["fit"]
    ax[1].set_title(f"E={f['E']:.2f}  α={f['alpha']:.2f}  β={f['beta']:.2f}")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
