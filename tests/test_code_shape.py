"""The code's shape, kept: no function over 80 lines in `src/`, and no import cycle
between lmforge's modules nor between its packages (imports inside function bodies
count: they are edges too)."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"
MAX_LINES = 80


def _modules() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path, ast.parse(path.read_text(encoding="utf-8"))))
    return out


def _unit(module: str) -> str:
    """The package a module belongs to: `lmforge.data.readers` → `lmforge.data`."""
    return ".".join(module.split(".")[:2])


def _imported(
    module: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]
) -> list[str]:
    """The lmforge modules an import statement loads (`from pkg import mod` names `mod`)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [
            f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names
        ]
    out = []
    for name in names:
        while name and name not in known:  # `import lmforge.x.y` loads lmforge.x.y
            name = name.rpartition(".")[0]
        if name.startswith("lmforge.") and name != module:
            out.append(name)
    return out


def _graph(unit: Callable[[str], str]) -> dict[str, set[str]]:
    modules = _modules()
    known = {module for module, _, _ in modules}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(module, path, node, known):
                    if unit(target) != unit(module):
                        graph[unit(module)].add(unit(target))
    return graph


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start → … → start, or None (depth-first search)."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, trail = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [*trail, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*trail, nxt]))
    return None


def test_no_function_longer_than_80_lines() -> None:
    long = [
        f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name} "
        f"({node.end_lineno - node.lineno + 1} lines)"
        for _, path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


@pytest.mark.parametrize("level", ["module", "package"])
def test_imports_have_no_cycle(level: str) -> None:
    graph = _graph(_unit if level == "package" else lambda module: module)
    cycles = {" → ".join(c) for p in sorted(graph) if (c := _cycle_from(graph, p))}
    assert not cycles, f"import cycles between {level}s:\n" + "\n".join(sorted(cycles))


def test_the_checks_see_a_cycle_and_a_long_function(tmp_path: Path) -> None:
    """The two checks can fail: a made-up graph with a cycle is found, and a long
    function in parsed source is counted."""
    assert _cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert _cycle_from({"a": {"b"}, "b": {"c"}}, "a") is None
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    fn = ast.parse(f"def f():\n{body}\n").body[0]
    assert isinstance(fn, ast.FunctionDef) and fn.end_lineno - fn.lineno + 1 > MAX_LINES
