"""How the cpu kernels split their work and lay out each chunk's scratch.

Parallel loops are explicit ``prange`` loops over chunks (``PARALLEL`` switches off Numba's
other automatic parallelisations). The split (``chunk_bounds``) depends only on the problem
size and the number of chunks, never on timing, so results do not depend on the thread count.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from ._vector import VBYTES

# Numba's automatic conversion of array expressions into parallel loops is switched off
# (nothing to gain inside a chunk, and it costs compile time): only prange.
PARALLEL = {"prange": True, "comprehension": False, "numpy": False, "reduction": False,
            "setitem": False, "stencil": False, "fusion": False, "inplace_binop": False}


def num_chunks(work):
    """How many parallel chunks to cut ``work`` independent items into."""
    return max(1, min(int(work), numba.get_num_threads()))


@njit(cache=True)
def chunk_bounds(chunk, nchunks, nitems):
    """Items [lo, hi) of one chunk out of ``nchunks`` near-equal contiguous chunks."""
    return chunk * nitems // nchunks, (chunk + 1) * nitems // nchunks


@njit(inline="always")
def vector_empty(n, dtype):
    """An uninitialised 1-D scratch array of ``n`` elements whose first element starts a
    SIMD register's worth of bytes (``VBYTES``): a vector at a whole number of vectors from
    it never straddles two cache lines. Numba aligns its arrays to 32 bytes only, so with
    64-byte vectors half of the processes got every such load split in two (the sparse B
    kernel: 3.7 ms aligned, 5.4 ms not, depending on the process)."""
    raw = np.empty(n + VBYTES, dtype=dtype)
    skip = (VBYTES - raw.ctypes.data % VBYTES) % VBYTES // raw.itemsize
    return raw[skip:skip + n]


@njit(inline="always")
def vector_zeros(n, dtype):
    """``vector_empty`` filled with zeros."""
    out = vector_empty(n, dtype)
    out[:] = 0
    return out


@njit(cache=True)
def place_table(ho, wo, row_stride, col_stride, origin):
    """``place[i*wo + j] = origin + i*row_stride + j*col_stride``: the buffer offset of each
    plane position, so a flat argmax f needs no division (64-bit idiv per unit was a
    measurable share of the unit loops)."""
    place = np.empty(ho * wo, dtype=np.int64)
    for i in range(ho):
        for j in range(wo):
            place[i * wo + j] = origin + i * row_stride + j * col_stride
    return place
