"""Shared fixtures. At import (before any test module imports numba.cuda): the CUDA simulator
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

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
