"""The register-tile pieces the cpu kernels share: blocks of channels, the templates laid out
for ``conv_tile``, the pooling of a buffer of switched rows, power-of-two blocks.

A kernel handles the output channels (or templates) in blocks of ``nv`` SIMD vectors, at
most ``NV_MAX``: ``channel_blocks`` cuts them, and each tile call passes the run-time ``nv``
with the table of pixels by ``nv`` (``PIX`` for ``conv_tile``, ``GPIX`` for ``gemm_tile``;
see ``_microkernels``).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from .. import buffers
from ._microkernels import NV_MAX, pool_step

__all__ = ["channel_blocks", "relayout", "pool_group", "pow2_block"]


@functools.lru_cache(maxsize=256)
def channel_blocks(k, vl):
    """Split ceil(k / vl) vectors of channels into near-equal blocks of at most NV_MAX:
    ``(k0, nv, nvec)``, the first channel and the vectors of each block, and the vectors in
    all.

    Cached (~20 calls a training step): the arrays are shared, read them only."""
    nvec = -(-k // vl)
    nblk = -(-nvec // NV_MAX)
    sizes = [nvec // nblk + (1 if i < nvec % nblk else 0) for i in range(nblk)]
    k0 = np.zeros(nblk, dtype=np.int64)
    nv = np.asarray(sizes, dtype=np.int64)
    k0[1:] = np.cumsum(nv[:-1]) * vl
    return k0, nv, nvec


def relayout(templates, bias, vl):
    """Templates -> flat blocks [b][t][lane] (block b at ``wofs[b]``, every tap's
    ``nv[b] * vl`` weights contiguous, channels padded with zeros to whole vectors); bias ->
    padded to whole vectors. Returns ``(wr, bpad, k0, nv, wofs)``."""
    k, c, kh, kw = templates.shape
    k0, nv, nvec = channel_blocks(k, vl)
    kpad = nvec * vl
    taps = c * kh * kw
    wk = np.zeros((kpad, taps), dtype=templates.dtype)
    wk[:k] = templates.reshape(k, taps)
    wr = buffers.aligned_zeros(taps * kpad, templates.dtype)
    wofs = np.zeros(len(k0), dtype=np.int64)
    pos = 0
    for b in range(len(k0)):
        width = nv[b] * vl
        wr[pos:pos + taps * width].reshape(taps, width)[...] = wk[k0[b]:k0[b] + width].T
        wofs[b] = pos
        pos += taps * width
    bpad = buffers.aligned_zeros(kpad, bias.dtype)
    bpad[:k] = bias
    return wr, bpad, k0, nv, wofs


@njit(inline="always")
def pool_group(zb, nv, kbw, g0, g1, r0, wused, wp, wo, sh, sw, poolh, poolw, best, barg):
    """Max-pool the switched rows of one group, vectorised over the block's channels.

    ``zb`` holds plane rows from ``r0``, ``wused`` pixels of ``kbw`` channels each; pooled
    rows ``[g0, g1)`` (``wp`` units each, windows ``poolh x poolw`` at strides ``sh, sw``) go
    to ``best``/``barg`` with flat positions on a plane ``wo`` wide. Candidates in row-major
    order; the first maximum wins; a NaN wins over every number and the first NaN sticks
    (see ``pool_step``).
    """
    for pp in range(g0, g1):
        rr = pp * sh - r0
        for q in range(wp):
            cc = q * sw
            e = ((pp - g0) * wp + q) * kbw
            flat0 = pp * sh * wo + cc
            for a in range(poolh):
                for bb in range(poolw):
                    src = ((rr + a) * wused + cc + bb) * kbw
                    pool_step(zb, src, best, barg, e, np.int32(flat0 + a * wo + bb), nv,
                              a == 0 and bb == 0)


@njit(inline="always")
def pow2_block(n):
    """Largest of 4, 2, 1 not above n."""
    if n >= 4:
        return 4
    if n >= 2:
        return 2
    return 1
