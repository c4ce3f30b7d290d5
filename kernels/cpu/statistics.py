"""M-step statistics of the templates: B, s and the Gram matrix G (Numba CPU).

Design
------
* B and s come straight from the pooled units (never the whole unpooled plane): for a unit
  (k, i, j) with value v, ``B[k, a, :, :] += v * xpad[i+a, j:j+kw, :]`` over kw*C contiguous
  entries of a channel-last padded copy of the sample. Per sample and k, the non-zero units
  are listed and ``gather_dots`` sums them in registers (up to 4 rows a x 4 vectors at a
  time; a plain ``axpy`` per unit when kw*C is not a whole number of vectors). Samples
  are cut into a fixed number of chunks (independent of the thread count), each with its own
  partial B and s; the partials are added in chunk order, so the result is bit-for-bit the
  same run to run and for any number of threads up to 16 (beyond, or for a B so large that
  16 partial copies would not fit in 64 MiB, one chunk per thread).
* G = D^T D, rows and columns ordered (k, a, b). With S[(k,a,b)] the cropped image painted by
  tap (k,a,b) (G = S S^T)::

      G[(k,a,b),(k',a',b')] = sum_n sum_{Q in Rect(a,b)} U[k,Q] U[k',Q+d],  d = (a-a', b-b')

  where Q runs over plane positions, Rect(a,b) is the set of positions whose tap (a,b) lands
  inside the cropped image and U is the unpooled code (collisions summed first). Rect(a,b) is
  a product of a row interval and a column interval; plane rows (columns) with the same set
  of valid taps a (b) form a class, so that within a class block the sums depend on the lag d
  only. The kernel therefore accumulates, over all samples, the lag correlations
  ``R[block, d][k, :] = sum_n sum_{Q in block} U[k,Q] U[:,Q+d]`` and assembles G from them
  once at the end. Each R row is a sparse-times-dense product: the non-zero U[k,Q] of the
  block (a list built without branches) times the channel-last unpooled sample, shifted by d,
  accumulated in registers by ``gather_dots`` for up to 4 lags x 4 vectors of k' at a time.
  That visits each non-zero U[k,Q] once per lag, about T/4 times fewer operations than
  pixel-by-pixel outer products (with valid padding there is a single block: the plain lag
  correlation). Wide blocks are walked in tiles of rows so that the part of U a lag reads
  stays in L1 across all k of a thread. Single-position blocks (the corners of a large
  padding) add their products straight into G. Rows k are split across threads (each
  thread builds every sample's unpooled U and owns R[..., k, :] and G[k...] for its k), so
  there is no reduction and the result does not depend on the thread count. Finally the
  upper triangle is mirrored, so G is exactly symmetric like S S^T.
* With few channels (C < lanes: the first layer) B and s come from a dense product with the
  vectors over the templates instead (``_stats_bs_kvec``): the channel-last unpooled code
  ``u[Q, k]`` times scalars of the padded input, one ``gemm_tile`` per tile of taps (c, a, b)
  and block of positions. Vectors over kw*C would be mostly empty there (one scalar axpy per
  unit and row for C = 1).
* B and s of unpooled 3x3 layers with >= 16 channels and templates come from
  ``winograd_stats`` (16 products per 2x2 positions instead of 36); the kernels here add the
  share of the samples it leaves out (non-finite values, argmax positions not the identity).
* Exact IEEE semantics of the dense reference: dropping zero terms is exact only for finite
  values. A sample whose x or unit values hold inf/NaN is accumulated densely for B (every
  plane position) and, if its unit values do, for G (every pixel, every pair of taps,
  structural zeros included), as numpy does.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .. import buffers
from ._common import (NL_MAX, PARALLEL, PIX_MAX, axpy, chunk_bounds, gather_dots, lanes,
                      num_chunks, place_table, vector_empty, vector_zeros)
from .elementwise import count_nonzero
from .matching import _blocks
from .rendering import (_gemm, _gpix, _switch_args, _unpool_sample, sample_finite, unit_value,
                        unpool_bordered)

__all__ = ["template_stats"]

_B_CHUNKS = 16  # sample chunks for B and s: fixed, so results do not depend on the threads
_B_PARTIAL_BYTES = 64 * 2**20  # ... unless 16 partial copies of B would exceed this


@njit(parallel=PARALLEL, cache=True)
def _stats_bs(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, vl, nchunks, bpart, spart):
    """Partial B (layout [k][a][b][c]) and s per chunk of samples. A sample whose x or unit
    values hold inf/NaN is accumulated densely."""
    n_, c_, hh, ww = x.shape
    _, k_, hp, wp = code.shape
    hpad, wpad = hh + 2 * ph, ww + 2 * pw
    run = kw * c_
    nrow = run // vl
    place = place_table(ho, wo, wpad * c_, c_, 0)
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        qoff = np.empty(hp * wp + 1, dtype=np.int64)
        qval = np.empty(hp * wp + 1, dtype=x.dtype)
        bp = bpart[chunk]
        sp = spart[chunk]
        bp[:] = 0
        sp[:] = 0
        xcl = vector_zeros(hpad * wpad * c_, x.dtype)  # the border stays zero
        dense_u = vector_empty(ho * wo, x.dtype)
        for n in range(lo, hi):
            finite = True
            for i in range(hh):
                for j in range(ww):
                    dst = ((i + ph) * wpad + j + pw) * c_
                    for c in range(c_):
                        xv = x[n, c, i, j]
                        finite &= np.isfinite(xv)
                        xcl[dst + c] = xv
            dense = not (finite and sample_finite(code, sw, use_sw, n))
            for k in range(k_):
                bk = k * kh * run
                if not dense:
                    # the non-zero units of k (branch-free compaction)
                    cnt = 0
                    for p in range(hp):
                        for q in range(wp):
                            val = unit_value(code, sw, use_sw, n, k, p, q)
                            sp[k] += val
                            qoff[cnt] = place[idx[n, k, p, q]]
                            qval[cnt] = val
                            cnt += val != 0
                    if run % vl == 0:
                        # B[k, a, :] += sum_units v * xcl[patch row a]: accumulators in registers
                        a = 0
                        while a < kh:
                            nl = _pow2_block(min(kh - a, NL_MAX))
                            cg = 0
                            while cg < nrow:
                                nv = _pow2_block(nrow - cg)
                                _gdots(nv, nl, bp, bk + a * run + cg * vl, run, xcl, qoff, qval,
                                       0, cnt, a * wpad * c_ + cg * vl, wpad * c_)
                                cg += nv
                            a += nl
                    else:
                        for t in range(cnt):
                            for a in range(kh):
                                axpy(bp, bk + a * run, qval[t], xcl, qoff[t] + a * wpad * c_, run)
                else:
                    dense_u[:] = 0
                    for p in range(hp):
                        for q in range(wp):
                            val = unit_value(code, sw, use_sw, n, k, p, q)
                            sp[k] += val
                            dense_u[idx[n, k, p, q]] += val
                    for i in range(ho):
                        for j in range(wo):
                            val = dense_u[i * wo + j]
                            for a in range(kh):
                                axpy(bp, bk + a * run, val, xcl, ((i + a) * wpad + j) * c_, run)


@njit(parallel=PARALLEL, cache=True)
def _stats_bs_gemm(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, kp, cpad, blk_c0, blk_nv,
                   group, nchunks, bpart, spart):
    """Partial B (layout [a][b][k][c], k padded to ``kp``, c to ``cpad``) and s per chunk of
    samples, as one GEMM per tap: ``B[a, b] += U^T Xshift(a, b)`` over the plane positions.

    A group of samples is unpooled (``u[s, k, Q]``, a copy for pool 1) next to a zero-padded
    channel-last copy of its inputs; for each tap, each block of ``NV`` vectors of channels
    and each tile of ``P`` templates k, ``gemm_tile`` sums over every plane position of the
    group in order (samples, then rows, then columns), accumulating into the chunk's partial.
    Every term of the reference is computed (zeros included), so the IEEE semantics are the
    dense reference's for any values.
    """
    n_, c_, hh, ww = x.shape
    _, k_, hp, wp = code.shape
    hpad, wpad = hh + 2 * ph, ww + 2 * pw
    npos = ho * wo
    kplane = kp * npos
    xplane = hpad * wpad * cpad
    nb = blk_c0.shape[0]
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        bp = bpart[chunk]
        sp = spart[chunk]
        bp[:] = 0
        sp[:] = 0
        u = vector_zeros(group * kplane, x.dtype)  # rows k >= K stay zero
        xcl = vector_zeros(group * xplane, x.dtype)  # border and channel padding stay zero
        aoff = np.empty(group * npos, dtype=np.int64)
        boff = np.empty(group * npos, dtype=np.int64)
        abase = np.empty(PIX_MAX, dtype=np.int64)
        xo = np.empty(PIX_MAX, dtype=np.int64)
        for g0 in range(lo, hi, group):
            ns = min(group, hi - g0)
            m = 0
            for s in range(ns):
                n = g0 + s
                _unpool_sample(code, idx, sw, use_sw, n, npos, u, s * kplane)
                add_unit_sums(code, sw, use_sw, n, sp)
                for i in range(hh):
                    for j in range(ww):
                        dst = s * xplane + ((i + ph) * wpad + j + pw) * cpad
                        for c in range(c_):
                            xcl[dst + c] = x[n, c, i, j]
                for i in range(ho):
                    for j in range(wo):
                        aoff[m] = s * kplane + i * wo + j
                        boff[m] = s * xplane + (i * wpad + j) * cpad
                        m += 1
            for a in range(kh):
                for b in range(kw):
                    tap = a * kw + b
                    for blk in range(nb):
                        c0 = blk_c0[blk]
                        nv = blk_nv[blk]
                        npx = _gpix(nv)
                        xsrc = xcl[(a * wpad + b) * cpad + c0:]
                        for k0 in range(0, k_, npx):  # rows [k_, kp) are zero
                            for p in range(npx):
                                abase[p] = (k0 + p) * npos
                                xo[p] = (tap * kp + k0 + p) * cpad + c0
                            _gemm(nv, bp, xo, u, abase, aoff, xsrc, boff, 0, m)


@njit(parallel=PARALLEL, cache=True)
def _stats_bs_kvec(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, kpad, blk_k0, blk_nv,
                   ntap_pad, group, nchunks, bpart, spart):
    """Partial B (layout [c][a][b][k], taps padded to ``ntap_pad``, k to ``kpad``) and s per
    chunk of samples, with the vectors over the templates: for few channels (the first
    layer), where vectors over kw*C or C would be mostly empty.

    A group of samples is unpooled channel-last (``u[Q*kpad + k]``, collisions summed) next
    to a zero-padded channel-first copy of its inputs; for each block of positions, block of
    ``NV`` vectors of templates and tile of ``P`` taps (c, a, b), ``gemm_tile`` sums
    ``u[Q, k-vector] * xpad[c, Q + (a, b)]`` over the positions in order (samples, rows,
    columns). Taps beyond C*kh*kw (up to a whole tile) accumulate into scratch rows. Every
    term of the dense reference is computed, zeros included, so the IEEE semantics are the
    reference's for any values.
    """
    n_, c_, hh, ww = x.shape
    _, k_, hp, wp = code.shape
    hpad, wpad = hh + 2 * ph, ww + 2 * pw
    npos = ho * wo
    ntap = c_ * kh * kw
    xplane = c_ * hpad * wpad
    nb = blk_k0.shape[0]
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        bp = bpart[chunk]
        sp = spart[chunk]
        bp[:] = 0
        sp[:] = 0
        u = vector_empty(group * npos * kpad, x.dtype)
        xg = vector_zeros(group * xplane, x.dtype)  # the border stays zero
        aoff = np.empty(group * npos, dtype=np.int64)
        boff = np.empty(group * npos, dtype=np.int64)
        abase = np.empty(PIX_MAX, dtype=np.int64)
        bo = np.empty(PIX_MAX, dtype=np.int64)
        for g0 in range(lo, hi, group):
            ns = min(group, hi - g0)
            m = 0
            for s in range(ns):
                n = g0 + s
                _unpool_cl_sums(code, idx, sw, use_sw, n, kpad,
                                u[s * npos * kpad:(s + 1) * npos * kpad], sp)
                for c in range(c_):
                    for i in range(hh):
                        dst = s * xplane + (c * hpad + i + ph) * wpad + pw
                        for j in range(ww):
                            xg[dst + j] = x[n, c, i, j]
                for i in range(ho):
                    for j in range(wo):
                        aoff[m] = s * xplane + i * wpad + j
                        boff[m] = (s * npos + i * wo + j) * kpad
                        m += 1
            for t0 in range(0, m, _KVEC_POSITIONS):
                t1 = min(m, t0 + _KVEC_POSITIONS)
                for blk in range(nb):
                    k0 = blk_k0[blk]
                    nv = blk_nv[blk]
                    npx = _gpix(nv)
                    usrc = u[k0:]
                    # up to this block's last whole tile, which ends within ntap_pad (the
                    # largest over the blocks; blocks of other widths have other tiles)
                    for tap0 in range(0, ntap, npx):
                        for p in range(npx):
                            tap = tap0 + p
                            if tap < ntap:
                                c = tap // (kh * kw)
                                ab = tap - c * kh * kw
                                a = ab // kw
                                abase[p] = (c * hpad + a) * wpad + ab - a * kw
                            else:
                                abase[p] = 0  # scratch tap: reads anything valid
                            bo[p] = tap * kpad + k0
                        _gemm(nv, bp, bo, xg, abase, aoff, usrc, boff, t0, t1)


@njit(inline="always")
def add_unit_sums(code, sw, use_sw, n, sp):
    """sp[k] += the unit values (code times switches) of sample n and template k, in order."""
    _, k_, hp, wp = code.shape
    for k in range(k_):
        for p in range(hp):
            for q in range(wp):
                sp[k] += unit_value(code, sw, use_sw, n, k, p, q)


@njit(inline="always")
def _unpool_cl_sums(code, idx, sw, use_sw, n, kpad, ucl, sp):
    """``_unpool_cl`` and ``add_unit_sums`` in one pass over the units (the same additions
    in the same order)."""
    _, k_, hp, wp = code.shape
    ucl[:] = 0
    for k in range(k_):
        sk = sp[k]
        for p in range(hp):
            for q in range(wp):
                val = unit_value(code, sw, use_sw, n, k, p, q)
                ucl[idx[n, k, p, q] * kpad + k] += val
                sk += val
        sp[k] = sk


@njit(inline="always")
def _unpool_cl(code, idx, sw, use_sw, n, kpad, ucl):
    """Channel-last unpooled sample: ucl[Q*kpad + k] (collisions summed in unit order)."""
    _, k_, hp, wp = code.shape
    ucl[:] = 0
    for k in range(k_):
        for p in range(hp):
            for q in range(wp):
                ucl[idx[n, k, p, q] * kpad + k] += unit_value(code, sw, use_sw, n, k, p, q)


@njit(inline="always")
def _gdots(nv, nl, acc, aofs, astep, u, qoff, qval, start, count, shift, sstep):
    if nl == 4:
        if nv == 4:
            gather_dots(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, 4, 4)
        elif nv == 2:
            gather_dots(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, 2, 4)
        else:
            gather_dots(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, 1, 4)
    elif nl == 2:
        if nv == 4:
            gather_dots(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, 4, 2)
        elif nv == 2:
            gather_dots(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, 2, 2)
        else:
            gather_dots(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, 1, 2)
    else:
        if nv == 4:
            gather_dots(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, 4, 1)
        elif nv == 2:
            gather_dots(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, 2, 1)
        else:
            gather_dots(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, 1, 1)


@njit(inline="always")
def _pow2_block(n):
    """Largest of 4, 2, 1 not above n."""
    if n >= 4:
        return 4
    if n >= 2:
        return 2
    return 1


@njit(parallel=PARALLEL, cache=True)
def _stats_gram(code, idx, sw, use_sw, kh, kw, ho, wo, vl, kpad, rc_lo, rc_hi, cc_lo, cc_hi,
                blk_rc, blk_cc, blk_off, blk_row, blk_pos, blk_tiled, dir_pos, dir_rc, dir_cc,
                tile_lo, tile_hi, tile_kind, tile_cap, vbad, nchunks, racc, gacc):
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
    into gacc.
    """
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
                                nl = _pow2_block(min(nlb - lb, NL_MAX))
                                shift = ((da0 + la) * wu + db0 + lb) * kpad
                                cg = 0
                                while cg < nvec:
                                    nv = _pow2_block(nvec - cg)
                                    _gdots(nv, nl, racc, dst + lb * k_ * kpad + cg * vl,
                                           k_ * kpad, upad, qoff, qval, s0, ln,
                                           shift + cg * vl, kpad)
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


