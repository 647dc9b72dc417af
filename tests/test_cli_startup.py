"""The CLI starts without importing torch: `lmforge --help`, `recipes`, `config` and `plan`
answer in well under a second instead of waiting ≈ 3 s for torch to load, and
`lmforge tokenize` never needs it."""

import subprocess
import sys

import pytest

PROBE = """
import sys
from lmforge.cli import main
code = main(sys.argv[1:])
heavy = [m for m in ("torch", "transformers", "safetensors") if m in sys.modules]
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize(
    "argv",
    [["recipes"], ["config", "shakespeare-char"], ["plan", "--list"]],
)
def test_light_commands_do_not_import_torch(argv):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout, out.stdout[-500:]


def test_parser_of_every_command_builds_without_torch():
    code = (
        "import sys; from lmforge.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tokenize_does_not_import_torch(tmp_path):
    """`lmforge tokenize` (tokenizer training, encoding, shard writing) needs no torch."""
    argv = ["tokenize", "shakespeare-char", f"--output.dir={tmp_path / 'run'}"]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout, out.stdout[-500:]
    assert (tmp_path / "run" / "tokens" / "train_00000.bin").stat().st_size > 1_000_000
