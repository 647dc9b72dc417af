"""`lmforge doctor`: real checks on this machine, and missing pieces named with their fix."""

from __future__ import annotations

import json
import sys

import torch

from lmforge import doctor
from lmforge.cli import main


def test_missing_module_reports_the_extra_install_command():
    check = doctor.check_extra("eval", modules=["sacrebleu", "lmforge_no_such_module_xyz"])
    assert check.status == "missing"
    assert "lmforge_no_such_module_xyz" in check.found
    assert "sacrebleu" not in check.found  # installed packages are not reported missing
    assert check.fix == 'pip install -c constraints.txt -e ".[eval]"'
    assert "BLEU" in check.meaning  # says what stops working
    assert not check.core


def test_installed_module_is_ok_with_and_without_import():
    for do_import in (False, True):
        check = doctor.check_extra("report", modules=["json", "csv"], do_import=do_import)
        assert check.status == "ok", check


def test_missing_core_module_fails_the_exit_code():
    bad = doctor.check_core_modules(["numpy", "lmforge_no_such_core_module"])
    assert bad.status == "error" and bad.core
    assert "lmforge_no_such_core_module" in bad.found
    assert doctor.exit_code([bad]) == 1
    # A missing optional extra alone never fails the command.
    extra = doctor.check_extra("serve", modules=["lmforge_no_such_module_xyz"])
    assert doctor.exit_code([doctor.check_core_modules(), extra]) == 0


def test_cpu_flags_parsed_from_cpuinfo(tmp_path):
    with_bf16 = tmp_path / "a"
    with_bf16.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    )
    without = tmp_path / "b"
    without.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse2 avx2\n")
    assert "avx512_bf16" in doctor.cpu_flags(with_bf16)
    ok = doctor.check_cpu(with_bf16)
    assert ok.status == "ok" and "Test CPU" in ok.found and "bf16" in ok.meaning
    warn = doctor.check_cpu(without)
    assert warn.status == "warn" and "fp32" in warn.meaning
    assert doctor.cpu_flags(tmp_path / "missing") == set()


def test_torch_and_python_match_this_interpreter():
    py = doctor.check_python()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in py.found
    t = doctor.check_torch()
    assert torch.__version__ in t.found
    assert t.status == "ok"  # the test environment pins a supported torch


def test_gpu_check_agrees_with_torch():
    check = doctor.check_gpu()
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in check.found
    else:
        assert check.status == "warn" and "no CUDA device" in check.found


def test_disk_check_thresholds(tmp_path):
    assert doctor.check_disk(tmp_path / "not" / "yet", min_free_gb=0.0).status == "ok"
    low = doctor.check_disk(tmp_path, min_free_gb=1e12)  # more than any disk has
    assert low.status == "warn" and "keep_last" in low.fix


def test_chromium_missing_path(tmp_path):
    check = doctor.check_chromium(tmp_path / "chromium")
    assert check.status == "missing" and "apt-get install" in check.fix


def test_cli_json_lists_every_check(capsys, tmp_path):
    assert main(["doctor", "--json", "--runs", str(tmp_path)]) == 0
    checks = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in checks}
    assert {"python", "torch", "core packages", "disk", "chromium", "shared data"} <= names
    assert {f"extra: {e}" for e in doctor.EXTRAS} <= names
    assert all(c["status"] in ("ok", "warn", "missing", "error") for c in checks)


def test_cli_text_output(capsys, tmp_path):
    assert main(["doctor", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "core: ready to train" in out and "[ok  ] torch" in out


def test_kernel_check_reports_the_build_and_its_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    ok = doctor.check_kernels()
    if ok.status == "ok":  # a compiler is here: the library it names exists
        assert (tmp_path / "cache").is_dir() and str(tmp_path / "cache") in ok.found
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    bad = doctor.check_kernels()
    assert bad.status == "warn" and str(broken) in bad.found and "apt install gcc" in bad.fix
