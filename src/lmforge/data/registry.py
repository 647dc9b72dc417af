"""Steps and reference sets that plug into `lmforge prepare` by name.

A data filter or step is one file: a `lmforge.data.filters.Filter` subclass that owns
its ``check(doc)`` (None keeps the document, a string is the reason to drop it), or a
`lmforge.data.steps.Step` subclass that owns its ``process(doc)`` (or a whole
``run(docs)`` generator); its options are its dataclass fields or the keyword
arguments of ``__init__``. It is registered under a name::

    @register_step("min_words")
    @dataclass
    class MinWords(Filter): ...

and named in a recipe, with its options, under ``prepare.steps``::

    prepare:
      steps:
        - {name: min_words, min_words: 50}

A step runs after the built-in filters (``stage="filter"``, before deduplication) or
on the deduplicated, mixed documents (``stage="post_dedup"``). Packages above `data`
plug in the same way and are never imported from here: `lmforge.bias` registers its
steps (`register_builder`, driven by the ``prepare.cda_*`` / ``bias_*`` keys) and the
packaged CrowS-Pairs set for decontamination (`register_eval_set`) when its module
is imported; `load_plugins` imports the modules in `PLUGINS` and ``prepare.plugins``
by name before a run builds its steps, in every worker process.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

STAGES = ("filter", "post_dedup")

# name → (Step subclass, stage)
STEPS: dict[str, tuple[type, str]] = {}
# stage → functions (PrepareConfig, on_drop) → steps, for steps driven by config keys
BUILDERS: dict[str, list[Callable[..., list[Any]]]] = {stage: [] for stage in STAGES}
# decontamination set name → its texts
EVAL_SETS: dict[str, Callable[[], Iterable[str]]] = {}
# modules that register steps and sets when imported (by name: `data` imports none of them)
PLUGINS = ["lmforge.bias.steps"]


def register_step(name: str, cls: type | None = None, *, stage: str = "filter") -> Any:
    """Register a `Step` subclass under `name`; usable as ``@register_step("name")``."""
    if stage not in STAGES:
        raise ValueError(f"register_step({name!r}): stage {stage!r} is not one of {STAGES}")

    def add(c: type) -> type:
        if "name" not in vars(c):  # the report and the drop reasons use the registered name
            c.name = name  # type: ignore[attr-defined]
        STEPS[name] = (c, stage)
        return c

    return add if cls is None else add(cls)


def register_builder(stage: str, builder: Callable[..., list[Any]]) -> None:
    """Register a function ``(PrepareConfig, on_drop) -> [steps]`` run at `stage`."""
    if builder not in BUILDERS[stage]:
        BUILDERS[stage].append(builder)


def register_eval_set(name: str, texts: Callable[[], Iterable[str]]) -> None:
    """Register a named decontamination set (``prepare.decontaminate: [name]``)."""
    EVAL_SETS[name] = texts


def load_plugins(extra: Iterable[str] = ()) -> None:
    """Import the plug-in modules (each registers itself once, on first import)."""
    for module in [*PLUGINS, *extra]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(
                f"prepare.plugins: cannot import '{module}' ({exc}); name an importable module"
            ) from None


def snapshot() -> dict[str, tuple[type, str]]:
    """The registered steps, to hand to a worker process (classes travel by reference)."""
    return dict(STEPS)


def restore(steps: dict[str, tuple[type, str]] | None) -> None:
    if steps:
        STEPS.update(steps)


def _options(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{where}: should be a mapping with a 'name' key, e.g. {{name: STEP}}")
    options = {k: v for k, v in entry.items() if k != "name"}
    return entry["name"], options


def lookup(entry: Any, where: str) -> tuple[type, str, dict[str, Any]]:
    """(class, stage, options) of one ``prepare.steps`` entry; bad ones raise in one line."""
    name, options = _options(entry, where)
    if name not in STEPS:
        known = ", ".join(sorted(STEPS)) or "none"
        raise ValueError(
            f"{where}: unknown step '{name}' (registered: {known}); register it with "
            "lmforge.data.registry.register_step and name its module in prepare.plugins"
        )
    cls, stage = STEPS[name]
    params = inspect.signature(cls).parameters
    allowed = [p for p in params if p != "on_drop"]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    bad = [k for k in options if k not in allowed or k == "on_drop"]
    if bad and not takes_any:
        raise ValueError(
            f"{where} ({name}): unknown option '{bad[0]}' (options: {', '.join(allowed) or 'none'})"
        )
    return cls, stage, options


def configured_steps(
    cfg: Any, stage: str, on_drop: Any, as_step: Callable[[Any], Any]
) -> list[Any]:
    """The steps of `stage`: registered builders' first, then ``prepare.steps`` in order.

    `as_step` turns a registered object that is not a step (a filter) into one.
    """
    load_plugins(cfg.plugins)
    steps: list[Any] = []
    for builder in BUILDERS[stage]:
        steps += builder(cfg, on_drop)
    for i, entry in enumerate(cfg.steps):
        cls, step_stage, options = lookup(entry, f"prepare.steps[{i}]")
        if step_stage != stage:
            continue
        if "on_drop" in inspect.signature(cls).parameters:
            options = {**options, "on_drop": on_drop}
        obj = cls(**options)
        steps.append(obj if hasattr(obj, "stats") else as_step(obj))
    return steps


def check_steps(cfg: Any) -> None:
    """Raise on an unknown step or option before any work starts."""
    load_plugins(cfg.plugins)
    for i, entry in enumerate(cfg.steps):
        lookup(entry, f"prepare.steps[{i}]")
