"""Shared test set-up: GPU tests skip cleanly without a GPU; ``tests/`` is importable (the
``harness`` package); fixtures every file uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # spawned workers inherit sys.path, so they import it too


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_process():
    """A world of one with megatron's groups (TP = PP = 1); yields its ``ParallelDims``."""
    from omnidiff.parallel import topology

    dims = topology.initialize(tp=1)
    yield dims
    topology.destroy()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of small models: on a shared 2-core machine two busy
    OpenMP threads are many times slower than one. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
