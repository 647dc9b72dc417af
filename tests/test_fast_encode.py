"""The fast tokenize path gives exactly the ids and shard files of plain per-document encoding."""

import gzip
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data import Document
from lmforge.fast_encode import PieceEncoder, supports
from lmforge.shards import dtype_for, is_validation, tokenize_documents
from lmforge.tokenizer import EOT, train_bpe, train_char

TRICKY = [
    "",
    " ",
    "  \n\n  x",
    "It's a dog's life, isn't it? We'll see. I'D say 'tis",
    "tabs\tand\x0bvertical\x0cfeeds\r\nand \x1c\x1d\x1e\x1f file separators",
    "numbers 12345 ٣٤ Ⅻ ½ and 3.14159e-10",
    "ünïcödé café naïve — “quotes” ‘single’ … €100",
    "中文字符 日本語のテキスト 한국어",
    "emoji 🙂🙃 flags 🇫🇷 zwj 👩‍💻 combining e\u0301",
    "nbsp\u00a0here, ideographic\u3000space, nel\u0085line, ls\u2028ps\u2029",
    f"a{EOT}b<|user|>hi<|end|> <|notspecial|> <|endoftext",
    "lone \ud800 surrogate \udfff",
    "x" * 300 + " " + "9" * 200 + " " + "=" * 150,
    "trailing spaces   ",
    "\n",
]


@pytest.fixture(scope="module")
def bpe(shared):
    text = (shared / "tinyshakespeare" / "input.txt").read_text()[:300_000]
    chunks = [text[i : i + 5000] for i in range(0, len(text), 5000)]
    return train_bpe([*chunks, *TRICKY[:10]], 700)


def reference(tok, text):
    return np.asarray(tok.encode(text), dtype=dtype_for(tok.vocab_size)).tobytes()


def test_supports_only_gpt2_byte_level_bpe(bpe):
    assert supports(bpe) and not supports(train_char(["abc"]))


def test_tricky_texts_match_hf(bpe):
    enc = PieceEncoder(bpe, dtype_for(bpe.vocab_size))
    assert enc.encode(TRICKY) == [reference(bpe, t) for t in TRICKY]
    # a second pass answers from the cache, and must still agree
    assert enc.encode(TRICKY[::-1]) == [reference(bpe, t) for t in TRICKY[::-1]]


def test_text_that_never_repeats_skips_the_first_lookups_and_stays_exact(bpe, shared):
    """After a call where most documents brought new chunks, the next call looks for new
    chunks in every document at once (no per-document try first); the ids must not change,
    for documents with new chunks and for documents whose chunks are all known."""
    enc = PieceEncoder(bpe, dtype_for(bpe.vocab_size))
    text = (shared / "tinyshakespeare" / "input.txt").read_text()
    first = [text[i : i + 700] for i in range(0, 70_000, 700)]
    assert enc.encode(first) == [reference(bpe, t) for t in first]
    assert enc.missed_share > 0.5  # the cache started empty: every document missed
    # new documents mixed with ones whose every chunk is known now, and tricky ones
    second = [text[i : i + 700] for i in range(500_000, 560_000, 700)] + first[:20] + TRICKY
    assert enc.encode(second) == [reference(bpe, t) for t in second]
    assert 0 < enc.missed_share < 1  # the known documents were counted as hits
    assert enc.encode(first[:30]) == [reference(bpe, t) for t in first[:30]]


pieces = st.sampled_from(
    ["'s", "'t", "'re", "'ll", "'S", " ", "  ", "\n", "\r\n", "\t", "\u00a0", EOT, "<|end|>", "<|"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=12), pieces), max_size=12))
def test_any_text_matches_hf(bpe, parts):
    enc = PieceEncoder(bpe, dtype_for(bpe.vocab_size))
    text = "".join(parts)
    want = reference(bpe, text)
    assert enc.encode([text, text]) == [want] * 2  # chunks new: regular expression, then HF
    assert enc.encode([text]) == [want]  # every chunk cached: the `str.split` path


def docs_from_books(shared, n_books=3, size=3000):
    docs = list(map(lambda i_t: Document(f"t{i_t[0]}", i_t[1]), enumerate(TRICKY)))
    for path in sorted((shared / "gutenberg").glob("*.txt.gz"))[:n_books]:
        text = gzip.decompress(path.read_bytes()).decode()[:150_000]
        for i in range(0, len(text), size):
            docs.append(Document(f"{path.name}/{i}", text[i : i + size]))
    return docs


