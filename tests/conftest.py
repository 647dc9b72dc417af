import os

import pytest
import torch

from lmforge.paths import shared_data

# Tests run several processes on 2 cores; one intra-op thread each keeps them fair and fast.
torch.set_num_threads(int(os.environ.get("LMFORGE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def shared() -> "os.PathLike[str]":
    path = shared_data()
    if not path.is_dir():
        pytest.fail(f"shared test data not found at {path}; set LMFORGE_SHARED_DATA")
    return path


@pytest.fixture(params=["kernel", "torch"])
def attention_impl(request, monkeypatch) -> str:
    """Run the test with the C attention kernel (`lmforge.kernels`) and with its torch form.

    The kernel must build wherever a C compiler is on PATH: a failure there fails the
    test rather than falling back unseen."""
    from lmforge import kernels

    if request.param == "kernel":
        if kernels.find_compiler() is None:
            pytest.skip("no C compiler: the kernel cannot be built here")
        kern = kernels.load()
        monkeypatch.setattr(kernels, "_kernels", kern)
    else:
        monkeypatch.setattr(kernels, "_kernels", None)
    monkeypatch.setattr(kernels, "_tried", True)
    return request.param
