"""The element-wise glue of the passes and of the input checks, by where the arrays live.

Host (NumPy) arrays go through the one-pass parallel Numba kernels of
:mod:`fastdrmm.kernels.cpu.elementwise`; anything else (CuPy or other device arrays) through
the same expressions in the array's own module, via NumPy's dispatch. Both give the same
values up to the order of float64 sums (NaN and inf alike).
"""

from __future__ import annotations

import numpy as np


_KERNEL_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64,
                                                  np.uint8, np.uint16, np.uint32, np.bool_))


def _host_kernels(*arrays):
    """The Numba kernels when every array is a NumPy array of a type they take (float32/64,
    integers that fit int64, bool) and Numba imports, else None."""
    if not all(isinstance(a, np.ndarray) and a.dtype in _KERNEL_DTYPES
               for a in arrays if a is not None):
        return None
    try:
        from .kernels.cpu import elementwise
    except ImportError:  # Numba missing or broken: the NumPy expressions still work
        return None
    return elementwise


def sum_squares(a):
    """sum(a**2), accumulated in float64, as a Python float."""
    kernels = _host_kernels(a)
    if kernels is not None:
        return kernels.sum_squares(a)
    flat = a.reshape(-1)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


def negative_sum_squares(a):
    """sum(min(a, 0)**2), accumulated in float64, as a Python float."""
    kernels = _host_kernels(a)
    if kernels is not None:
        return kernels.negative_sum_squares(a)
    return sum_squares(np.minimum(a, 0))


def step_mask(h, low, dtype):
    """1 where h > 0, else ``low``, as ``dtype`` (the switches for low = 0, a leaky switch's
    slope for low = the leak)."""
    kernels = _host_kernels(h)
    if kernels is not None:
        return kernels.step_mask(h, low, dtype)
    if low == 0:
        return (h > 0).astype(dtype)
    return np.where(h > 0, 1, low).astype(dtype)


def mask_add_negative(g, mask, code, weight, code_sum=False):
    """In place on the C-contiguous ``g``: ``g = g * mask + weight * min(code, 0)`` (mask
    None: no factor); returns g, or with ``code_sum`` ``(g, negative_sum_squares(code))``
    (on the host from the same pass over code)."""
    kernels = _host_kernels(g, mask, code)
    if kernels is not None:
        return kernels.mask_add_negative(g, mask, code, weight, code_sum)
    if code_sum and code is None:
        raise ValueError("code_sum needs code")
    total = negative_sum_squares(code) if code_sum else None
    if mask is not None:
        g *= mask
    if weight:
        g += weight * np.minimum(code, 0)
    return (g, total) if code_sum else g


def index_range(idx):
    """(min, max) of a non-empty host integer array."""
    kernels = _host_kernels(idx)
    if kernels is not None:
        return kernels.index_range(idx)
    return int(idx.min()), int(idx.max())
