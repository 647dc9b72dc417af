"""The search space file of `lmforge sweep`.

```yaml
params:                       # any recipe key, dotted; list items by index (prepare.sources.1.weight)
  train.lr: {type: float, low: 3.0e-4, high: 1.0e-2, log: true}
  train.warmup_steps: {type: int, low: 0, high: 80, step: 20}
  finetune.lr: {type: categorical, choices: [2.0e-4, 5.0e-4]}
  prepare.min_chars: [100, 200]          # a plain list: these values (categorical)
objective: {metric: eval.ppl.bits_per_byte, direction: minimize}
constraints:                  # optional: a trial that breaks one is never "best"
  - {metric: bias.summary.finetuned.crows_pairs.overall, max: 60}
budget: {trials: 12, wall_time_s: 3600}   # no trial starts after wall_time_s
sampler: tpe                  # grid | random | tpe
pruner: median                # median | halving | none (on the validation curve)
prune_startup_trials: 2       # trials that finish before the pruner stops any
include_recipe: true          # trial 0 = the recipe's own values (the baseline)
seed: 0
```

Every field can also be set on the command line as `--sweep.KEY=VALUE`
(`trials`, `wall_time_s`, `sampler`, `pruner`, `seed`, `metric`, `direction`,
`engine`, `ray_address`, `ray_cpus_per_trial`, `prune_startup_trials`,
`include_recipe`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.config import ConfigError, parse_overrides

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "halving", "none")
ENGINES = ("optuna", "ray")


@dataclass
class Param:
    key: str
    type: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)

    def grid_values(self, where: str) -> list[Any]:
        """The values a grid search tries: the choices, or low..high by step."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None:
            raise ConfigError(
                f"{where}: params.{self.key}: sampler grid needs discrete values "
                "(give `step`, or `choices`)"
            )
        n = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        values = [float(f"{self.low + i * self.step:.12g}") for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else values


@dataclass
class Constraint:
    metric: str
    min: float | None = None
    max: float | None = None

    def violation(self, value: float) -> float:
        """≤ 0 when satisfied (Optuna's convention), else by how much it is broken."""
        over = value - self.max if self.max is not None else -math.inf
        under = self.min - value if self.min is not None else -math.inf
        return max(over, under)


@dataclass
class SweepSpec:
    params: dict[str, Param]
    metric: str = "eval.ppl.bits_per_byte"
    direction: Literal["minimize", "maximize"] = "minimize"
    constraints: list[Constraint] = field(default_factory=list)
    trials: int = 10
    wall_time_s: float = 0.0  # 0 = no limit
    sampler: str = "tpe"
    pruner: str = "median"
    prune_startup_trials: int = 2  # trials that finish before any is pruned
    # First trial = the recipe's own values (where the space holds them), so the report
    # says whether the sweep beat the recipe it started from.
    include_recipe: bool = False
    seed: int = 0
    engine: str = "optuna"
    ray_address: str = ""  # set: run on this Ray cluster ("local": a local one)
    ray_cpus_per_trial: int = 2
    source: str = ""

    def grid(self) -> list[dict[str, Any]]:
        keys = list(self.params)
        values = [self.params[k].grid_values(self.source) for k in keys]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]

    def budget(self) -> int:
        return min(self.trials, len(self.grid())) if self.sampler == "grid" else self.trials

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where} = {value!r} must be a number")
    try:
        return float(value)  # YAML 1.1 reads 3e-4 as a string
    except ValueError:
        raise ConfigError(f"{where} = {value!r} must be a number") from None


