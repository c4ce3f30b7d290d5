"""The template statistics B and s of 3x3 layers by Winograd's F(3x3, 2x2) (Numba CPU).

B[k, c] (3x3) sums, over samples and plane positions, the unpooled code (times the switches)
times the 3x3 window of the padded input there: a correlation of the input with the code.
Over a 2x2 block of plane positions the nine sums are a minimal filtering F(3x3, 2x2), the
transpose of the matching's F(2x2, 3x3) (Lavin & Gray 2016)::

    V[xi, t, c] = (B^T d[t, c] B)[xi]       the input's 4x4 block of tile t (as in matching)
    W[xi, t, k] = (A dy[t, k] A^T)[xi]      the code's 2x2 block, A = [[1,0],[1,1],[1,-1],[0,-1]]
    M[xi, k, c] = sum_t W[xi, t, k] V[xi, t, c]      16 matrix products, reduced over tiles
    B[k, c]     = G^T M[:, k, c] G                    once, in float64, at the end

so 16 products per (tile, k, c) instead of 36. The reduction over samples runs in a fixed
number of chunks whose partial M are added in order: the result does not depend on the
thread count. A sample with a non-finite input, code or switch value (seen in V or W, where
every value of the block shows up with a coefficient +-1) is left out and flagged; the caller
computes its share with the exact kernels, so NaN/inf land where the reference puts them.

Accuracy: the transforms pair code values with input values at other offsets, so B's error
is bounded a priori by ``4 (T + 12) u sum_t SU SX`` (see ``certified``) rather than by the
classical bound; the caller (``statistics.template_stats``) keeps Winograd's B only where
that is within the contract of ``kernels.contracts`` for every entry (and takes this path
only where x and the code keep one sign, where B cannot cancel), else the exact kernels'.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import buffers
from ..contracts import CONSTANTS, unit_roundoff
from ._microkernels import GPIX, PIX_MAX, gemm_tile
from ._partition import PARALLEL, chunk_bounds, vector_empty, vector_zeros
from ._tiles import channel_blocks
from ._units import unpool
from ._vector import I64, lanes, vector_helpers
from .winograd import saves_products
from .winograd_transforms import (any_non_finite, code_in, input_in, load_block,
                                  transform_blocks)

__all__ = ["applies", "certified", "same_signs", "template_stats_bs"]

_MIN_CHANNELS = 16
_CHUNKS = 4           # fixed sample chunks (determinism; each holds a partial M), fewer
_REDUCTION = 64       # tiles per product call at least, when samples are small


def applies(x, code, geometry):
    """3x3 templates with >= 16 input channels and >= 16 templates, on a plane where the
    blocks save products (``winograd.saves_products``)."""
    return (tuple(geometry.kernel) == (3, 3) and x.shape[1] >= _MIN_CHANNELS
            and code.shape[1] >= _MIN_CHANNELS and saves_products(geometry.plane))


@intrinsic
def code_transform(typingctx, cb, base, cs, rs, w, wofs, ws):
    """One vector of templates of ``W = A dy A^T`` for a 2x2 block of the channel-last code::

        dy[i][j] = cb[base + i*rs + j*cs + l]            (i, j < 2; l < VL lanes)
        w[wofs + (4 a + b)*ws + l] = (A dy A^T)[a][b]    A = [[1, 0], [1, 1], [1, -1], [0, -1]]

    Returns whether any W is non-finite. No bounds checks.
    """
    sig = types.boolean(cb, base, cs, rs, w, wofs, ws)

    def codegen(context, builder, signature, args):
        k = vector_helpers(context, builder, cb.dtype, signature, args)
        base_, cs_, rs_, wofs_, ws_ = k.int64("base", "cs", "rs", "wofs", "ws")
        cptr, wptr = k.data("cb", "w")
        dy = load_block(k, cptr, base_, rs_, cs_, 2)

        def a_times(a0, a1):  # A applied to a column (or A^T from the right to a row)
            return a0, builder.fadd(a0, a1), builder.fsub(a0, a1), builder.fneg(a1)

        cols = [a_times(dy[0][j], dy[1][j]) for j in range(2)]   # cols[j][a]
        out = []
        for a in range(4):
            row = a_times(cols[0][a], cols[1][a])
            for b in range(4):
                k.vstore(row[b], wptr, builder.add(wofs_, builder.mul(ws_, I64(4 * a + b))))
            out.extend(row)
        return any_non_finite(builder, out)

    return sig, codegen


class Code(NamedTuple):
    """The code, its positions and switches (if ``use_sw``), flat; ``dense``: one unit per
    plane position; plane position f goes to ``cplace[f]`` of the channel-last code
    buffer."""
    codef: np.ndarray
    indf: np.ndarray
    swf: np.ndarray
    use_sw: bool
    dense: bool
    cplace: np.ndarray


class Layout(NamedTuple):
    """Sizes of one call: plane positions, the tile grid (th, tw), the padded channel-last
    input (hrow x wrow x cpad), the code buffer's columns (ccol) and templates (kpad), lanes,
    samples per product group, chunks."""
    plane: int
    th: int
    tw: int
    hrow: int
    wrow: int
    ccol: int
    cpad: int
    kpad: int
    vl: int
    spi: int
    nchunks: int


@njit(parallel=PARALLEL, cache=True)
def _bs_kernel(x, xf, xplace, code, layout, blk_c0, blk_nv, mpart, spart, redo):
    """Partial M and s per chunk of samples (``mpart``, ``spart``) of the input x (flat in
    ``xf``, channel-last places ``xplace``) and the ``code`` (a ``Code``), sizes ``layout``
    (a ``Layout``); ``redo[n]`` = 1 flags a sample left out (a non-finite value, or a dense
    code whose positions are not the identity)."""
    codef, indf, swf, use_sw, dense, cplace = code
    plane, th, tw, hrow, wrow, ccol, cpad, kpad, vl, spi, nchunks = layout
    n_, c_ = x.shape[:2]
    k_ = spart.shape[1]
    tiles = th * tw
    ngroups = -(-n_ // spi)
    vstride = spi * tiles * cpad + vl
    wstride = spi * tiles * kpad + vl
    mrows = kpad + PIX_MAX       # rows of M per transform point; the last ones are scratch
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, ngroups)
        xp = vector_zeros(hrow * wrow * cpad, x.dtype)
        cb = vector_zeros(2 * th * ccol * kpad, x.dtype)
        v = vector_empty(16 * vstride, x.dtype)
        w = vector_empty(16 * wstride, x.dtype)
        boff = np.empty(spi * tiles, dtype=np.int64)
        aoff = np.empty(spi * tiles, dtype=np.int64)
        abase = np.empty(PIX_MAX, dtype=np.int64)
        aofs = np.empty(PIX_MAX, dtype=np.int64)
        ssum = vector_empty(kpad, x.dtype)
        macc = mpart[chunk].reshape(-1)
        sacc = spart[chunk]
        # zeroed here, by the chunk's thread: a serial fill of the 4 partial M took ~0.9 ms
        # of a conv-small EG step
        macc[:] = 0
        sacc[:] = 0
        for sg in range(lo, hi):
            n0 = sg * spi
            ns = min(spi, n_ - n0)
            m = 0
            for s in range(ns):
                n = n0 + s
                bad = False
                # the border stays zero
                input_in(xf, n, c_, x.shape[2] * x.shape[3], vl, xplace, xp)
                bad |= transform_blocks(xp, wrow, cpad, th, tw, s, vl, v, vstride, True)
                # the unpooled code (times the switches), channel-last, zero beyond the plane
                bad |= code_in(codef, indf, swf, use_sw, dense, n, k_,
                               codef.shape[0] // n_ // k_, plane, vl, cplace, cb)
                for e in range(kpad):
                    ssum[e] = 0
                for f in range(plane):
                    base = cplace[f]
                    for e in range(kpad):
                        ssum[e] += cb[base + e]
                for ti in range(th):
                    for tj in range(tw):
                        src = (2 * ti * ccol + 2 * tj) * kpad
                        dst = ((s * th + ti) * tw + tj) * kpad
                        for q in range(0, kpad, vl):
                            bad |= code_transform(cb, src + q, kpad, ccol * kpad, w, dst + q,
                                                  wstride)
                if bad:
                    redo[n] = 1
                    continue
                for e in range(k_):
                    sacc[e] += ssum[e]
                for t in range(tiles):
                    boff[m] = (s * tiles + t) * cpad
                    aoff[m] = (s * tiles + t) * kpad
                    m += 1
            if m == 0:
                continue
            for xi in range(16):
                wb = w[xi * wstride:]
                mb = macc[xi * mrows * cpad:]
                for blk in range(blk_c0.shape[0]):
                    c0 = blk_c0[blk]
                    nv = blk_nv[blk]
                    npx = GPIX[nv]
                    vb = v[xi * vstride + c0:]
                    for k0 in range(0, k_, npx):
                        for p in range(npx):
                            kk = k0 + p
                            abase[p] = min(kk, k_ - 1)
                            aofs[p] = (kk if kk < k_ else kpad + p) * cpad + c0
                        gemm_tile(mb, aofs, wb, abase, aoff, vb, boff, 0, m, nv, GPIX)


@njit(inline="always")
def _gt(a0, a1, a2, a3):
    """G^T of F(2x2, 3x3) applied to 4 values (float64): 3 values."""
    return a0 + 0.5 * (a1 + a2), 0.5 * (a1 - a2), 0.5 * (a1 + a2) + a3


@njit(parallel=PARALLEL, cache=True)
def _finish(mpart, spart, big_b, s):
    """``big_b[k, c] = G^T M[:, k, c] G`` and ``s``, with M and s the chunks' partial sums
    added in chunk order, all in float64, rounded once to big_b's and s's dtype. Parallel
    over the templates (the partial sums, ~4 x 16 x K x C floats, were added and transformed
    by whole-array NumPy passes: ~3 ms of a conv-small EG step, serial)."""
    nch = mpart.shape[0]
    k_, c_ = big_b.shape[:2]
    for k in prange(k_):
        mm = np.empty((16, c_), dtype=np.float64)
        t = np.empty((3, 4), dtype=np.float64)
        for xi in range(16):         # rows of c read contiguously, chunk by chunk in order
            row = mpart[0, xi, k]
            for c in range(c_):
                mm[xi, c] = row[c]
            for i in range(1, nch):
                row = mpart[i, xi, k]
                for c in range(c_):
                    mm[xi, c] += row[c]
        for c in range(c_):
            for b in range(4):       # over the first axis of the 4x4 point grid
                t[0, b], t[1, b], t[2, b] = _gt(mm[b, c], mm[4 + b, c], mm[8 + b, c],
                                                mm[12 + b, c])
            for i in range(3):       # then over the second
                g0, g1, g2 = _gt(t[i, 0], t[i, 1], t[i, 2], t[i, 3])
                big_b[k, c, i, 0] = g0
                big_b[k, c, i, 1] = g1
                big_b[k, c, i, 2] = g2
    for k in range(k_):
        acc = np.float64(spart[0, k])
        for i in range(1, nch):
            acc += spart[i, k]
        s[k] = acc


def template_stats_bs(x, code, idx, geometry, switches):
    """B (K, C, 3, 3) and s (K,) by Winograd, and the flags (int8, 1 = left out) of the
    samples whose share the caller must add with the exact kernels."""
    n, c, hh, ww = x.shape
    k = code.shape[1]
    ph, pw = geometry.padding
    ho, wo = geometry.plane
    dtype = x.dtype
    vl = lanes(dtype)
    cpad, kpad = -(-c // vl) * vl, -(-k // vl) * vl
    th, tw = -(-ho // 2), -(-wo // 2)
    hrow = max(hh + 2 * ph, 2 * th + 2)
    wrow = max(ww + 2 * pw, 2 * tw + 2)
    ccol = 2 * tw
    hp, wp = code.shape[2:]
    dense = hp * wp == ho * wo
    rows, cols = np.divmod(np.arange(ho * wo, dtype=np.int64), wo)
    cplace = (rows * ccol + cols) * kpad
    spi = max(1, _REDUCTION // (th * tw))
    ngroups = -(-n // spi)
    nchunks = min(_CHUNKS, ngroups)
    c0, nv, _ = channel_blocks(c, vl)
    mpart = buffers.empty((nchunks, 16, kpad + PIX_MAX, cpad), dtype)  # zeroed by the kernel
    spart = np.empty((nchunks, k), dtype=dtype)
    redo = np.zeros(n, dtype=np.int8)
    codef = np.ascontiguousarray(code).reshape(-1)
    indf = np.ascontiguousarray(idx, dtype=np.int32).reshape(-1)
    use_sw = switches is not None
    swf = (np.ascontiguousarray(switches, dtype=dtype).reshape(-1) if use_sw
           else np.zeros(1, dtype))
    xf = np.ascontiguousarray(x).reshape(-1)
    rows, cols = np.divmod(np.arange(hh * ww, dtype=np.int64), ww)
    xplace = ((rows + ph) * wrow + pw + cols) * cpad
    _bs_kernel(x, xf, xplace, Code(codef, indf, swf, use_sw, dense, cplace),
               Layout(ho * wo, th, tw, hrow, wrow, ccol, cpad, kpad, vl, spi, nchunks), c0, nv,
               mpart, spart, redo)
    big_b = buffers.empty((k, c, 3, 3), dtype)
    s = np.empty(k, dtype=dtype)
    _finish(mpart, spart, big_b, s)
    return big_b, s, redo


# The accuracy check
# ------------------
# One entry of B is sum_xi G G (sum_t W[xi, t] V[xi, t]): the code's and the input's
# transforms (2 roundings each), the products summed over the tiles of a chunk and the chunks
# (at most T = N Ho Wo additions), the float64 finish. Each pairs a code value p of a tile's
# 2x2 block with an input value q of its 4x4 block with the weight
# K'_ab(p, q) = k1(a, p1, q1) k1(b, p2, q2) <= 2 * 2, so the error of B[k, c] (every tap) is
# at most
#
#     4 (T + 12) u sum_{n, t} SU[n, t, k] SX[n, t, c]
#
# (SU: the sum of |code * switches| over the tile's 2x2 positions, SX: of |xpad| over its 4x4
# block; the same bound covers the exact kernels' share of the samples left out). Where it is
# at most c T u (|B| - error) for every entry (|B_exact| <= sum |a||b|), B meets the contract;
# otherwise the caller computes B with the exact kernels. Without cancellation (input and code
# of one sign, the usual ReLU layers) |B| is sum |a||b| and the check passes by a wide margin;
# with mixed signs it rarely can, so the dispatcher asks ``same_signs`` first.

_HIGHER_ORDER = 1.0 + 2.0 ** -10


def same_signs(x, code, switches):
    """Whether x and code * switches each keep one sign (zeros aside)."""
    def one_sign(a):
        return a.size == 0 or bool(a.min() >= 0) or bool(a.max() <= 0)

    if not one_sign(x):
        return False
    if switches is None:
        return one_sign(code)
    with np.errstate(invalid="ignore", over="ignore"):
        return one_sign(code * switches)


def certified(x, code, idx, geometry, switches, big_b, c=None):
    """Whether every entry of ``big_b`` (Winograd's B plus the exact share of the samples it
    left out) is within the accuracy contract (``kernels.contracts``)."""
    c = CONSTANTS["template_stats.B"] if c is None else c
    n, ch = x.shape[:2]
    k = code.shape[1]
    ph, pw = geometry.padding
    ho, wo = geometry.plane
    th, tw = -(-ho // 2), -(-wo // 2)
    if n == 0 or th <= 0 or tw <= 0:
        return True
    # the tiles' sums of |code * switches| (2x2 positions of the unpooled plane) and of |xpad|
    # (its 4x4 blocks), compiled: NumPy's float64 temporaries took ~30 ms at N = 128
    unpooled = unpool(code, idx, (ho, wo), switches)
    su = np.empty((n, k, th * tw))
    _tile_abs_sums(unpooled, 0, 0, 2, th, tw, su)
    sx = np.empty((n, ch, th * tw))
    _tile_abs_sums(x, ph, pw, 4, th, tw, sx)
    with np.errstate(invalid="ignore", over="ignore"):
        # one BLAS product (einsum's loops took ~30 ms at N = 128): (K, N T) x (N T, C)
        pairs = np.tensordot(su, sx, axes=([0, 2], [0, 2]))
        terms = n * ho * wo + 1
        u = unit_roundoff(x.dtype)
        err = 4 * (terms + 12) * _HIGHER_ORDER * u * pairs
        room = c * terms * u
        ok = err[:, :, None, None] * (1 + room) <= room * np.abs(big_b.astype(np.float64))
    return bool(ok.all())


@njit(parallel=PARALLEL, cache=True)
def _tile_abs_sums(a, ph, pw, m, th, tw, out):
    """out[n, c, ti * tw + tj] = the float64 sum of |a[n, c]| over the m x m block whose
    top-left corner is (2 ti - ph, 2 tj - pw) (positions outside the array count as zeros)."""
    n_, c_, hh, ww = a.shape
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        for ti in range(th):
            r0 = 2 * ti - ph
            for tj in range(tw):
                q0 = 2 * tj - pw
                total = 0.0
                for r in range(max(r0, 0), min(r0 + m, hh)):
                    for q in range(max(q0, 0), min(q0 + m, ww)):
                        total += abs(np.float64(a[n, c, r, q]))
                out[n, c, ti * tw + tj] = total
