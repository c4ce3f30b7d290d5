"""M-step statistics of the templates: B, s (here) and the Gram matrix G (``gram``), Numba CPU.

Algorithms of B and s (``plan_template_stats`` picks, ``algorithm=`` forces one of
``ALGORITHMS``; G has one kernel)
-----------------------------------------------------------------------------------------
* "sparse" (``_stats_bs``): B and s come straight from the pooled units (never the whole
  unpooled plane): for a unit (k, i, j) with value v, ``B[k, a, :, :] += v * xpad[i+a,
  j:j+kw, :]`` over kw*C contiguous entries of a channel-last padded copy of the sample. Per
  sample and k, the non-zero units are listed and ``gather_dots`` sums them in registers (up
  to 4 rows a x 4 vectors at a time; a plain ``axpy`` per unit when kw*C is not a whole
  number of vectors).
* "gemm" (``_stats_bs_gemm``): one GEMM per tap over every plane position, zeros included;
  the cheaper of the two by a measured cost model.
* "kvec": with few channels (C < lanes: the first layer) B and s come from a dense product
  with the vectors over the templates instead (``_stats_bs_kvec``): the channel-last
  unpooled code ``u[Q, k]`` times scalars of the padded input, one ``gemm_tile`` per tile of
  taps (c, a, b) and block of positions. Vectors over kw*C would be mostly empty there (one
  scalar axpy per unit and row for C = 1).
* "winograd": unpooled 3x3 layers with >= 16 channels and templates (where
  ``winograd.AUTO``), ``winograd_stats`` (16 products per 2x2 positions instead of 36); the
  exact kernels add the share of the samples it leaves out (non-finite values, argmax
  positions not the identity) and replace a B it cannot certify.

Samples are cut into a fixed number of chunks (independent of the thread count), each with
its own partial B and s; the partials are added in chunk order, so the result is bit-for-bit
the same run to run and for any number of threads up to 16 (beyond, or for a B so large that
16 partial copies would not fit in 64 MiB, one chunk per thread).

Exact IEEE semantics of the dense reference: dropping zero terms is exact only for finite
values. A sample whose x or unit values hold inf/NaN is accumulated densely for B by the
sparse kernel (every plane position), as numpy does; "gemm" and "kvec" compute every term.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .. import buffers
from . import winograd, winograd_stats
from ._microkernels import GPIX, NL_MAX, PIX_MAX, axpy, gather_dots, gemm_tile
from ._partition import PARALLEL, chunk_bounds, place_table, vector_empty, vector_zeros
from ._dispatch import choose, redo_flagged
from ._tiles import channel_blocks, pow2_block
from ._units import sample_finite, switch_args, unit_value, unpool_sample
from ._vector import lanes
from .elementwise import count_nonzero
from .gram import gram_matrix

__all__ = ["ALGORITHMS", "plan_template_stats", "template_stats"]

ALGORITHMS = ("sparse", "gemm", "kvec", "winograd")

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
                            nl = pow2_block(min(kh - a, NL_MAX))
                            cg = 0
                            while cg < nrow:
                                nv = pow2_block(nrow - cg)
                                gather_dots(bp, bk + a * run + cg * vl, run, xcl, qoff, qval, 0,
                                            cnt, a * wpad * c_ + cg * vl, wpad * c_, nv, nl)
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
                unpool_sample(code, idx, sw, use_sw, n, npos, u, s * kplane)
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
                        npx = GPIX[nv]
                        xsrc = xcl[(a * wpad + b) * cpad + c0:]
                        for k0 in range(0, k_, npx):  # rows [k_, kp) are zero
                            for p in range(npx):
                                abase[p] = (k0 + p) * npos
                                xo[p] = (tap * kp + k0 + p) * cpad + c0
                            gemm_tile(bp, xo, u, abase, aoff, xsrc, boff, 0, m, nv, GPIX)


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
                    npx = GPIX[nv]
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
                        gemm_tile(bp, bo, xg, abase, aoff, usrc, boff, t0, t1, nv, GPIX)


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
    """``gram._unpool_cl`` and ``add_unit_sums`` in one pass over the units (the same
    additions in the same order)."""
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


_GEMM_POSITIONS = 192  # plane positions per group of samples in the GEMM B
_GEMM_VS_SPARSE = 0.35  # measured cost of a GEMM vector FMA relative to a sparse one (l2, l4)
_KVEC_POSITIONS = 256  # plane positions per block: the block of u stays in L1 across taps
_KVEC_SAMPLE_POSITIONS = 1024  # plane positions per group of samples (u in L2)


def _bs_gemm(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, nch):
    n, c = x.shape[:2]
    k = code.shape[1]
    vl = lanes(x.dtype)
    c0, nv, nvec = channel_blocks(c, vl)
    cpad = nvec * vl
    # rows of u: k padded to whole tiles of every block's tile size
    kp = max(-(-k // GPIX[int(v)]) * GPIX[int(v)] for v in nv)
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
    k0, nv, nvec = channel_blocks(k, vl)
    kpad = nvec * vl
    ntap = c * kh * kw
    ntap_pad = max(-(-ntap // GPIX[int(v)]) * GPIX[int(v)] for v in nv)
    group = max(1, min(-(-n // nch), _KVEC_SAMPLE_POSITIONS // (ho * wo)))
    bpart = buffers.empty((nch, ntap_pad * kpad), x.dtype)
    spart = np.empty((nch, k), dtype=x.dtype)
    _stats_bs_kvec(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho, wo, kpad, k0, nv, ntap_pad,
                   group, nch, bpart, spart)
    return bpart, spart, kpad, ntap_pad


def plan_template_stats(x, code, idx, geometry, switches):
    """The algorithm of B and s the automatic choice takes: "winograd" where
    ``_winograd_pays``, else ``_plan_exact``'s."""
    if _winograd_pays(x, code, geometry, switches):
        return "winograd"
    return _plan_exact(x, code, geometry)