def parse_param(key: str, raw: Any, where: str) -> Param:
    at = f"{where}: params.{key}"
    if isinstance(raw, list):
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{at} must be a list of values or a mapping with `type`")
    kind = raw.get("type", "categorical" if "choices" in raw else "")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{at}.choices must be a non-empty list")
        return Param(key, "categorical", choices=choices)
    if kind not in ("float", "int"):
        raise ConfigError(f"{at}.type = {kind!r} must be float, int or categorical")
    for need in ("low", "high"):
        if need not in raw:
            raise ConfigError(f"{at}.{need} is required for type {kind}")
    low, high = _number(raw["low"], f"{at}.low"), _number(raw["high"], f"{at}.high")
    if not low < high:
        raise ConfigError(f"{at}: low = {low} must be below high = {high}")
    log = bool(raw.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{at}: log scale needs low > 0 (got {low})")
    step = _number(raw["step"], f"{at}.step") if raw.get("step") is not None else None
    if kind == "int":
        low, high = int(low), int(high)
        step = int(step) if step is not None else (None if log else 1)
    unknown = set(raw) - {"type", "low", "high", "log", "step"}
    if unknown:
        raise ConfigError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _constraints(raw: Any, where: str) -> list[Constraint]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: constraints must be a list of {{metric, min/max}}")
    out = []
    for i, item in enumerate(raw):
        at = f"{where}: constraints[{i}]"
        if not isinstance(item, dict) or "metric" not in item:
            raise ConfigError(f"{at} needs a `metric` and a `min` or `max`")
        lo = _number(item["min"], f"{at}.min") if "min" in item else None
        hi = _number(item["max"], f"{at}.max") if "max" in item else None
        if lo is None and hi is None:
            raise ConfigError(f"{at} needs a `min` or a `max`")
        out.append(Constraint(str(item["metric"]), lo, hi))
    return out


def _flat_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The scalar settings of a space file, flattened to the `--sweep.KEY` names."""
    flat = {k: v for k, v in data.items() if k not in ("params", "objective", "budget")}
    flat.pop("constraints", None)
    for section in ("objective", "budget"):
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{section} must be a mapping")
        flat.update(value)
    return flat


def load_space(path: str | Path, cli: list[str] | None = None) -> SweepSpec:
    """Read SPACE.yaml, then apply `sweep.KEY=VALUE` command-line settings."""
    path = Path(path)
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such search space file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a search space must be a mapping (params, objective, ...)")
    params_raw = data.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{where}: params must map recipe keys to their ranges or values")
    settings = _flat_settings(data)
    settings.update(parse_overrides(cli or []).get("sweep", {}))
    spec = SweepSpec(
        params={str(k): parse_param(str(k), v, where) for k, v in params_raw.items()},
        constraints=_constraints(data.get("constraints"), where),
        source=where,
    )
    for key, value in settings.items():
        if key in ("params", "constraints", "source") or not hasattr(spec, key):
            raise ConfigError(f"{where}: unknown setting '{key}'")
        current = getattr(spec, key)
        if isinstance(current, bool):
            value = value if isinstance(value, bool) else str(value).lower() == "true"
        elif isinstance(current, (int, float)):
            number = _number(value, f"{where}: {key}")
            value = int(number) if isinstance(current, int) else number
        setattr(spec, key, value if not isinstance(value, str) else value.strip())
    _check(spec, where)
    return spec


def _check(spec: SweepSpec, where: str) -> None:
    for key, allowed in (
        ("sampler", SAMPLERS),
        ("pruner", PRUNERS),
        ("engine", ENGINES),
        ("direction", ("minimize", "maximize")),
    ):
        if getattr(spec, key) not in allowed:
            raise ConfigError(
                f"{where}: {key} = {getattr(spec, key)!r} must be one of {', '.join(allowed)}"
            )
    if spec.trials <= 0:
        raise ConfigError(f"{where}: budget.trials must be positive")
    if spec.wall_time_s < 0:
        raise ConfigError(f"{where}: budget.wall_time_s must not be negative (0 = no limit)")
    if spec.sampler == "grid":
        spec.grid()  # every key must have discrete values


def distribution(param: Param) -> Any:
    import optuna.distributions as d

    if param.type == "categorical":
        return d.CategoricalDistribution(param.choices)
    if param.type == "int":
        return d.IntDistribution(
            int(param.low), int(param.high), log=param.log, step=int(param.step or 1)
        )
    return d.FloatDistribution(param.low, param.high, log=param.log, step=param.step)