def reference_shards(tok, docs, val_fraction, shard_tokens):
    """The straightforward writer: per document `tok.encode` + end-of-text, rolled over."""
    dtype = dtype_for(tok.vocab_size)
    out = {}
    for split in ("train", "val"):
        shards, cur = [], []
        for doc in docs:
            if is_validation(doc.id, val_fraction) != (split == "val"):
                continue
            cur.extend([*tok.encode(doc.text), tok.eot_id])
            if len(cur) >= shard_tokens:
                shards.append(cur)
                cur = []
        if cur or not shards:
            shards.append(cur)
        for k, ids in enumerate(shards):
            out[f"{split}_{k:05d}.bin"] = np.asarray(ids, dtype=dtype).tobytes()
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_identical_to_per_document_encoding(bpe, shared, tmp_path, workers):
    docs = docs_from_books(shared)
    # parallel_after=0: with 2 workers every batch goes to a worker process
    counts = tokenize_documents(
        docs,
        bpe,
        tmp_path,
        0.1,
        shard_tokens=20_000,
        batch_size=7,
        workers=workers,
        parallel_after=0,
    )
    want = reference_shards(bpe, docs, 0.1, 20_000)
    got = {p.name: p.read_bytes() for p in sorted(tmp_path.glob("*.bin"))}
    assert len(want) > 4 and got == want
    for split in ("train", "val"):
        expected = [d for d in docs if is_validation(d.id, 0.1) == (split == "val")]
        assert counts[split]["n_documents"] == len(expected)
        assert counts[split]["n_bytes"] == sum(
            len(d.text.encode("utf-8", errors="replace")) for d in expected
        )
    header = json.loads((tmp_path / "train_00000.json").read_text())
    assert header["n_tokens"] * 2 == len(got["train_00000.bin"])


def test_char_tokenizer_takes_the_generic_path(tmp_path):
    docs = [Document(f"d{i}", "abc " * i) for i in range(50)]
    tok = train_char(["abc "])
    tokenize_documents(docs, tok, tmp_path, 0.2, workers=2, parallel_after=0, batch_size=4)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.bin")} == reference_shards(
        tok, docs, 0.2, 50_000_000
    )


def test_vectorised_batch_equals_row_by_row_samples(bpe, shared, tmp_path):
    """`TokenLoader.batch` gathers whole batches at once: the same tokens as `sample(g)` per
    row, across shard boundaries and across epoch boundaries."""
    import torch

    from lmforge.shards import TokenLoader

    tokenize_documents(docs_from_books(shared, 1), bpe, tmp_path, 0.1, shard_tokens=3_000)
    assert len(list(tmp_path.glob("train_*.bin"))) > 5
    loader = TokenLoader(tmp_path, "train", 32, seed=5)
    batch = 7
    steps = loader.n_windows // batch + 3  # well into the second epoch
    for step in range(steps):
        for micro in range(2):
            x, y = loader.batch(step, micro, batch, 2)
            first = (step * 2 + micro) * batch
            rows = np.stack([loader.sample(first + i) for i in range(batch)])
            assert torch.equal(x, torch.from_numpy(rows[:, :-1]))
            assert torch.equal(y, torch.from_numpy(rows[:, 1:]))


def test_trainer_logs_the_loaders_share_of_step_time(tmp_path):
    """`data_ms`/`data_frac` see a loader that sleeps 30 ms per micro-batch."""
    import time
    from dataclasses import replace

    from helpers import tiny_config

    from lmforge.pretrain import build_model, model_config_for, tokenize_stage, tokenizer_stage
    from lmforge.shards import TokenLoader
    from lmforge.train.loop import Trainer

    class Slow:
        def __init__(self, inner):
            self.inner = inner

        def batch(self, *args):
            time.sleep(0.03)
            return self.inner.batch(*args)

    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.log_every=2", "train.eval_every=100")
    run = tmp_path / "run"
    tok = tokenizer_stage(cfg, run)
    cfg = replace(cfg, model=model_config_for(cfg, tok))
    loader = TokenLoader(tokenize_stage(cfg, tok, run), "train", 32, cfg.train.seed)
    fracs = {}
    for name, data in (("plain", loader), ("slow", Slow(loader))):
        out = tmp_path / name
        model = build_model(cfg.model, cfg.train.seed)
        Trainer(cfg, model, out, data, log=lambda *_: None).fit()
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "data_frac" in r]
        assert len(recs) == 2 and all(0 <= r["data_frac"] <= 1 for r in recs)
        fracs[name] = recs[-1]
    # 2 micro-batches per step (256 tokens = 2 × 4 × 32)
    assert fracs["slow"]["data_ms"] >= 60 and fracs["slow"]["data_frac"] > 0.3
    assert fracs["plain"]["data_ms"] < 30