def _winograd_pays(x, code, geometry, switches):
    """B and s by Winograd on unpooled 3x3 layers with >= 16 channels and templates. On
    pooled layers the sparse kernel wins (it skips the 3/4 zero units: measured l3 11.2 vs
    15.4 ms, c128 46 vs 59 ms), on unpooled ones Winograd (l2 8.8 vs 11.6, l4 6.2 vs 8.4)."""
    if not winograd.AUTO or tuple(geometry.kernel) != (3, 3) or x.shape[0] == 0:
        return False
    ho, wo = geometry.plane
    dense = code.shape[2] * code.shape[3] == ho * wo
    # mixed signs: B cancels, and Winograd's B could rarely be certified (``certified``)
    return (dense and winograd_stats.applies(x, code, geometry)
            and winograd_stats.same_signs(x, code, switches))


def _plan_exact(x, code, geometry):
    """"kvec" for few channels (C < lanes), else "sparse" or "gemm" by cost."""
    n, c = x.shape[:2]
    k = code.shape[1]
    kh, kw = geometry.kernel
    ho, wo = geometry.plane
    vl = lanes(x.dtype)
    # few channels: vectors over the templates (over kw*C or C they would be mostly empty;
    # measured C = 1 / 3 / 8: 2.3x / 2.2x / 1.8x faster than either, even at C = 16)
    if c < vl:
        return "kvec"
    # sparse: one vector FMA per unit, row and vector of kw*C; GEMM: every plane position
    # with every tap, templates padded to whole tiles, measured ~3x cheaper per FMA
    sparse = count_nonzero(code) * kh * -(-(kw * c) // vl)
    gemm = n * ho * wo * kh * kw * (k + 8) * -(-c // vl) * _GEMM_VS_SPARSE
    return "gemm" if gemm < sparse else "sparse"


def template_stats(x, code, idx, geometry, switches, gram, algorithm="auto"):
    """B, s and (with ``gram``) G (see ``fastdrmm.ops.template_stats``); B and s by
    ``algorithm``: one of ``ALGORITHMS`` or "auto" (``plan_template_stats``). "winograd"
    needs 3x3 templates; the samples it leaves out are added, and a B it cannot certify is
    replaced, by the exact automatic choice."""
    name = choose(algorithm, ALGORITHMS,
                  lambda: plan_template_stats(x, code, idx, geometry, switches))
    kh, kw = geometry.kernel
    if name == "winograd" and (kh, kw) != (3, 3):
        raise ValueError(f"algorithm='winograd' needs 3x3 templates, got {kh}x{kw}")
    n, c = x.shape[:2]
    k = code.shape[1]
    dtype = x.dtype
    if n == 0:
        big_g = np.zeros((k * kh * kw, k * kh * kw), dtype=dtype) if gram else None
        return np.zeros((k, c, kh, kw), dtype=dtype), np.zeros(k, dtype=dtype), big_g
    if name == "winograd":
        big_b, s = _winograd_bs(x, code, idx, geometry, switches)
    else:
        big_b, s = _exact_bs(name, x, code, idx, geometry, switches)
    return big_b, s, (gram_matrix(code, idx, geometry, switches) if gram else None)


def _winograd_bs(x, code, idx, geometry, switches):
    """B and s by ``winograd_stats``, the samples it leaves out added by the exact kernels;
    the exact kernels' B and s instead where its B is not certified."""
    def exact(xs, codes, idxs, sws):
        return _exact_bs(_plan_exact(xs, codes, geometry), xs, codes, idxs, geometry, sws)

    big_b, s, redo = winograd_stats.template_stats_bs(x, code, idx, geometry, switches)
    left_out = redo_flagged(redo, exact, x, code, idx, switches)
    if left_out is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            big_b += left_out[0]
            s += left_out[1]
    # the accuracy contract (see winograd_stats.certified)
    if not winograd_stats.certified(x, code, idx, geometry, switches, big_b):
        return exact(x, code, idx, switches)
    return big_b, s


def _exact_bs(name, x, code, idx, geometry, switches):
    """B and s by the exact kernel ``name``: "sparse", "gemm" or "kvec"."""
    n, c, hh, ww = x.shape
    k = code.shape[1]
    kh, kw = geometry.kernel
    ph, pw = geometry.padding
    ho, wo = geometry.plane
    dtype = x.dtype
    taps = kh * kw
    use_sw, sw = switch_args(code, switches)
    per_chunk = (k * taps * c + k) * np.dtype(dtype).itemsize
    nch = max(numba.get_num_threads(), min(_B_CHUNKS, _B_PARTIAL_BYTES // per_chunk))
    nch = max(1, min(n, nch))
    if name == "kvec":
        bpart, spart, kpad, ntap_pad = _bs_kvec(x, code, idx, sw, use_sw, kh, kw, ph, pw, ho,
                                                wo, nch)
    elif name == "gemm":
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
    if name == "kvec":
        big_b = np.ascontiguousarray(
            bsum.reshape(ntap_pad, kpad)[:c * taps, :k].T.reshape(k, c, kh, kw))
    elif name == "gemm":
        big_b = np.ascontiguousarray(
            bsum.reshape(kh, kw, kp, cpad)[:, :, :k, :c].transpose(2, 3, 0, 1))
    else:
        big_b = np.ascontiguousarray(bsum.reshape(k, kh, kw, c).transpose(0, 3, 1, 2))
    return big_b, s
