"""Property tests over malformed input: nothing may crash with an unhandled exception.

- recipes (random YAML) and dotted overrides: a `Config` or a `ConfigError`;
- every data reader on random bytes: only `Document`s and `Skip`s with a reason;
- fine-tuning records and files: an `Example` or a `RecordError` naming file and line;
- token shard headers: a stream or a `ShardError`;
- tokenizers: ``decode(encode(text)) == text`` for any text.

The number of examples per property is $LMFORGE_FUZZ_EXAMPLES (default 60 in the
default suite; `benchmarks/reliability.py` runs 1,000). Each test counts the cases
it ran and how they ended into $LMFORGE_RELIABILITY_LOG when that is set.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import ConfigError, PrepareSource, load_config
from lmforge.data.document import Document
from lmforge.data.readers import Reader, Skip
from lmforge.finetune.tasks import TASKS, Record, RecordError, encode_record, read_records
from lmforge.shards import ShardError, TokenStream
from lmforge.tokenizer import train_tokenizer

EXAMPLES = int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TMP = Path(tempfile.mkdtemp(prefix="lmforge-fuzz-"))


class Tally:
    """Counts the cases of one property and how each ended; logs them at the end."""

    def __init__(self, name: str):
        self.name, self.outcomes = name, Counter()

    def __call__(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def report(self) -> None:
        assert sum(self.outcomes.values()) >= min(EXAMPLES, 10), self.outcomes  # it really ran
        log = os.environ.get("LMFORGE_RELIABILITY_LOG")
        if log:
            with open(log, "a") as fh:
                rec = {"test": "fuzz", "property": self.name, "cases": sum(self.outcomes.values())}
                fh.write(json.dumps({**rec, "outcomes": dict(self.outcomes)}) + "\n")


# ----------------------------------------------------------------------------- config

CONFIG_KEYS = {
    "data": ["sources", "val_fraction", "max_bytes", "split", "tokens_dir"],
    "tokenizer": ["kind", "vocab_size", "path"],
    "model": ["n_layers", "d_model", "n_heads", "context_length", "dropout", "preset"],
    "train": ["max_steps", "lr", "tokens_per_step", "micro_batch_size", "dtype", "schedule"],
    "finetune": ["task", "method", "lora_rank", "max_examples"],
    "run": ["stages", "export_formats"],
    "output": ["dir"],
}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=6,
)
section = st.sampled_from(sorted(CONFIG_KEYS)).flatmap(
    lambda s: st.tuples(
        st.just(s),
        st.dictionaries(st.sampled_from(CONFIG_KEYS[s]) | st.text(max_size=8), values, max_size=4)
        | values,
    )
)
recipes = st.one_of(
    st.dictionaries(st.just("x"), st.none(), max_size=0).map(lambda _: ""),
    st.lists(section, max_size=4).map(lambda kv: yaml.safe_dump(dict(kv))),
    st.text(max_size=200),  # anything at all, YAML or not
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)
config_tally = Tally("config: random recipe YAML")


@FUZZ
@given(text=recipes)
def test_random_recipe_gives_a_config_or_a_config_error(text):
    path = TMP / "recipe.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(str(path), [])
        config_tally("valid config")
    except ConfigError as exc:
        assert str(exc), "a ConfigError must say what is wrong"
        config_tally("ConfigError")


overrides_tally = Tally("config: random command-line overrides")


@FUZZ
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from([f"{s}.{k}" for s, ks in CONFIG_KEYS.items() for k in ks])
            | st.text(max_size=10),
            st.text(max_size=20),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_random_overrides_give_a_config_or_a_config_error(items):
    try:
        load_config(None, [f"{k}={v}" for k, v in items])
        overrides_tally("valid config")
    except ConfigError:
        overrides_tally("ConfigError")


def test_config_properties_ran():
    config_tally.report()
    overrides_tally.report()


# ----------------------------------------------------------------------------- data readers

READER_KINDS = ["jsonl", "json", "csv", "html", "warc", "text", "code"]
SUFFIX = {"jsonl": ".jsonl", "json": ".json", "csv": ".csv", "html": ".html", "warc": ".warc",
          "text": ".txt", "code": ".py"}  # fmt: skip
WARC_HEAD = b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: "


def malformed(kind: str) -> st.SearchStrategy[bytes]:
    """Random bytes, plus near-valid inputs of the kind (cut, doubled, mangled)."""
    valid = {
        "jsonl": b'{"text": "hello world", "id": 1}\n{"text": "second"}\n',
        "json": b'[{"text": "hello"}, {"text": "x"}]',
        "csv": b'id,text\n1,hello world\n2,"quoted, text"\n',
        "html": b"<html><body><p>Some text here.</p><script>x</script></body></html>",
        "warc": WARC_HEAD + b"30\r\n\r\nHTTP/1.1 200 OK\r\n\r\n<p>hi</p>\r\n\r\n",
        "text": "plain text é\n".encode(),
        "code": b"def f():\n    return 1\n",
    }[kind]
    return st.one_of(
        st.binary(max_size=400),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=8)).map(
            lambda t: valid[: t[0]] + t[1] + valid[t[0] + len(t[1]) :]
        ),
        st.binary(max_size=60).map(lambda b: valid + b + valid),
    )


reader_tally = Tally("data readers: malformed files")


@pytest.mark.parametrize("kind", READER_KINDS)
def test_reader_on_malformed_bytes_yields_documents_and_named_skips(kind):
    @FUZZ
    @given(data=malformed(kind), gz=st.booleans())
    def prop(data, gz):
        import gzip

        path = TMP / f"input{SUFFIX[kind]}{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
        src = PrepareSource(path=str(path), kind=kind, license="test")
        reader = Reader(src, max_file_bytes=1 << 20, max_line_bytes=1 << 16)
        for item in getattr(reader, f"read_{kind}")(path):  # not read_task: no safety net
            assert isinstance(item, (Document, Skip))
            if isinstance(item, Skip):
                assert item.reason and item.file, item
                reader_tally(f"skip: {item.reason}")
            else:
                assert isinstance(item.text, str)
                reader_tally("document")

    prop()


def test_reader_properties_ran():
    reader_tally.report()


# ----------------------------------------------------------------------------- fine-tuning tasks

FIELDS = sorted({"instruction", "input", "output", "messages", "source", "target", "text",
                 "document", "summary", "code", "docstring", "role", "content", "system"})  # fmt: skip
record_values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "bot"])}
        ).flatmap(lambda d: st.builds(lambda c: {**d, "content": c}, kids))
    ),
    max_leaves=5,
)
task_tally = Tally("fine-tuning: random records, every task format")
_TOK = {}


def char_tok():
    if "tok" not in _TOK:
        _TOK["tok"] = train_tokenizer(["abcdefghijklmnopqrstuvwxyz ,.:\n"], "char", 0)
    return _TOK["tok"]


@FUZZ
@given(
    task=st.sampled_from(sorted(TASKS)),
    data=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), record_values, max_size=5),
)
def test_random_record_gives_an_example_or_a_record_error_naming_file_and_line(task, data):
    rec = Record(data, "fuzz.jsonl", 7)
    try:
        ex = encode_record(TASKS[task], char_tok(), rec)
        assert len(ex.ids) == len(ex.mask) if hasattr(ex, "mask") else True
        task_tally("example")
    except RecordError as exc:
        assert "fuzz.jsonl:7" in str(exc), exc
        task_tally("RecordError")


task_file_tally = Tally("fine-tuning: malformed JSONL/CSV files")


@FUZZ
@given(data=malformed("jsonl") | malformed("csv"), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_malformed_task_file_gives_records_or_a_record_error(data, suffix):
    path = TMP / f"records{suffix}"
    path.write_bytes(data)
    try:
        n = sum(1 for _ in read_records(str(path)))
        task_file_tally(f"{n} records" if n < 3 else "3+ records")
    except RecordError as exc:
        assert str(path) in str(exc), exc
        task_file_tally("RecordError")


def test_task_properties_ran():
    task_tally.report()
    task_file_tally.report()


# ----------------------------------------------------------------------------- shard headers

header_tally = Tally("token shards: mangled headers and data files")
GOOD_HEADER = {
    "format": "lmforge-tokens",
    "version": 1,
    "tokenizer_hash": "abc",
    "tokenizer_kind": "char",
    "vocab_size": 70,
    "eot_id": 0,
    "dtype": "uint16",
    "n_tokens": 40,
    "n_documents": 2,
    "n_bytes": 40,
}


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(sorted(GOOD_HEADER)), scalars, max_size=3),
    drop=st.lists(st.sampled_from(sorted(GOOD_HEADER)), max_size=2),
    raw=st.none() | st.binary(max_size=80),
    n_bytes=st.integers(0, 120),
)
def test_mangled_shard_header_gives_a_stream_or_a_shard_error(changes, drop, raw, n_bytes):
    folder = TMP / "shards"
    folder.mkdir(exist_ok=True)
    header = {k: v for k, v in {**GOOD_HEADER, **changes}.items() if k not in drop}
    text = raw.decode("latin-1") if raw is not None else json.dumps(header)
    (folder / "train_00000.json").write_text(text)
    (folder / "train_00000.bin").write_bytes(b"\x01\x00" * (n_bytes // 2))
    try:
        stream = TokenStream(folder, "train")
        assert stream.n_tokens * 2 == n_bytes // 2 * 2
        header_tally("stream")
    except ShardError as exc:
        assert "train_00000" in str(exc) or str(folder) in str(exc), exc
        header_tally("ShardError")


def test_header_properties_ran():
    header_tally.report()


# ----------------------------------------------------------------------------- tokenizers

round_trip_tally = Tally("tokenizers: encode/decode round trip")


@pytest.fixture(scope="module")
def bpe():
    text = (Path(__file__).parent / "helpers.py").read_text() * 3
    return train_tokenizer([text], "bpe", 300)


@FUZZ
@given(text=st.text(max_size=200))
def test_bpe_round_trip_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text
    round_trip_tally("bpe")


@FUZZ
@given(text=st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,.:\n", max_size=200))
def test_char_round_trip(text):
    tok = char_tok()
    assert tok.decode(tok.encode(text)) == text
    round_trip_tally("char")


def test_round_trip_properties_ran():
    round_trip_tally.report()
