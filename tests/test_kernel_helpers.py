"""The shared compiled helpers of the cpu kernels, against their element-by-element
definitions."""

import numpy as np
import pytest
from numba import njit

from fastdrmm.kernels.cpu._common import VBYTES, copy_out, vector_empty, vector_zeros


@njit
def _copy_out(src, sofs, place, pscale, ne, nval, vl, dst, dofs, dstride):
    copy_out(src, sofs, place, pscale, ne, nval, vl, dst, dofs, dstride)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
@pytest.mark.parametrize("vl", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("ne, nval", [(1, 1), (7, 5), (8, 8), (16, 8), (19, 13), (40, 33)])
def test_copy_out_is_the_element_by_element_transpose(dtype, vl, ne, nval, rng):
    """Whole vl x vl blocks by register transposes, the rest element by element: every
    destination element written once from its source, nothing else touched."""
    pscale = nval + 3                           # channel-last rows with slack
    place = rng.permutation(ne + 5)[:ne].astype(np.int64) * 2 + 1   # any, distinct pixels
    src = (rng.standard_normal((place.max() + 2) * pscale + 7) * 100).astype(dtype)
    dstride = ne + 4
    dofs = 3
    dst = np.full(dofs + nval * dstride + 2, -12345, dtype=dtype)
    want = dst.copy()
    sofs = 5
    for l in range(nval):
        for e in range(ne):
            want[dofs + l * dstride + e] = src[sofs + place[e] * pscale + l]
    _copy_out(src, sofs, place, pscale, ne, nval, vl, dst, dofs, dstride)
    np.testing.assert_array_equal(dst, want)


@njit
def _scratch(n, like, zeroed):
    """Many scratch arrays, as the kernels make them: their addresses, lengths and sums."""
    addresses = np.empty(40, dtype=np.int64)
    lengths = np.empty(40, dtype=np.int64)
    sums = np.empty(40, dtype=np.float64)
    for i in range(40):
        a = vector_zeros(n + i, like.dtype) if zeroed else vector_empty(n + i, like.dtype)
        if not zeroed:
            a[:] = 1
        addresses[i] = a.ctypes.data
        lengths[i] = a.shape[0]
        sums[i] = a.sum()
    return addresses, lengths, sums


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
@pytest.mark.parametrize("zeroed", [False, True])
def test_kernel_scratch_starts_on_a_vector_boundary(dtype, zeroed):
    """Numba aligns its arrays to 32 bytes only; the kernels' scratch must start on a whole
    vector (64 bytes with AVX-512), else every full-vector load may span two cache lines."""
    n = 37
    addresses, lengths, sums = _scratch(n, np.zeros(1, dtype), zeroed)
    assert (addresses % VBYTES == 0).all()
    np.testing.assert_array_equal(lengths, n + np.arange(40))
    np.testing.assert_array_equal(sums, 0 if zeroed else lengths)
