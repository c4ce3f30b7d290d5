"""The backends the op tests run on, and one adapter per backend that calls an op of
``fastdrmm.ops`` on it with host NumPy arrays in and out.

conftest.py's ``backend`` fixture (parametrised over ``ALL``) and ``run`` fixture are built
from ``unavailable``, ``prepare`` and ``runner`` here:

* ``numpy``, ``cpu``: the host backends, always there;
* ``cuda-harness``: the cupy backend's CUDA C kernels compiled for the CPU (tests/cudahost.py),
  launched by the backend's own launch code with small blocks; needs g++;
* ``numba-cuda``: on a GPU, or on the CUDA simulator where none is present (conftest.py turns
  it on), with launch settings small enough for the simulator; needs numba-cuda;
* ``cupy``: needs CuPy and a CUDA GPU.
"""

import contextlib
import functools
import importlib.util
import os
import shutil

import numpy as np
import pytest

ALL = ["numpy", "cpu", "cuda-harness", "numba-cuda", "cupy"]
HOST = ["numpy", "cpu"]
# the backends that take host arrays as they are (views and odd dtypes reach the backend)
HOST_ARRAYS = ["numpy", "cpu", "cuda-harness"]
# the backends whose unpool sums collisions with atomics: the last bits may vary per run
ATOMIC = ["cuda-harness", "cupy"]

# numba-cuda runs on the CUDA simulator (set by conftest.py before this module is imported)
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def only(names):
    """Narrow a test's ``backend`` fixture (and so ``run``) to ``names``."""
    return pytest.mark.parametrize("backend", names, indirect=True)


def all_but_the_simulator(why):
    """``only`` ALL, numba-cuda skipped where it runs on the simulator: for the cases the
    simulator would take minutes over, which test_numba_cuda.py covers on smaller layers."""
    skip = pytest.mark.skipif(SIMULATOR, reason=f"numba-cuda on the CUDA simulator: {why}")
    return only([pytest.param(name, marks=skip) if name == "numba-cuda" else name
                 for name in ALL])


# numba-cuda's launch settings for the tests: several tiles and template groups per plane on
# tiny layers, and the simulator's cost (milliseconds per block barrier) kept small
NUMBA_CUDA_SMALL = {"threads": 8, "k_block": 4, "tile": (8, 8), "x_smem": 256, "w_smem": 128,
                    "z_smem": 256, "max_blocks": 8}


@functools.lru_cache(maxsize=None)
def _gpu_count():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def unavailable(name):
    """Why ``name`` cannot run here (a skip reason), or None."""
    if name == "cuda-harness" and shutil.which("g++") is None:
        return "backend 'cuda-harness' needs g++ (C++20) to build tests/cuda_harness"
    if name == "numba-cuda" and importlib.util.find_spec("numba_cuda") is None:
        return "backend 'numba-cuda' needs the numba-cuda package"
    if name == "cupy" and _gpu_count() == 0:
        return "backend 'cupy' needs CuPy and a CUDA GPU (none here)"
    return None


@functools.lru_cache(maxsize=None)
def _harness_backend():
    """The CUDA C kernels built for the CPU (once per process; the library is cached on disk)."""
    import cudahost

    return cudahost.backend(cudahost.HostDevice(cudahost.build(cudahost.SMALL), cudahost.SMALL))


def prepare(name, monkeypatch):
    """Make ``name`` runnable for one test: a context manager that holds the harness's
    registration as a host backend; numba-cuda's small launch settings are undone by
    ``monkeypatch`` after the test."""
    from fastdrmm import _backends

    if name == "cuda-harness":
        return _backends.register(name, _harness_backend())
    if name == "numba-cuda":
        from fastdrmm.kernels.numba_cuda import config

        for key, value in NUMBA_CUDA_SMALL.items():
            monkeypatch.setitem(config.LAUNCH, key, value)
    return contextlib.nullcontext()


def _device_transfer(name):
    """(to_device, to_host) for a device backend."""
    if name == "cupy":
        import cupy

        return cupy.asarray, cupy.asnumpy
    from numba import cuda

    from fastdrmm.kernels import numba_cuda

    def to_host(a):
        assert numba_cuda.arrays.is_device_array(a), f"expected a device array, got {type(a)}"
        return a.copy_to_host()

    return (lambda a: cuda.to_device(np.ascontiguousarray(a))), to_host


def runner(name):
    """``run(op_name, *args, **kwargs)``: fastdrmm.ops.<op_name> on backend ``name``, taking
    and returning host NumPy arrays (a tuple stays a tuple, None stays None)."""
    from fastdrmm import ops

    if name not in ("numba-cuda", "cupy"):
        return lambda op, *args, **kwargs: getattr(ops, op)(*args, backend=name, **kwargs)
    to_device, to_host = _device_transfer(name)

    def on_device(a):
        return to_device(a) if isinstance(a, np.ndarray) else a

    def run(op, *args, **kwargs):
        out = getattr(ops, op)(*map(on_device, args), backend=name,
                               **{key: on_device(v) for key, v in kwargs.items()})
        if isinstance(out, tuple):
            return tuple(None if o is None else to_host(o) for o in out)
        return to_host(out)

    return run
