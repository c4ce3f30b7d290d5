"""One-pass element-wise kernels for the training step's glue (Numba CPU, parallel).

Each replaces a chain of NumPy expressions that made a temporary per operation and ran on one
core (measured on the conv-small EG step at batch 128: about 25 ms of a 145 ms step went to
such chains). Reductions are cut into a fixed number of chunks, summed in chunk order, so
their bits do not depend on the thread count. NaN propagates as in the NumPy expressions they
replace (``np.minimum(v, 0)`` is NaN for a NaN ``v``; ``v > 0`` is False).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import buffers
from ._common import PARALLEL, chunk_bounds

__all__ = ["sum_squares", "negative_sum_squares", "index_range", "step_mask",
           "mask_add_negative"]

_CHUNKS = 16  # fixed, so the sums are the same bits for any number of threads
_UNROLL = 8  # independent float64 accumulators: the adds do not wait on each other


@njit(inline="always")
def _negative(v, zero):
    """min(v, 0) (``zero`` of v's type), NaN for NaN."""
    return zero if v >= 0 else v


@njit(parallel=PARALLEL, cache=True)
def _sum_squares(flat, negative_only, out):
    nchunks = out.shape[0]
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, flat.shape[0])
        part = flat[lo:hi]  # indices from 0: no wrap-around test, the loop vectorises
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        body = part.shape[0] // _UNROLL * _UNROLL
        for i in range(0, body, _UNROLL):
            v0, v1 = np.float64(part[i]), np.float64(part[i + 1])
            v2, v3 = np.float64(part[i + 2]), np.float64(part[i + 3])
            v4, v5 = np.float64(part[i + 4]), np.float64(part[i + 5])
            v6, v7 = np.float64(part[i + 6]), np.float64(part[i + 7])
            if negative_only:
                v0, v1, v2, v3 = (_negative(v0, 0.0), _negative(v1, 0.0),
                                  _negative(v2, 0.0), _negative(v3, 0.0))
                v4, v5, v6, v7 = (_negative(v4, 0.0), _negative(v5, 0.0),
                                  _negative(v6, 0.0), _negative(v7, 0.0))
            s0 += v0 * v0
            s1 += v1 * v1
            s2 += v2 * v2
            s3 += v3 * v3
            s4 += v4 * v4
            s5 += v5 * v5
            s6 += v6 * v6
            s7 += v7 * v7
        for i in range(body, part.shape[0]):
            v = np.float64(part[i])
            if negative_only:
                v = _negative(v, 0.0)
            s0 += v * v
        out[ch] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


def _reduce(flat, negative_only):
    out = np.empty(_CHUNKS, dtype=np.float64)
    _sum_squares(flat, negative_only, out)
    total = 0.0
    for part in out:  # chunk order
        total += part
    return float(total)


def sum_squares(a):
    """sum(a**2) accumulated in float64."""
    return _reduce(np.ascontiguousarray(a).reshape(-1), False)


def negative_sum_squares(a):
    """sum(min(a, 0)**2) accumulated in float64 (no temporary)."""
    return _reduce(np.ascontiguousarray(a).reshape(-1), True)


@njit(parallel=PARALLEL, cache=True)
def _index_range(flat, lows, highs):
    nchunks = lows.shape[0]
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, flat.shape[0])
        part = flat[lo:hi]
        low, high = part[0], part[0]
        for i in range(1, part.shape[0]):
            v = part[i]
            low = min(low, v)
            high = max(high, v)
        lows[ch] = low
        highs[ch] = high


def index_range(idx):
    """(min, max) of a non-empty integer array in one pass."""
    flat = np.ascontiguousarray(idx).reshape(-1)
    nchunks = max(1, min(_CHUNKS, flat.shape[0]))
    lows = np.empty(nchunks, dtype=np.int64)
    highs = np.empty(nchunks, dtype=np.int64)
    _index_range(flat, lows, highs)
    return int(lows.min()), int(highs.max())


@njit(parallel=PARALLEL, cache=True)
def _step_mask(flat, low, out):
    nchunks = _CHUNKS
    one = out.dtype.type(1)
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, flat.shape[0])
        src, dst = flat[lo:hi], out[lo:hi]
        for i in range(src.shape[0]):
            dst[i] = one if src[i] > 0 else low


def step_mask(h, low, dtype):
    """An array of ``dtype`` and h's shape: 1 where h > 0, else ``low`` (0: the switches;
    the leak: the slope of a leaky switch)."""
    h = np.ascontiguousarray(h)
    out = buffers.empty(h.shape, dtype)
    _step_mask(h.reshape(-1), out.dtype.type(low), out.reshape(-1))
    return out


@njit(parallel=PARALLEL, cache=True)
def _mask_add_negative(g, mask, use_mask, code, use_code, weight):
    nchunks = _CHUNKS
    w = g.dtype.type(weight)
    zero = code.dtype.type(0)
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, g.shape[0])
        gp = g[lo:hi]
        if use_mask and use_code:
            mp, cp = mask[lo:hi], code[lo:hi]
            for i in range(gp.shape[0]):
                gp[i] = gp[i] * mp[i] + w * _negative(cp[i], zero)
        elif use_mask:
            mp = mask[lo:hi]
            for i in range(gp.shape[0]):
                gp[i] = gp[i] * mp[i]
        elif use_code:
            cp = code[lo:hi]
            for i in range(gp.shape[0]):
                gp[i] = gp[i] + w * _negative(cp[i], zero)


def mask_add_negative(g, mask, code, weight):
    """In place: ``g = g * mask + weight * min(code, 0)`` (``mask`` None: no factor; weight
    0: no term, so a non-finite code does not reach g through 0 * inf).

    ``g`` must be C-contiguous; ``mask`` and ``code`` are read with g's shape."""
    if not g.flags.c_contiguous:
        raise ValueError("g must be C-contiguous")
    flat = g.reshape(-1)
    placeholder = np.zeros(1, dtype=g.dtype)
    use_mask, use_code = mask is not None, bool(weight)
    mask = np.ascontiguousarray(mask, dtype=g.dtype).reshape(-1) if use_mask else placeholder
    code = np.ascontiguousarray(code, dtype=g.dtype).reshape(-1) if use_code else placeholder
    if (use_mask and mask.shape[0] != flat.shape[0]) or (use_code and
                                                        code.shape[0] != flat.shape[0]):
        raise ValueError("mask and code must have g's size")
    _mask_add_negative(flat, mask, use_mask, code, use_code, float(weight))
    return g
