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