_L1_TILE_BYTES = 24 * 1024  # rows of the unpooled buffer one lag sweep should keep in L1


def _gram_plan(ho, wo, hh, ww, kh, kw, ph, pw, k, kpad, dtype):
    """Class blocks of the plane for the Gram kernel (see ``_stats_gram``), or None if no
    plane position paints the cropped image."""
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
    return (rc_lo, rc_hi, cc_lo, cc_hi, np.asarray(blk_rc, dtype=i64),
            np.asarray(blk_cc, dtype=i64), np.asarray(blk_off, dtype=i64), blk_row, blk_pos,
            blk_tiled, np.asarray(dir_pos, dtype=i64), np.asarray(dir_rc, dtype=i64),
            np.asarray(dir_cc, dtype=i64), np.asarray(tile_lo, dtype=i64),
            np.asarray(tile_hi, dtype=i64), np.asarray(tile_kind, dtype=i64), tile_cap, off)


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


_GEMM = None  # None: pick by cost; True/False: force the GEMM path on or off (tests)
_GEMM_POSITIONS = 192  # plane positions per group of samples in the GEMM B
_GEMM_VS_SPARSE = 0.35  # measured cost of a GEMM vector FMA relative to a sparse one (l2, l4)
_KVEC = None  # None: pick by cost; True/False: force the k-vector path on or off (tests)
_KVEC_POSITIONS = 256  # plane positions per block: the block of u stays in L1 across taps
_KVEC_SAMPLE_POSITIONS = 1024  # plane positions per group of samples (u in L2)


