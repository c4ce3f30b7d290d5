"""The Gram matrix G = D^T D of the M-step statistics (Numba CPU).

Rows and columns ordered (k, a, b). With S[(k,a,b)] the cropped image painted by tap (k,a,b)
(G = S S^T)::

    G[(k,a,b),(k',a',b')] = sum_n sum_{Q in Rect(a,b)} U[k,Q] U[k',Q+d],  d = (a-a', b-b')

where Q runs over plane positions, Rect(a,b) is the set of positions whose tap (a,b) lands
inside the cropped image and U is the unpooled code (collisions summed first). Rect(a,b) is
a product of a row interval and a column interval; plane rows (columns) with the same set of
valid taps a (b) form a class, so that within a class block the sums depend on the lag d
only. The kernel therefore accumulates, over all samples, the lag correlations
``R[block, d][k, :] = sum_n sum_{Q in block} U[k,Q] U[:,Q+d]`` and assembles G from them once
at the end. Each R row is a sparse-times-dense product: the non-zero U[k,Q] of the block (a
list built without branches) times the channel-last unpooled sample, shifted by d,
accumulated in registers by ``gather_dots`` for up to 4 lags x 4 vectors of k' at a time.
That visits each non-zero U[k,Q] once per lag, about T/4 times fewer operations than
pixel-by-pixel outer products (with valid padding there is a single block: the plain lag
correlation). Wide blocks are walked in tiles of rows so that the part of U a lag reads stays
in L1 across all k of a thread. Single-position blocks (the corners of a large padding) add
their products straight into G. Rows k are split across threads (each thread builds every
sample's unpooled U and owns R[..., k, :] and G[k...] for its k), so there is no reduction
and the result does not depend on the thread count. Finally the upper triangle is mirrored,
so G is exactly symmetric like S S^T.

Exact IEEE semantics of the dense reference: a sample whose unit values hold inf/NaN is
accumulated densely (every pixel, every pair of taps, structural zeros included), as numpy
does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .. import buffers
from ._microkernels import NL_MAX, axpy, gather_dots
from ._partition import (PARALLEL, chunk_bounds, num_chunks, place_table, vector_empty,
                         vector_zeros)
from ._tiles import pow2_block
from ._units import sample_finite, switch_args, unit_value, unpool_bordered
from ._vector import lanes

__all__ = ["GramPlan", "gram_plan", "gram_matrix"]

_L1_TILE_BYTES = 24 * 1024  # rows of the unpooled buffer one lag sweep should keep in L1


class GramPlan(NamedTuple):
    """The class blocks of the plane for the Gram kernel (see ``_stats_gram``).

    Row classes ``[rc_lo, rc_hi)`` and column classes ``[cc_lo, cc_hi)`` of valid taps; lag
    blocks (row class ``blk_rc``, column class ``blk_cc``, lag sums at ``blk_off`` in the R
    buffer) with the buffer offsets of their positions ``blk_pos[blk_row[blk, qi]:blk_row[blk,
    qi + 1]]`` row by row, walked in row tiles ``[tile_lo, tile_hi)`` of kind ``tile_kind``
    (``blk_tiled`` blocks in tiles of a few rows, the others whole), at most ``tile_cap``
    positions a tile; single positions ``dir_pos`` (classes ``dir_rc``, ``dir_cc``) that add
    straight into G; ``rsize`` elements of lag sums in all."""
    rc_lo: np.ndarray
    rc_hi: np.ndarray
    cc_lo: np.ndarray
    cc_hi: np.ndarray
    blk_rc: np.ndarray
    blk_cc: np.ndarray
    blk_off: np.ndarray
    blk_row: np.ndarray
    blk_pos: np.ndarray
    blk_tiled: np.ndarray
    dir_pos: np.ndarray
    dir_rc: np.ndarray
    dir_cc: np.ndarray
    tile_lo: np.ndarray
    tile_hi: np.ndarray
    tile_kind: np.ndarray
    tile_cap: int
    rsize: int


@njit(inline="always")
def _unpool_cl(code, idx, sw, use_sw, n, kpad, ucl):
    """Channel-last unpooled sample: ucl[Q*kpad + k] (collisions summed in unit order)."""
    _, k_, hp, wp = code.shape
    ucl[:] = 0
    for k in range(k_):
        for p in range(hp):
            for q in range(wp):
                ucl[idx[n, k, p, q] * kpad + k] += unit_value(code, sw, use_sw, n, k, p, q)



@njit(parallel=PARALLEL, cache=True)
def _stats_gram(code, idx, sw, use_sw, kh, kw, ho, wo, vl, kpad, plan, vbad, nchunks, racc,
                gacc):
    """Gram statistics of the finite samples; thread ``chunk`` owns the rows k of its range.

    U is kept channel-last in a buffer with a zero border of (kh-1, kw-1), so that Q + d is
    addressable for every lag d. Class blocks with several positions ("lag blocks") accumulate
    lag correlations into ``racc``: block ``blk`` (row class ``blk_rc``, column class
    ``blk_cc``) holds ``racc[blk_off[blk] + ((la * nlb + lb) * K + k) * kpad + k']`` =
    sum_n sum_{Q in blk} U[k,Q] U[k',Q+d], d = (rc_lo - (kh-1) + la, cc_lo - (kw-1) + lb).
    Their positions ``blk_pos[blk_row[blk, qi]:blk_row[blk, qi+1]]`` (buffer offsets, row by
    row) are visited in row tiles ``[tile_lo, tile_hi)``: wide blocks (``blk_tiled``) in
    tiles of a few rows (``tile_kind`` 1) so that the rows of U a lag reads stay in L1 while
    every k of the thread uses them, narrow ones whole (one tile of kind 0). Single positions
    (the corners of a large padding) add their products straight into
    ``gacc[k, (a,b), (a',b'), k']``; at the end every thread adds its rows of the lag blocks
    into gacc. The blocks, positions and tiles are ``plan``'s (a ``GramPlan``).
    """
    (rc_lo, rc_hi, cc_lo, cc_hi, blk_rc, blk_cc, blk_off, blk_row, blk_pos, blk_tiled,
     dir_pos, dir_rc, dir_cc, tile_lo, tile_hi, tile_kind, tile_cap, _) = plan
    n_, k_, hp, wp = code.shape
    hu, wu = ho + 2 * (kh - 1), wo + 2 * (kw - 1)
    taps = kh * kw
    nblk = blk_rc.shape[0]
    nvec = kpad // vl
    place = place_table(ho, wo, wu * kpad, kpad, ((kh - 1) * wu + kw - 1) * kpad)
    for chunk in prange(nchunks):
        klo, khi = chunk_bounds(chunk, nchunks, k_)
        nown = khi - klo
        upad = vector_zeros(hu * wu * kpad, code.dtype)
        cap = nown * (tile_cap + nblk)
        qoff = np.empty(cap, dtype=np.int64)
        qval = np.empty(cap, dtype=code.dtype)
        seg = np.empty(nown * nblk, dtype=np.int64)
        seglen = np.empty(nown * nblk, dtype=np.int64)
        for n in range(n_):
            if not sample_finite(code, sw, use_sw, n):
                if chunk == 0:
                    vbad[n] = True
                continue
            unpool_bordered(code, idx, sw, use_sw, n, place, ho, wo, kh, kw, wu, kpad, upad)
            for tile in range(tile_lo.shape[0]):
                qi0, qi1, kind = tile_lo[tile], tile_hi[tile], tile_kind[tile]
                # non-zero U[k, Q] of every (block, k) in this tile, in row-major order;
                # branch-free compaction (each segment has one spare slot)
                base = 0
                for blk in range(nblk):
                    t0, t1 = blk_row[blk, qi0], blk_row[blk, qi1]
                    if blk_tiled[blk] != kind:
                        t1 = t0
                    for kk in range(nown):
                        seg[blk * nown + kk] = base + kk * (t1 - t0 + 1)
                        seglen[blk * nown + kk] = 0
                    base += nown * (t1 - t0 + 1)
                    for t in range(t0, t1):
                        o = blk_pos[t]
                        for kk in range(nown):
                            v = upad[o + klo + kk]
                            at = seg[blk * nown + kk] + seglen[blk * nown + kk]
                            qoff[at] = o
                            qval[at] = v
                            seglen[blk * nown + kk] += v != 0
                for blk in range(nblk):
                    if blk_tiled[blk] != kind or blk_row[blk, qi0] == blk_row[blk, qi1]:
                        continue
                    rc, cc = blk_rc[blk], blk_cc[blk]
                    da0 = rc_lo[rc] - (kh - 1)
                    db0 = cc_lo[cc] - (kw - 1)
                    nla = rc_hi[rc] - rc_lo[rc] + kh - 1
                    nlb = cc_hi[cc] - cc_lo[cc] + kw - 1
                    for la in range(nla):
                        for kk in range(nown):
                            s0 = seg[blk * nown + kk]
                            ln = seglen[blk * nown + kk]
                            if ln == 0:
                                continue
                            dst = blk_off[blk] + (la * nlb * k_ + klo + kk) * kpad
                            lb = 0
                            while lb < nlb:
                                nl = pow2_block(min(nlb - lb, NL_MAX))
                                shift = ((da0 + la) * wu + db0 + lb) * kpad
                                cg = 0
                                while cg < nvec:
                                    nv = pow2_block(nvec - cg)
                                    gather_dots(racc, dst + lb * k_ * kpad + cg * vl,
                                                k_ * kpad, upad, qoff, qval, s0, ln,
                                                shift + cg * vl, kpad, nv, nl)
                                    cg += nv
                                lb += nl
            # single positions: straight into gacc
            for t in range(dir_pos.shape[0]):
                o = dir_pos[t]
                rc, cc = dir_rc[t], dir_cc[t]
                for k in range(klo, khi):
                    v = upad[o + k]
                    if v == 0:
                        continue
                    for a in range(rc_lo[rc], rc_hi[rc]):
                        for b in range(cc_lo[cc], cc_hi[cc]):
                            dst = (k * taps + a * kw + b) * taps * kpad
                            for a2 in range(kh):
                                for b2 in range(kw):
                                    src = o + ((a - a2) * wu + b - b2) * kpad
                                    axpy(gacc, dst + (a2 * kw + b2) * kpad, v, upad, src, kpad)
        # lag blocks -> gacc[k, (a,b), (a',b'), :] for this thread's k, blocks in a fixed order
        for k in range(klo, khi):
            for blk in range(nblk):
                rc, cc = blk_rc[blk], blk_cc[blk]
                da0 = rc_lo[rc] - (kh - 1)
                db0 = cc_lo[cc] - (kw - 1)
                nlb = cc_hi[cc] - cc_lo[cc] + kw - 1
                for a in range(rc_lo[rc], rc_hi[rc]):
                    for b in range(cc_lo[cc], cc_hi[cc]):
                        dst = (k * taps + a * kw + b) * taps * kpad
                        for a2 in range(kh):
                            la = a - a2 - da0
                            for b2 in range(kw):
                                lb = b - b2 - db0
                                src = blk_off[blk] + ((la * nlb + lb) * k_ + k) * kpad
                                axpy(gacc, dst + (a2 * kw + b2) * kpad, 1.0, racc, src, kpad)


@njit(parallel=PARALLEL, cache=True)
def _stats_dense_gram(code, idx, sw, use_sw, kh, kw, ph, pw, hh, ww, ho, wo, kpad, vbad,
                      nchunks, gd):
    """G contributions of the samples with non-finite unit values, pixel by pixel and with
    every pair of taps (structural zeros included), into gd (ordered (k, a, b))."""
    n_, k_, hp, wp = code.shape
    taps = kh * kw
    m = k_ * taps
    for chunk in prange(nchunks):
        klo, khi = chunk_bounds(chunk, nchunks, k_)
        ucl = vector_empty(ho * wo * kpad, code.dtype)
        svec = vector_empty(m, code.dtype)
        for n in range(n_):
            if not vbad[n]:
                continue
            _unpool_cl(code, idx, sw, use_sw, n, kpad, ucl)
            for y in range(hh):
                for x in range(ww):
                    py, px = y + ph, x + pw
                    for k in range(k_):
                        for a in range(kh):
                            for b in range(kw):
                                i, j = py - a, px - b
                                v = 0.0
                                if 0 <= i < ho and 0 <= j < wo:
                                    v = ucl[(i * wo + j) * kpad + k]
                                svec[k * taps + a * kw + b] = v
                    for r1 in range(klo * taps, khi * taps):
                        axpy(gd, r1 * m, svec[r1], svec, 0, m)


def gram_plan(geometry, k, kpad, dtype):
    """The ``GramPlan`` of templates k (padded to ``kpad``) on ``geometry``, or None if no
    plane position paints the cropped image."""
    ho, wo = geometry.plane
    hh, ww = geometry.input
    kh, kw = geometry.kernel
    ph, pw = geometry.padding
    rc_of, rc_lo, rc_hi = _classes(ho, hh, kh, ph)
    cc_of, cc_lo, cc_hi = _classes(wo, ww, kw, pw)
    if not len(rc_lo) or not len(cc_lo):
        return None
    wu = wo + 2 * (kw - 1)
    blk_rc, blk_cc, blk_off, rows_pos, dir_pos, dir_rc, dir_cc = [], [], [], [], [], [], []
    off = 0
    for rc in range(len(rc_lo)):
        rows = np.flatnonzero(rc_of == rc)
        for cc in range(len(cc_lo)):
            cols = np.flatnonzero(cc_of == cc)
            offs = ((rows[:, None] + kh - 1) * wu + cols[None, :] + kw - 1) * kpad
            if offs.size == 1:  # a corner of the padding: no lag sums to share
                dir_pos.append(int(offs[0, 0]))
                dir_rc.append(rc)
                dir_cc.append(cc)
                continue
            blk_rc.append(rc)
            blk_cc.append(cc)
            blk_off.append(off)
            off += (rc_hi[rc] - rc_lo[rc] + kh - 1) * (cc_hi[cc] - cc_lo[cc] + kw - 1) * k * kpad
            rows_pos.append({int(r): offs[i] for i, r in enumerate(rows)})
    nblk = len(blk_rc)
    blk_row = np.zeros((nblk, ho + 1), dtype=np.int64)
    pos = []
    cursor = 0
    for blk in range(nblk):
        for qi in range(ho):
            blk_row[blk, qi] = cursor
            if qi in rows_pos[blk]:
                pos.append(rows_pos[blk][qi])
                cursor += len(rows_pos[blk][qi])
        blk_row[blk, ho] = cursor
    i64 = np.int64
    blk_pos = np.concatenate(pos).astype(i64) if pos else np.zeros(0, dtype=i64)
    # Wide blocks are cut into tiles of rows so that the rows of U a lag reads stay in L1
    # while every k of the thread uses them; narrow blocks (a few columns) are L1-sized
    # already and are visited whole, so that their lists of positions stay long.
    row_bytes = kpad * np.dtype(dtype).itemsize
    tile_rows = max(1, _L1_TILE_BYTES // (wu * row_bytes))
    ncols = np.asarray([np.count_nonzero(cc_of == cc) for cc in blk_cc], dtype=i64)
    blk_tiled = (ncols * row_bytes * (ho + 2 * (kh - 1)) > _L1_TILE_BYTES).astype(i64)
    tile_lo = list(range(0, ho, tile_rows)) if blk_tiled.any() else []
    tile_hi = [min(t + tile_rows, ho) for t in tile_lo]
    tile_kind = [1] * len(tile_lo)
    if (blk_tiled == 0).any():
        tile_lo.append(0)
        tile_hi.append(ho)
        tile_kind.append(0)
    tile_cap = max([int(sum(blk_row[b, hi] - blk_row[b, lo] for b in range(nblk)
                            if blk_tiled[b] == kind))
                    for lo, hi, kind in zip(tile_lo, tile_hi, tile_kind)] + [1])
    return GramPlan(rc_lo, rc_hi, cc_lo, cc_hi, np.asarray(blk_rc, dtype=i64),
                    np.asarray(blk_cc, dtype=i64), np.asarray(blk_off, dtype=i64), blk_row,
                    blk_pos, blk_tiled, np.asarray(dir_pos, dtype=i64),
                    np.asarray(dir_rc, dtype=i64), np.asarray(dir_cc, dtype=i64),
                    np.asarray(tile_lo, dtype=i64), np.asarray(tile_hi, dtype=i64),
                    np.asarray(tile_kind, dtype=i64), tile_cap, off)


def _mirror_upper(g, block=256):
    """Make g exactly symmetric (like S S^T) by copying its upper triangle onto the lower."""
    m = g.shape[0]
    for i0 in range(0, m, block):
        i1 = min(i0 + block, m)
        g[i0:i1, :i0] = g[:i0, i0:i1].T
        diag = g[i0:i1, i0:i1]
        low = np.tril_indices(i1 - i0, -1)
        diag[low] = diag.T[low]


def _classes(size_plane, size_img, k, p):
    """Plane rows (or columns) grouped by their interval of valid taps [lo, hi)."""
    of = np.full(size_plane, -1, dtype=np.int64)
    lo, hi = [], []
    for q in range(size_plane):
        a0, a1 = max(0, p - q), min(k, p - q + size_img)
        if a0 >= a1:
            continue
        if not lo or (lo[-1], hi[-1]) != (a0, a1):
            lo.append(a0)
            hi.append(a1)
        of[q] = len(lo) - 1
    return of, np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)


def gram_matrix(code, idx, geometry, switches):
    """G (K kh kw x K kh kw, exactly symmetric) of the code at its positions on
    ``geometry``."""
    n, k = code.shape[:2]
    kh, kw = geometry.kernel
    ph, pw = geometry.padding
    hh, ww = geometry.input
    ho, wo = geometry.plane
    taps = kh * kw
    dtype = code.dtype
    use_sw, sw = switch_args(code, switches)
    vl = lanes(dtype)
    kpad = -(-k // vl) * vl
    gacc = buffers.aligned_zeros(k * taps * taps * kpad, dtype)
    plan = gram_plan(geometry, k, kpad, dtype)
    vbad = np.zeros(n, dtype=np.bool_)
    if plan is None:  # no plane position paints the image: G = 0, but find bad samples
        for i in range(n):
            vbad[i] = not sample_finite(code, sw, use_sw, i)
    else:
        racc = buffers.aligned_zeros(plan.rsize + kpad, dtype)
        _stats_gram(code, idx, sw, use_sw, kh, kw, ho, wo, vl, kpad, plan, vbad, num_chunks(k),
                    racc, gacc)
    big_g = np.ascontiguousarray(gacc.reshape(k, taps, taps, kpad)[..., :k].transpose(0, 1, 3, 2))
    big_g = big_g.reshape(k * taps, k * taps)
    if vbad.any():
        gd = np.zeros_like(big_g)
        _stats_dense_gram(code, idx, sw, use_sw, kh, kw, ph, pw, hh, ww, ho, wo, kpad, vbad,
                          num_chunks(k), gd.reshape(-1))
        big_g += gd
    _mirror_upper(big_g)
    return big_g
