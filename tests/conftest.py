"""Shared fixtures: ``rng`` (seeded per test), ``backend`` and ``run`` (an op on every backend,
see runners.py). At import (before any test module imports numba.cuda): the CUDA simulator
switch for the numba-cuda backend's tests."""

import os
import shutil
import sys


def _select_cuda_simulator():
    """Run the numba-cuda tests on the CUDA simulator where no GPU is present.

    NUMBA_ENABLE_CUDASIM is read when numba.core.config is imported (the ini's warning filter
    may import numba before this file): set it, then reload numba's config. numba.cuda must not
    have been imported yet; a user's own NUMBA_ENABLE_CUDASIM always wins.
    """
    if "NUMBA_ENABLE_CUDASIM" in os.environ:
        return
    if os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi"):
        return
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba.cuda" in sys.modules:
        raise RuntimeError("numba.cuda was imported before tests/conftest.py could select the "
                           "CUDA simulator; set NUMBA_ENABLE_CUDASIM=1 in the environment")
    if "numba" in sys.modules:
        from numba.core import config

        config.reload_config()


_select_cuda_simulator()

import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import runners  # noqa: E402
from campaign import BASE_SEED, LONG, SCALE  # noqa: E402


def pytest_report_header(config):
    return (f"fastdrmm test seed: FASTDRMM_TEST_SEED={BASE_SEED}; campaign: "
            f"{'long' if LONG else 'bounded'} (x{SCALE} cases)")


@pytest.fixture
def rng(request):
    """A generator per test, seeded from the session seed and the test's id (crc32, stable
    across processes, unlike hash()), so a failure reproduces with the printed seed."""
    return np.random.default_rng([BASE_SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture(params=runners.ALL)
def backend(request, monkeypatch):
    """The name of a backend to test, each in turn, ready to run (the CUDA harness registered,
    numba-cuda's launch settings small); skips where it is unavailable. A test narrows the
    list with ``@runners.only(runners.HOST)``."""
    reason = runners.unavailable(request.param)
    if reason:
        pytest.skip(reason)
    with runners.prepare(request.param, monkeypatch):
        yield request.param


@pytest.fixture
def run(backend):
    """``run(op_name, *args, **kwargs)``: fastdrmm.ops.<op_name> on ``backend``, host NumPy
    arrays in and out."""
    return runners.runner(backend)
