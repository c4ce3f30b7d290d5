"""Former home of the cpu backend's shared pieces, kept while importers move.

The pieces now live in three modules with one job each:

* ``_vector`` -- the LLVM IR building blocks of the intrinsics (SIMD width, ``VectorIR``);
* ``_microkernels`` -- the SIMD micro-kernels and their register-tile sizes;
* ``_partition`` -- the parallel work split and each chunk's scratch.

Every name this module had is re-exported from there; import from those modules instead.
"""

from __future__ import annotations

from . import _vector
from ._microkernels import (  # noqa: F401
    GPIX, NL_MAX, NV_MAX, PIX, PIX1, PIX2, PIX3, PIX4, PIX_MAX, axpy, conv_tile, copy_out,
    dot_tile, gather_dots, gemm_tile, pool_step, transpose_out)
from ._partition import (PARALLEL, chunk_bounds, num_chunks, place_table,  # noqa: F401
                         vector_empty, vector_zeros)
from ._vector import VBYTES, _has_avx512, counted_loop, lanes, transpose_block  # noqa: F401
from ._vector import array_data as _data  # noqa: F401


def vector_helpers(context, builder, dt):
    """(IR) The former tuple form: ``(vty, vload(ptr, index), vstore(val, ptr, index),
    splat(scalar))``; ``_vector.vector_helpers`` returns the whole ``VectorIR``."""
    k = _vector.vector_helpers(context, builder, dt)
    return k.vty, k.vload, k.vstore, k.splat
