import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data import Document
from lmforge.data.sources import decode_bytes, iter_source
from lmforge.shards import (
    ShardError,
    TokenLoader,
    TokenStream,
    is_validation,
    split_document,
    tokenize_documents,
)
from lmforge.tokenizer import EOT, SPECIAL_TOKENS, load_tokenizer, train_bpe, train_char


@pytest.fixture(scope="module")
def bpe(shared):
    text = (shared / "tinyshakespeare" / "input.txt").read_text()[:300_000]
    chunks = [text[i : i + 5000] for i in range(0, len(text), 5000)]
    return train_bpe([*chunks, "def f(x):\n    return x  # ünïcödé 🙂 中文"], 600)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == re.sub("[\ud800-\udfff]", "\ufffd", text)


def test_specials_reserved_and_round_trip(bpe, tmp_path):
    assert [bpe.specials[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert bpe.encode(EOT) == [bpe.eot_id]
    text = f"a{EOT}b<|user|>hi<|end|>"
    assert bpe.decode(bpe.encode(text)) == text
    path = bpe.save(tmp_path)
    again = load_tokenizer(path)
    assert again.hash == bpe.hash and again.encode("To be, or not") == bpe.encode("To be, or not")


def test_lone_surrogate_becomes_replacement_char(bpe):
    assert bpe.decode(bpe.encode("a\ud800b")) == "a\ufffdb"


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok \xff\xfe end \xe2\x82")
    text, replaced = decode_bytes(path.read_bytes())
    assert text.startswith("ok \ufffd\ufffd end") and replaced == 3
    doc = next(iter_source(str(path)))
    assert doc.meta["replaced_bytes"] == 3


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="abc \n!é"))
def test_char_round_trip(text):
    tok = train_char(["abc \n!é"])
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_character_is_an_error():
    with pytest.raises(ValueError, match="'z' is not in the character vocabulary"):
        train_char(["abc"]).encode("abz")


def make_docs(n=60):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "the", "question", "whether", "tis", "nobler"]
    return [
        Document(id=f"doc{i}", text=" ".join(rng.choice(words, size=rng.integers(5, 80))))
        for i in range(n)
    ]


def test_shard_round_trip(bpe, tmp_path):
    docs = make_docs()
    counts = tokenize_documents(docs, bpe, tmp_path, val_fraction=0.2, shard_tokens=300)
    assert counts["train"]["n_shards"] > 1  # several shards, read back as one stream
    for split in ("train", "val"):
        stream = TokenStream(tmp_path, split, bpe.hash)
        ids = stream.read(0, stream.n_tokens).tolist()
        expected = [d for d in docs if is_validation(d.id, 0.2) == (split == "val")]
        decoded = bpe.decode(ids).split(EOT)
        assert decoded[:-1] == [d.text for d in expected] and decoded[-1] == ""
        assert stream.n_documents == len(expected)
        assert stream.n_bytes == sum(len(d.text.encode()) for d in expected)
    header = json.loads((tmp_path / "train_00000.json").read_text())
    assert header["dtype"] == "uint16" and header["tokenizer_hash"] == bpe.hash


@pytest.mark.parametrize("mode", ["document", "tail"])
def test_tokenize_cuts_where_split_document_does(bpe, tmp_path, mode):
    """The shards hold exactly the (train, val) parts `split_document` gives, which is
    what evaluation and the built-in fine-tuning tasks hold out."""
    docs = make_docs()
    tokenize_documents(docs, bpe, tmp_path, val_fraction=0.2, split=mode)
    parts = [split_document(d.id, d.text, 0.2, mode) for d in docs]
    # Each document lands on one side ("document") or on both, head and tail ("tail").
    assert all(bool(train) != bool(val) for train, val in parts) == (mode == "document")
    assert all(train for train, _ in parts) == (mode == "tail")
    for k, split in enumerate(("train", "val")):
        stream = TokenStream(tmp_path, split, bpe.hash)
        decoded = bpe.decode(stream.read(0, stream.n_tokens).tolist()).split(EOT)[:-1]
        assert decoded == [p[k] for p in parts if p[k]]
    with pytest.raises(ValueError, match=r"data\.split = 'line'"):
        split_document("a", "text", 0.2, "line")


def test_split_is_deterministic_by_id():
    ids = [f"file{i}.py" for i in range(2000)]
    val = [i for i in ids if is_validation(i, 0.1)]
    assert val == [i for i in ids if is_validation(i, 0.1)]
    assert 150 < len(val) < 250


def test_other_tokenizer_is_refused(bpe, tmp_path):
    tokenize_documents(make_docs(), bpe, tmp_path, val_fraction=0.2)
    other = train_char(["abc"])
    with pytest.raises(ShardError, match="made with tokenizer"):
        TokenLoader(tmp_path, "train", 8, tokenizer_hash=other.hash)


def test_truncated_shard_is_refused(bpe, tmp_path):
    tokenize_documents(make_docs(), bpe, tmp_path, val_fraction=0.2)
    path = tmp_path / "train_00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ShardError, match="truncated"):
        TokenStream(tmp_path, "train")


def test_loader_determinism_and_world_size_independence(bpe, tmp_path):
    tokenize_documents(make_docs(200), bpe, tmp_path, val_fraction=0.1)
    a = TokenLoader(tmp_path, "train", 16, seed=3)
    b = TokenLoader(tmp_path, "train", 16, seed=3)
    # the same (step, micro) gives the same batch, in any order of asking
    late = b.batch(7, 1, 4, 2)
    assert torch.equal(a.batch(7, 1, 4, 2)[0], late[0])
    x, y = a.batch(0, 0, 4, 2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # one process with 2 micro-batches sees exactly what 2 ranks with 1 each see
    single = torch.cat([a.batch(5, m, 4, 2)[0] for m in range(2)])
    split = torch.cat([a.batch(5, 0, 4, 1, rank=r, world_size=2)[0] for r in range(2)])
    assert torch.equal(single, split)
    # an epoch visits every window exactly once
    for epoch in range(2):
        starts = sorted(a.window_start(epoch * a.n_windows + k) for k in range(a.n_windows))
        offset = starts[0]
        assert 0 <= offset < 16 and starts == [offset + 16 * k for k in range(a.n_windows)]
    assert not torch.equal(TokenLoader(tmp_path, "train", 16, seed=4).batch(0, 0, 4, 1)[0], x)
