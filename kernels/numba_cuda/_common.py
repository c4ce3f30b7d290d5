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


def fit_tile(block, rows, cols, halo_fits, accumulators_fit):
    """The largest (block, rows, cols) of a tiled kernel that fits the shared capacities, or
    None when even one item of a 1 x 1 tile does not (the direct kernel then runs).

    ``block`` templates or channels and a ``rows`` x ``cols`` tile per block: while the staged
    halo ``halo_fits(rows, cols)`` but the accumulators do not
    (``accumulators_fit(block, rows, cols)``), the block is halved; while the halo does not
    fit, the longer side of the tile."""
    while True:
        halo = halo_fits(rows, cols)
        if halo and accumulators_fit(block, rows, cols):
            return block, rows, cols
        if halo and block > 1:
            block = max(1, block // 2)  # the accumulators are the limit: a smaller block
        elif rows >= cols and rows > 1:
            rows = (rows + 1) // 2
        elif cols > 1:
            cols = (cols + 1) // 2
        elif block > 1:
            block = max(1, block // 2)
        else:
            return None


# ------------------------------------------------------------------ device functions
# Idioms the kernels share, inlined into each (Numba IR inlining: the kernels compile as if
# written out in place).


@cuda.jit(device=True, inline="always")
def unravel(o, d1, d2, d3):
    """(i0, i1, i2, i3) of the flat position o = ((i0 * d1 + i1) * d2 + i2) * d3 + i3: an
    output unit's (n, k, p, q), or a tiled kernel's block's (image, group, tile row, tile
    column)."""
    i3 = o % d3
    o //= d3
    i2 = o % d2
    o //= d2
    i1 = o % d1
    return o // d1, i1, i2, i3


@cuda.jit(device=True, inline="always")
def split(t, per_item, cols):
    """(item, row, column) of the flat position t over items of ``per_item`` positions in
    rows of ``cols``."""
    item = t // per_item
    rem = t - item * per_item
    row = rem // cols
    return item, row, rem - row * cols


@cuda.jit(device=True, inline="always")
def stage_window(dst, src, base, rows, cols, row0, col0, width, count, tid, threads, zero):
    """dst[t] = the plane ``src[base * cols:]`` of ``rows`` x ``cols`` at (row0 + t // width,
    col0 + t % width) for t < count, zero outside the plane (the padding); every thread of
    the block takes its share."""
    for t in range(tid, count, threads):
        r = t // width
        i = row0 + r
        j = col0 + (t - r * width)
        if i >= 0 and i < rows and j >= 0 and j < cols:
            dst[t] = src[(base + i) * cols + j]
        else:
            dst[t] = zero


@cuda.jit(device=True, inline="always")
def switched(z, leak, zero):
    """The switch of the matching: z where z > 0 or z is NaN, else 0 with ``leak == 0``
    (-inf included) or leak * z."""
    if z > 0 or z != z:
        return z
    if leak == 0:
        return zero
    return leak * z


@cuda.jit(device=True, inline="always")
def block_sum(red, tid, acc, threads):
    """The sum of every thread's ``acc`` in a fixed order, so deterministic: 32 strided
    partials in the shared array ``red`` (``threads`` long), then thread 0 adds them. The total
    is returned to thread 0 (other threads get a partial)."""
    red[tid] = acc
    cuda.syncthreads()
    if tid < 32:
        part = red[tid]
        for m in range(tid + 32, threads, 32):
            part += red[m]
        red[tid] = part
    cuda.syncthreads()
    total = acc
    if tid == 0:
        total = red[0]
        for m in range(1, min(32, threads)):
            total += red[m]
    return total


def fill_source(dtype, cfg):
    threads = cfg.threads

    def fill(out, value):
        start = cuda.blockIdx.x * threads + cuda.threadIdx.x
        step = cuda.gridDim.x * threads
        for t in range(start, out.size, step):
            out[t] = value

    nbt = nb_type(dtype)
    return fill, types.void(nbt[::1], nbt)


def grid_for(n, cfg):
    """Blocks of a grid-stride loop over n items."""
    return max(1, min(cdiv(n, cfg.threads), cfg.max_blocks))


def over_items(kern, n, cfg, stream):
    """``kern`` configured for a grid-stride loop over n items (blocks of ``cfg.threads``)."""
    return kern[grid_for(n, cfg), cfg.threads, stream]


def zeros(shape, dtype, stream):
    out = empty(shape, dtype, stream)
    if out.size:
        cfg = config.snapshot()
        over_items(get_kernel(fill_source, dtype, cfg), out.size, cfg, stream)(
            flat(out), np.dtype(dtype).type(0))
    return out
