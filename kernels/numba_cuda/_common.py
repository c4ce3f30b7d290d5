"""Shared plumbing of the Numba CUDA backend: dtypes, kernel memoisation, streams, grids."""

import numpy as np
from numba import cuda, types

from . import config

NUMBA_TYPES = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}

_compiled = {}


def nb_type(dtype):
    return NUMBA_TYPES[np.dtype(dtype)]


def get_kernel(factory, dtype, cfg=None):
    """The compiled kernel of ``factory(dtype, cfg) -> (python function, signature)``.

    Memoised per (factory, dtype, launch configuration): shared-memory sizes and the block
    size are compile-time constants of the source, so a patched config gets its own kernel.
    Compilation is eager (explicit signature) and happens at the first launch.
    """
    cfg = config.snapshot() if cfg is None else cfg
    key = (factory.__module__, factory.__qualname__, np.dtype(dtype).str, cfg)
    kern = _compiled.get(key)
    if kern is None:
        pyfunc, sig = factory(np.dtype(dtype), cfg)
        kern = cuda.jit(sig)(pyfunc)
        _compiled[key] = kern
    return kern


def stream_of(*arrays):
    """The stream to launch on: the first input that carries one (an array imported from a
    framework through ``__cuda_array_interface__`` carries its producer's stream, and outputs of
    this backend carry the stream they were computed on); else the default stream."""
    for arr in arrays:
        s = getattr(arr, "stream", 0)
        if s is not None and not isinstance(s, int):
            return s
    return cuda.default_stream()


def empty(shape, dtype, stream):
    return cuda.device_array(tuple(int(s) for s in shape), dtype=np.dtype(dtype), stream=stream)


def flat(arr):
    """A 1-d view of a C-contiguous device array (no copy)."""
    return arr.reshape(arr.size)


def cdiv(a, b):
    return -(-a // b)


def fill_source(dtype, cfg):
    threads = cfg[0]

    def fill(out, value):
        start = cuda.blockIdx.x * threads + cuda.threadIdx.x
        step = cuda.gridDim.x * threads
        for t in range(start, out.size, step):
            out[t] = value

    nbt = nb_type(dtype)
    return fill, types.void(nbt[::1], nbt)


def grid_for(n, cfg):
    """Blocks of a grid-stride loop over n items."""
    return max(1, min(cdiv(n, cfg[0]), cfg[6]))


def zeros(shape, dtype, stream):
    out = empty(shape, dtype, stream)
    if out.size:
        cfg = config.snapshot()
        get_kernel(fill_source, dtype, cfg)[grid_for(out.size, cfg), cfg[0], stream](
            flat(out), np.dtype(dtype).type(0))
    return out
