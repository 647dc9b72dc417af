"""The quickstart fine-tuning task: a function's code (docstring removed) → its docstring.

Built from the running interpreter's standard library (the quickstart corpus), so
it needs no download. Deterministic: files in sorted order, functions in source
order, split by file (`shards.is_validation` on the file's path) so no file
contributes to two splits. The target is the docstring's first paragraph (its
summary), whitespace-normalised.

A pre-trained quickstart model has seen these functions *with* their docstrings;
the task measures whether fine-tuning teaches it to produce a summary on
request, not whether it can summarise unseen code.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from lmforge.data.sources import decode_bytes, stdlib_files, stdlib_root
from lmforge.fileio import write_text_atomic
from lmforge.shards import is_validation

MAX_CODE_CHARS = 600
MAX_DOC_CHARS = 200
MIN_DOC_CHARS = 12


def summary_line(doc: str) -> str:
    """First paragraph of a cleaned docstring, on one line."""
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


def function_examples(source: str) -> list[dict[str, str]]:
    """(code without docstring, docstring summary) for every documented function in `source`."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:  # a function that is only a docstring teaches nothing
            continue
        target = summary_line(doc)
        if not MIN_DOC_CHARS <= len(target) <= MAX_DOC_CHARS:
            continue
        first = min([d.lineno for d in node.decorator_list] + [node.lineno])
        doc_node = node.body[0]
        assert doc_node.end_lineno is not None and node.end_lineno is not None
        if doc_node.lineno == node.lineno or doc_node.end_lineno == node.end_lineno:
            continue  # one-line definitions: nothing left to cut around
        rest = lines[doc_node.end_lineno : node.end_lineno]
        while rest and not rest[0].strip():  # the blank line that followed the docstring
            rest = rest[1:]
        body = lines[first - 1 : doc_node.lineno - 1] + rest
        indent = min((len(x) - len(x.lstrip()) for x in body if x.strip()), default=0)
        code = "\n".join(x[indent:] for x in body).strip("\n")
        if len(code) > MAX_CODE_CHARS:
            continue
        out.append({"code": code, "docstring": target})
    return out


def build_code_docstring(
    out_dir: str | Path, val_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, Path]:
    """Write train/val/test JSONL files (`{code, docstring, file}`) unless already there."""
    out_dir = Path(out_dir)
    paths = {s: out_dir / f"{s}.jsonl" for s in ("train", "val", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    root = stdlib_root()
    records: dict[str, list[str]] = {s: [] for s in paths}
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        # Two disjoint hash ranges: [0, val) → val, [val, val + test) → test.
        if is_validation(rel, val_fraction):
            split = "val"
        elif is_validation(rel, val_fraction + test_fraction):
            split = "test"
        else:
            split = "train"
        text, _ = decode_bytes(path.read_bytes())
        for ex in function_examples(text):
            records[split].append(json.dumps({**ex, "file": rel}, ensure_ascii=False))
    for split, path in paths.items():
        write_text_atomic(path, "".join(r + "\n" for r in records[split]))
    return paths