def _bs_gemm(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, nch):
    n, c = x.shape[:2]
    k = code.shape[1]
    vl = lanes(x.dtype)
    c0, nv, nvec = _blocks(c, vl)
    cpad = nvec * vl
    # rows of u: k padded to whole tiles of every block's tile size
    kp = max(-(-k // _pix_of(int(v))) * _pix_of(int(v)) for v in nv)
    group = max(1, min(-(-n // nch), _GEMM_POSITIONS // (ho * wo)))
    bpart = buffers.empty((nch, kh * kw * kp * cpad), x.dtype)
    spart = np.empty((nch, k), dtype=x.dtype)
    _stats_bs_gemm(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, kp, cpad, c0, nv, group,
                   nch, bpart, spart)
    return bpart, spart, kp, cpad


def _bs_kvec(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, nch):
    n, c = x.shape[:2]
    k = code.shape[1]
    vl = lanes(x.dtype)
    k0, nv, nvec = _blocks(k, vl)
    kpad = nvec * vl
    ntap = c * kh * kw
    ntap_pad = max(-(-ntap // _pix_of(int(v))) * _pix_of(int(v)) for v in nv)
    group = max(1, min(-(-n // nch), _KVEC_SAMPLE_POSITIONS // (ho * wo)))
    bpart = buffers.empty((nch, ntap_pad * kpad), x.dtype)
    spart = np.empty((nch, k), dtype=x.dtype)
    _stats_bs_kvec(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, kpad, k0, nv, ntap_pad,
                   group, nch, bpart, spart)
    return bpart, spart, kpad, ntap_pad


def _pix_of(nv):
    from ._common import GPIX
    return GPIX[nv]


_WINOGRAD = None  # None: by _use_winograd; True/False: force on (3x3 only) or off (tests)


def _use_winograd(x, code, kernel_size, padding, switches=None):
    """B and s by Winograd on unpooled 3x3 layers with >= 16 channels and templates. On
    pooled layers the sparse kernel wins (it skips the 3/4 zero units: measured l3 11.2 vs
    15.4 ms, c128 46 vs 59 ms), on unpooled ones Winograd (l2 8.8 vs 11.6, l4 6.2 vs 8.4)."""
    if _WINOGRAD is False or tuple(kernel_size) != (3, 3) or x.shape[0] == 0:
        return False
    if _WINOGRAD:
        return True
    from . import winograd, winograd_stats

    if not winograd.AUTO:
        return False
    plane = [s + 2 * p - 2 for s, p in zip(x.shape[2:], padding)]
    dense = code.shape[2] * code.shape[3] == plane[0] * plane[1]
    # mixed signs: B cancels, and Winograd's B could rarely be certified (``certified``)
    return (dense and winograd_stats.applies(x, code, kernel_size, padding)
            and winograd_stats.same_signs(x, code, switches))


def _exact_bs(x, code, idx, kernel_size, padding, switches):
    """B and s by the direct kernels: k-vector for few channels, else sparse or GEMM by cost."""
    n, c, hh, ww = x.shape
    k = code.shape[1]
    kh, kw = kernel_size
    ph, pw = padding
    ho, wo = hh + 2 * ph - kh + 1, ww + 2 * pw - kw + 1
    dtype = x.dtype
    taps = kh * kw
    use_sw, sw = _switch_args(code, switches)

    per_chunk = (k * taps * c + k) * np.dtype(dtype).itemsize
    nch = max(numba.get_num_threads(), min(_B_CHUNKS, _B_PARTIAL_BYTES // per_chunk))
    nch = max(1, min(n, nch))
    vl = lanes(dtype)
    nvec = -(-c // vl)
    # few channels: vectors over the templates (over kw*C or C they would be mostly empty;
    # measured C = 1 / 3 / 8: 2.3x / 2.2x / 1.8x faster than either, even at C = 16)
    use_kvec = _KVEC if _KVEC is not None else (c < vl and _GEMM is None)
    if use_kvec:
        use_gemm = False
    elif _GEMM is not None:
        use_gemm = _GEMM
    else:
        # sparse: one vector FMA per unit, row and vector of kw*C; GEMM: every plane position
        # with every tap, templates padded to whole tiles, measured ~3x cheaper per FMA
        sparse = count_nonzero(code) * kh * -(-(kw * c) // vl)
        gemm = n * ho * wo * taps * (k + 8) * nvec * _GEMM_VS_SPARSE
        use_gemm = gemm < sparse
    if use_kvec:
        bpart, spart, kpad, ntap_pad = _bs_kvec(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho,
                                                wo, nch)
    elif use_gemm:
        bpart, spart, kp, cpad = _bs_gemm(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, nch)
    else:
        bpart = buffers.empty((nch, k * taps * c), dtype)
        spart = np.empty((nch, k), dtype=dtype)
        _stats_bs(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, lanes(dtype), nch, bpart,
                  spart)
    bsum, s = bpart[0].copy(), spart[0].copy()
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf = NaN as in the reference
        for i in range(1, nch):  # fixed order
            bsum += bpart[i]
            s += spart[i]
    if use_kvec:
        big_b = np.ascontiguousarray(
            bsum.reshape(ntap_pad, kpad)[:c * taps, :k].T.reshape(k, c, kh, kw))
    elif use_gemm:
        big_b = np.ascontiguousarray(
            bsum.reshape(kh, kw, kp, cpad)[:, :, :k, :c].transpose(2, 3, 0, 1))
    else:
        big_b = np.ascontiguousarray(bsum.reshape(k, kh, kw, c).transpose(0, 3, 1, 2))
    return big_b, s


def template_stats(x, code, idx, geometry, switches, gram):
    kernel_size, padding = geometry.kernel, geometry.padding
    n, c, hh, ww = x.shape
    k = code.shape[1]
    kh, kw = kernel_size
    ph, pw = padding
    ho, wo = hh + 2 * ph - kh + 1, ww + 2 * pw - kw + 1
    dtype = x.dtype
    taps = kh * kw
    if n == 0:
        big_g = np.zeros((k * taps, k * taps), dtype=dtype) if gram else None
        return np.zeros((k, c, kh, kw), dtype=dtype), np.zeros(k, dtype=dtype), big_g
    big_b = None
    if _use_winograd(x, code, kernel_size, padding, switches):
        from . import winograd_stats  # imports rendering, which imports matching

        big_b, s, redo = winograd_stats.template_stats_bs(x, code, idx, padding, switches)
        again = np.flatnonzero(redo)
        if again.size:  # the left-out samples' share, by the exact kernels
            sub_b, sub_s = _exact_bs(x[again], code[again], idx[again], kernel_size, padding,
                                     None if switches is None else switches[again])
            with np.errstate(invalid="ignore", over="ignore"):
                big_b += sub_b
                s += sub_s
        # the accuracy contract (see winograd_stats.certified): else B by the exact kernels
        if not winograd_stats.certified(x, code, idx, padding, switches, big_b):
            big_b = None
    if big_b is None:
        big_b, s = _exact_bs(x, code, idx, kernel_size, padding, switches)
    if not gram:
        return big_b, s, None
    use_sw, sw = _switch_args(code, switches)

    vl = lanes(dtype)
    kpad = -(-k // vl) * vl
    gacc = buffers.aligned_zeros(k * taps * taps * kpad, dtype)
    plan = _gram_plan(ho, wo, hh, ww, kh, kw, ph, pw, k, kpad, dtype)
    vbad = np.zeros(n, dtype=np.bool_)
    if plan is None:  # no plane position paints the image: G = 0, but find bad samples
        for i in range(n):
            vbad[i] = not sample_finite(code, sw, use_sw, i)
    else:
        (rc_lo, rc_hi, cc_lo, cc_hi, blk_rc, blk_cc, blk_off, blk_row, blk_pos, blk_tiled,
         dir_pos, dir_rc, dir_cc, tile_lo, tile_hi, tile_kind, tile_cap, rsize) = plan
        racc = buffers.aligned_zeros(rsize + kpad, dtype)
        _stats_gram(code, idx, sw, use_sw, kh, kw, ho, wo, vl, kpad, rc_lo, rc_hi, cc_lo, cc_hi,
                    blk_rc, blk_cc, blk_off, blk_row, blk_pos, blk_tiled, dir_pos, dir_rc,
                    dir_cc, tile_lo, tile_hi, tile_kind, tile_cap, vbad, num_chunks(k), racc,
                    gacc)
    big_g = np.ascontiguousarray(gacc.reshape(k, taps, taps, kpad)[..., :k].transpose(0, 1, 3, 2))
    big_g = big_g.reshape(k * taps, k * taps)
    if vbad.any():
        gd = np.zeros_like(big_g)
        _stats_dense_gram(code, idx, sw, use_sw, kh, kw, ph, pw, hh, ww, ho, wo, kpad, vbad,
                          num_chunks(k), gd.reshape(-1))
        big_g += gd
    _mirror_upper(big_g)
    return big_b, s, big_g
