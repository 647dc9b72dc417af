"""Property-based fuzzing of every numeric config key, as a user meets it on the command line.

For every int/float field of the config tree (enumerated from the dataclasses, so a new
key is fuzzed without touching this file), values of every nasty class (NaN, ±inf,
overflowing literals, negative, zero, huge, tiny, hex/octal/base-60, booleans, strings,
lists) either

- are accepted, and the value that lands in the config is inside the key's declared
  range (and, for a decimal literal, equal to the number typed), or
- are refused with exit code 2 and ONE short line naming the key; never a traceback,
  never exit code 1.

The sweep over every key × every class goes through `load_config` (the path of every
command, ≈ 3 ms a case); the property through `lmforge config quickstart --key=value`
(`lmforge.cli.main` in-process, ≈ 0.1 s a case) samples keys and values with hypothesis.
Both are derandomized, so a failure reproduces.
"""

from __future__ import annotations

import contextlib
import io
import math
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import Config, ConfigError, load_config, numeric_fields, range_of

KEYS = {key: (f, tp) for key, f, tp in numeric_fields(Config)}

# One or more of each class: NaN, infinities, overflow, negative, zero, huge, tiny,
# non-decimal number forms, booleans, strings, null, containers.
NASTY = [
    *("nan", "-nan", ".nan", "NaN", "inf", "-inf", "+inf", ".inf", "-.inf", "infinity"),
    *("1e999", "-1e999", "9" * 400, "1" + "0" * 5000),
    *("-1", "-0", "-0.0", "-1e-300", "-9007199254740993"),
    *("0", "0.0", "0e0"),
    *("1e308", "9" * 30, str(2**53), str(2**53 + 1), str(2**63), "1e20"),
    *("5e-324", "1e-320", "1e-300"),
    *("0x10", "0o17", "010", "0b11", "1:30", "1_000"),
    *("true", "false", "yes", "no", "on"),
    *("abc", "", " ", "'1'", "null", "~", "[1, 2]", "{a: 1}", "1 2"),
    *("0.5", "1", "1.5", "2", "3e-4", "64"),
]
values = st.one_of(
    st.sampled_from(NASTY),
    st.floats().map(repr),
    st.floats().map(lambda x: f"{x:e}"),
    st.integers(-(2**80), 2**80).map(str),
    st.text(max_size=12),
)
DECIMAL = re.compile(r"[+-]?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")


def override(key: str, text: str) -> str:
    """The command-line override setting `key` to `text` (list entries as a flow mapping)."""
    if "[]." in key:  # prepare.sources[].weight: one source with that weight
        section, leaf = key.split("[].")
        return f"{section}=[{{path: a, {leaf}: {text}}}]"
    return f"{key}={text}"


def message_key(key: str, text: str) -> str:
    """What a refusal must name: the key; for a list entry whose flow mapping is not valid
    YAML (a stray quote in `text`), the entry."""
    if "[]." not in key:
        return key
    try:
        yaml.safe_load(override(key, text).split("=", 1)[1])
    except (yaml.YAMLError, ValueError):
        return key.split("[].")[0] + "[0]"
    return key.replace("[].", "[0].")


def lookup(data: object, key: str) -> object:
    """The value at `key` in a Config or in its YAML dump."""
    for part in key.replace("[]", ".0").split("."):
        if isinstance(data, list):
            data = data[int(part)]
        elif isinstance(data, dict):
            data = data[part]
        else:
            data = getattr(data, part)
    return data


def check_accepted(key: str, text: str, value: object) -> None:
    f, tp = KEYS[key]
    rng = range_of(f)
    assert rng is not None
    assert type(value) is tp, f"--{key}={text!r} gave {value!r}, not {tp.__name__}"
    assert rng.problem(value) == "", f"--{key}={text!r} accepted {value!r}: {rng.describe()}"
    if DECIMAL.fullmatch(text.strip()) and math.isfinite(float(text)):
        assert value == float(text), f"--{key}={text!r} was read as {value!r}"


def check_refused(key: str, text: str, message: str) -> None:
    assert message.count("\n") == 0, f"--{key}={text!r}: {message!r} is not one line"
    named = message_key(key, text)
    assert named in message, f"--{key}={text!r}: {message!r} does not name {named}"
    assert len(message.encode()) < 300, f"--{key}={text!r}: message of {len(message)} chars"


def load_one(key: str, text: str) -> None:
    try:
        cfg = load_config(None, [override(key, text)])
    except ConfigError as exc:
        check_refused(key, text, str(exc))
    else:
        check_accepted(key, text, lookup(cfg, key))


@pytest.mark.parametrize("key", sorted(KEYS))
def test_every_nasty_class_for_every_numeric_key(key):
    for text in NASTY:
        load_one(key, text)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(key=st.sampled_from(sorted(KEYS)), text=values)
def test_random_numbers_for_random_keys(key, text):
    load_one(key, text)


def run_cli(*argv: str) -> tuple[int, str, str]:
    from lmforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(key=st.sampled_from(sorted(KEYS)), text=values)
def test_lmforge_config_accepts_in_range_or_exits_2_with_one_line(key, text):
    code, out, err = run_cli("config", "quickstart", "--" + override(key, text))
    if code == 0:
        assert err == ""
        data = yaml.safe_load(out)
        check_accepted(key, text, lookup(data, key))
    else:
        assert code == 2 and out == "", f"--{key}={text!r}: exit {code}: {err}"
        assert err.startswith("lmforge: config error: ") and err.endswith("\n")
        check_refused(key, text, err[:-1])
