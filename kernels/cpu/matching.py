"""Fused template matching + bias + switch + max-over-translation pooling (Numba CPU).

Design
------
* Templates are re-laid out once per call (outside the hot loop) into blocks of output
  channels: block b holds ``NV`` SIMD vectors of channels and, for every tap
  ``t = (c, u, v)``, its ``NV*VL`` weights contiguously (channels padded with zeros to a
  whole vector). The bias is padded the same way.
* Work items are (sample, channel block) pairs, cut into one contiguous chunk per thread
  (``prange`` over chunks). A thread zero-pads each of its samples once into a private
  buffer, then for each channel block walks the pooled rows in groups: it computes, for the
  plane rows that those pooled rows need, the switched matches of the block's channels with
  the register-blocked micro-kernel ``conv_tile`` (``NV`` vectors of channels times ``P``
  pixels of accumulators in registers, the taps streaming through) into a small private row
  buffer, then max-pools that buffer (vectorised over channels) straight into ``h``/``idx``.
  z is never stored beyond one block of one group of rows.
* When the templates cover the whole (unpadded) input the plane is 1 x 1 and the matching is
  a matrix product: the micro-kernel then tiles over samples instead of pixels.
* Algorithms (``plan_match_switch_pool`` picks, ``algorithm=`` forces): "direct" (this
  kernel), "pooled_rows" (few channels, 2x2 windows at stride 2: ``pooled_rows``, the same
  bits) and "winograd" (3x3 templates: ``winograd``, 16 multiplications per 2x2 outputs
  instead of 36; the exact kernels redo the samples where it meets a non-finite value).
* ``match_at`` (below) reads the matching at given positions: "units" (one dot product per
  unit) or "winograd" (the whole plane, then read).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import buffers
from . import pooled_rows, winograd
from ._microkernels import NV_MAX, PIX, PIX_MAX, conv_tile, dot_tile
from ._partition import (PARALLEL, chunk_bounds, num_chunks, place_table, vector_empty,
                         vector_zeros)
from ._dispatch import choose, redo_flagged
from ._tiles import pool_group, relayout
from ._vector import lanes
from .elementwise import count_nonzero

__all__ = ["ALGORITHMS", "MATCH_AT_ALGORITHMS", "plan_match_switch_pool", "match_switch_pool",
           "plan_match_at", "match_at"]

ALGORITHMS = ("direct", "pooled_rows", "winograd")
MATCH_AT_ALGORITHMS = ("units", "winograd")

_TARGET_PIXELS = 192  # plane pixels per row group (per channel block) to amortise tile waste


@njit(parallel=PARALLEL, cache=True)
def _match_planes(x, wr, wofs_b, bpad, off, blk_k0, blk_nv, vl, ph, pw, poolh, poolw, sh, sw,
                  leak, wo, wp, wused, group, zrows, nchunks, h, idx):
    n_, c_, hh, ww = x.shape
    k_ = h.shape[1]
    hp = h.shape[2] // wp
    hpad, wpad = hh + 2 * ph, ww + 2 * pw
    nb = blk_k0.shape[0]
    nitems = n_ * nb
    kbw_max = NV_MAX * vl
    plane = hpad * wpad
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, nitems)
        xp = vector_zeros(c_ * plane, x.dtype)
        zb = vector_empty(zrows * kbw_max, x.dtype)
        best = vector_empty(group * wp * kbw_max, x.dtype)
        barg = vector_empty(group * wp * kbw_max, np.int32)
        xb = np.empty(PIX_MAX, dtype=np.int64)
        cur = -1
        for item in range(lo, hi):
            n = item // nb
            b = item - n * nb
            if n != cur:
                # interior of the zero-padded sample (the border stays zero)
                for c in range(c_):
                    for i in range(hh):
                        dst = c * plane + (i + ph) * wpad + pw
                        for j in range(ww):
                            xp[dst + j] = x[n, c, i, j]
                cur = n
            k0 = blk_k0[b]
            nv = blk_nv[b]
            kbw = nv * vl
            kval = min(kbw, k_ - k0)
            npx = PIX[nv]
            wofs = wofs_b[b]
            for g0 in range(0, hp, group):
                g1 = min(g0 + group, hp)
                r0 = g0 * sh
                nrows = (g1 - 1 - g0) * sh + poolh
                npix = nrows * wused
                r = r0
                j = 0
                for f0 in range(0, npix, npx):
                    for p in range(npx):
                        xb[p] = r * wpad + j
                        if f0 + p < npix - 1:  # the tail of the last tile repeats a pixel
                            j += 1
                            if j == wused:
                                j = 0
                                r += 1
                    conv_tile(wr, wofs, xp, xb, off, off.shape[0], bpad, k0, zb, f0 * kbw, kbw,
                              leak, nv, PIX)
                pool_group(zb, nv, kbw, g0, g1, r0, wused, wp, wo, sh, sw, poolh, poolw, best,
                           barg)
                # channel-major copy-out: contiguous runs per channel (register transposes,
                # as in the Winograd kernel, made layer 1 at N = 256 slower: 7.9 -> 10.6 ms)
                ne = (g1 - g0) * wp
                for l in range(kval):
                    hrow = h[n, k0 + l]
                    irow = idx[n, k0 + l]
                    for e in range(ne):
                        hrow[g0 * wp + e] = best[e * kbw + l]
                        irow[g0 * wp + e] = barg[e * kbw + l]


@njit(parallel=PARALLEL, cache=True)
def _match_whole(xf, wr, wofs_b, bpad, off, blk_k0, blk_nv, vl, leak, nchunks, h):
    """Plane 1 x 1 (templates cover the unpadded input): tiles of samples, h is (N, K)."""
    n_, k_ = h.shape
    taps = off.shape[0]
    nb = blk_k0.shape[0]
    kbw_max = NV_MAX * vl
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        zb = vector_empty(PIX_MAX * kbw_max, xf.dtype)
        xb = np.empty(PIX_MAX, dtype=np.int64)
        for b in range(nb):
            k0 = blk_k0[b]
            nv = blk_nv[b]
            kbw = nv * vl
            kval = min(kbw, k_ - k0)
            npx = PIX[nv]
            for n0 in range(lo, hi, npx):
                for p in range(npx):
                    xb[p] = min(n0 + p, hi - 1) * taps
                conv_tile(wr, wofs_b[b], xf, xb, off, off.shape[0], bpad, k0, zb, 0, kbw, leak,
                          nv, PIX)
                for p in range(min(npx, hi - n0)):
                    for l in range(kval):
                        h[n0 + p, k0 + l] = zb[p * kbw + l]


def plan_match_switch_pool(x, templates, bias, geometry):
    """The algorithm the automatic choice takes: "winograd" where ``winograd.AUTO`` and
    ``winograd.applies`` (3x3, >= 16 channels and templates, finite parameters, a plane where
    it saves products), else ``_plan_exact``'s."""
    if winograd.AUTO and winograd.applies(templates, bias, geometry.plane):
        return "winograd"
    return _plan_exact(x, geometry)


def _plan_exact(x, geometry):
    """"pooled_rows" where ``pooled_rows.applies`` (2x2 windows at stride 2, few channels,
    full vectors of pooled columns), else "direct": the same bits either way."""
    if x.shape[0] and pooled_rows.applies(x.shape[1], geometry.pool, geometry.stride,
                                          geometry.pooled[1], x.dtype):
        return "pooled_rows"
    return "direct"


def match_switch_pool(x, templates, bias, geometry, leak, algorithm="auto"):
    """The fused op (see ``fastdrmm.ops.match_switch_pool``) by ``algorithm``: one of
    ``ALGORITHMS`` or "auto" (``plan_match_switch_pool``). "pooled_rows" needs 2x2 windows
    at stride 2, "winograd" 3x3 templates; the samples the Winograd kernel flags (a
    non-finite z) are recomputed by the exact kernels."""
    name = choose(algorithm, ALGORITHMS,
                  lambda: plan_match_switch_pool(x, templates, bias, geometry))
    if name == "winograd":
        _need_3x3(templates)
        h, idx, redo = winograd.match_switch_pool(x, templates, bias, geometry, leak)
        redo_flagged(redo, lambda xs: _match_exact(xs, templates, bias, geometry, leak), x,
                     into=(h, idx))
        return h, idx
    if name == "pooled_rows":
        if not pooled_rows.applies(x.shape[1], geometry.pool, geometry.stride,
                                   geometry.pooled[1], x.dtype, any_shape=True):
            raise ValueError("algorithm='pooled_rows' needs 2x2 windows at stride 2, got "
                             f"pool {geometry.pool}, stride {geometry.stride}")
        return pooled_rows.match_switch_pool(x, templates, bias, geometry, leak)
    return _match_direct(x, templates, bias, geometry, leak)


def _need_3x3(templates):
    if templates.shape[2:] != (3, 3):
        raise ValueError("algorithm='winograd' needs 3x3 templates, got "
                         f"{templates.shape[2]}x{templates.shape[3]}")


def _match_exact(x, templates, bias, geometry, leak):
    """The op by the exact kernels (direct or pooled rows: the same bits)."""
    if _plan_exact(x, geometry) == "pooled_rows":
        return pooled_rows.match_switch_pool(x, templates, bias, geometry, leak)
    return _match_direct(x, templates, bias, geometry, leak)


def _match_direct(x, templates, bias, geometry, leak):
    n, c, hh, ww = x.shape
    k, _, kh, kw = templates.shape
    ph, pw = geometry.padding
    pool, stride = geometry.pool, geometry.stride
    ho, wo = geometry.plane
    hp, wp = geometry.pooled
    dtype = x.dtype
    h = buffers.empty((n, k, hp, wp), dtype)
    if n == 0:
        return h, np.empty((n, k, hp, wp), dtype=np.int32)
    vl = lanes(dtype)
    wr, bpad, k0, nv, wofs = relayout(templates, bias, vl)
    leak = float(leak)
    if ho == 1 and wo == 1 and ph == 0 and pw == 0:
        taps = c * kh * kw
        off = np.arange(taps, dtype=np.int64)
        _match_whole(x.reshape(-1), wr, wofs, bpad, off, k0, nv, vl, leak,
                     num_chunks(-(-n // PIX_MAX)), h.reshape(n, k))
        return h, np.zeros((n, k, hp, wp), dtype=np.int32)
    idx = buffers.empty((n, k, hp, wp), np.int32)
    hpad, wpad = hh + 2 * ph, ww + 2 * pw
    cc, uu, vv = np.meshgrid(np.arange(c), np.arange(kh), np.arange(kw), indexing="ij")
    off = (cc * hpad * wpad + uu * wpad + vv).reshape(-1).astype(np.int64)
    wused = (wp - 1) * stride[1] + pool[1]
    # pooled rows per group: enough plane pixels to amortise the tile remainder
    group = max(1, min(hp, -(-_TARGET_PIXELS // (stride[0] * wused))))
    zrows = ((group - 1) * stride[0] + pool[0]) * wused + PIX_MAX
    _match_planes(x, wr, wofs, bpad, off, k0, nv, vl, ph, pw, pool[0], pool[1],
                  stride[0], stride[1], leak, wo, wp, wused, group, zrows,
                  num_chunks(n * len(k0)), h.reshape(n, k, hp * wp), idx.reshape(n, k, hp * wp))
    return h, idx


# ------------------------------------------------------------------------------------------
# match_at: the matching read at given positions (the code gradient of the top-down pass)
#
# Every unit (n, k, p) is one dot product of template k with the patch of sample n at its
# position idx[n, k, p]: the positions differ per template (one argmax per channel), so no
# two units share a patch and there is nothing to tile as in a convolution. The sample is
# copied channel-last, which makes each patch row (kw * C values) contiguous, and the units
# of one template are taken four at a time so that each template value loaded serves four
# FMAs. Units whose switch is 0 are skipped: on a pooled ReLU layer that leaves about
# 1/pool^2 x (fraction on) of the full-plane matching's work.

_UNITS = 4  # units of one template per register block (dot_tile's P)


@njit(inline="always")
def _row_tails(w, xp, base, kh, row, rstride, vrow):
    """The scalar rest of each patch row (row values, kept unpadded in w too) beyond its
    whole vectors (vrow values)."""
    acc = xp.dtype.type(0)
    for u in range(kh):
        for e in range(vrow, row):
            acc += w[u * row + e] * xp[base + u * rstride + e]
    return acc


@njit(parallel=PARALLEL, cache=True)
def _match_at_kernel(x, wt, idx, sw, use_sw, ph, pw, kh, row, wo, wp, woff, xoff, vrow, group,
                     nchunks, out):
    n_, c_, hh, ww = x.shape
    k_, hp = idx.shape[1], idx.shape[2] // wp
    hpad, wpad = hh + 2 * ph, ww + 2 * pw
    rstride = wpad * c_
    nsteps = woff.shape[0]
    span = group * wp
    place = place_table(hpad - kh + 1, wo, rstride, c_, 0)
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        # the border stays zero; the slack after the plane is read by padded rows only
        xp = vector_zeros(hpad * wpad * c_ + vrow, x.dtype)
        base = np.empty(span + _UNITS, dtype=np.int64)
        slot = np.empty(span, dtype=np.int64)
        dots = vector_empty(_UNITS, x.dtype)
        for n in range(lo, hi):
            for c in range(c_):
                for i in range(hh):
                    dst = ((i + ph) * wpad + pw) * c_ + c
                    for j in range(ww):
                        xp[dst + j * c_] = x[n, c, i, j]
            # a group of pooled rows at a time, every template over it: the patches of the
            # group stay in L1 while the templates stream through
            for g0 in range(0, hp, group):
                g1 = min(g0 + group, hp)
                for k in range(k_):
                    w = wt[k]
                    m = 0
                    for e in range(g0 * wp, g1 * wp):
                        if use_sw and sw[n, k, e] == 0:
                            out[n, k, e] = 0
                            continue
                        base[m] = place[idx[n, k, e]]
                        slot[m] = e
                        m += 1
                    for t in range(m, m + _UNITS):  # a partial last block reads a valid patch
                        base[t] = 0
                    for t in range(0, m, _UNITS):
                        dot_tile(dots, w, 0, xp, base[t:], woff, xoff, nsteps, _UNITS)
                        for e in range(min(_UNITS, m - t)):
                            z = dots[e]
                            if vrow < row:
                                z += _row_tails(w, xp, base[t + e], kh, row, rstride, vrow)
                            if use_sw:
                                z *= sw[n, k, slot[t + e]]
                            out[n, k, slot[t + e]] = z


_L1_BYTES = 24 * 1024  # the patches of one group of rows: half of a 48 KiB L1


def plan_match_at(x, templates, idx, geometry, switches):
    """The algorithm the automatic choice takes: "winograd" where ``winograd.AUTO`` and
    ``winograd.match_at_applies`` (3x3, >= 16 channels and templates, finite templates, at
    least 5 % of the plane's units to read), else "units"."""
    if not winograd.AUTO or templates.shape[2:] != (3, 3) or not idx.size:
        return "units"
    on = idx.size if switches is None else count_nonzero(switches)
    return ("winograd" if winograd.match_at_applies(x.shape[0], templates, geometry.plane, on)
            else "units")


def match_at(x, templates, idx, geometry, switches, algorithm="auto"):
    """The matching read at ``idx`` (see ``fastdrmm.ops.match_at``) by ``algorithm``: one of
    ``MATCH_AT_ALGORITHMS`` or "auto" (``plan_match_at``). "units": this module's kernel, one
    dot product per unit whose switch is on; "winograd" (3x3 templates only): the whole
    plane, then read; the samples it flags (a non-finite value) are redone unit by unit.
    """
    name = choose(algorithm, MATCH_AT_ALGORITHMS,
                  lambda: plan_match_at(x, templates, idx, geometry, switches))
    if name == "winograd":
        _need_3x3(templates)
        if idx.size:
            def by_units(xs, ids, sws):
                return _match_at_units(xs, templates, ids, geometry, sws)

            out, redo = winograd.match_at(x, templates, idx, geometry, switches)
            redo_flagged(redo, by_units, x, idx, switches, into=out)
            return out
    return _match_at_units(x, templates, idx, geometry, switches)


def _match_at_units(x, templates, idx, geometry, switches):
    n, c, hh, ww = x.shape
    k, _, kh, kw = templates.shape
    ph, pw = geometry.padding
    ho, wo = geometry.plane
    hp = idx.shape[2]
    out = buffers.empty(idx.shape, x.dtype)
    if out.size == 0:
        return out
    use_sw = switches is not None
    sw = switches if use_sw else np.zeros((1, 1, 1, 1), dtype=x.dtype)
    # one patch row is kw * C contiguous values of the channel-last sample. On finite data it
    # is rounded up to whole vectors (zero weights times the next pixels' finite values);
    # otherwise the rest of each row is added in scalar code, so a NaN or inf next to a patch
    # cannot leak into it.
    vl = lanes(x.dtype)
    row = kw * c
    vrow = -(-row // vl) * vl if np.isfinite(x).all() else row // vl * vl
    wt = buffers.aligned_zeros((k, kh, vrow if vrow > row else row), x.dtype)
    wt[:, :, :row] = templates.transpose(0, 2, 3, 1).reshape(k, kh, row)
    uu, ee = np.meshgrid(np.arange(kh), np.arange(0, vrow, vl), indexing="ij")
    woff = (uu * wt.shape[2] + ee).reshape(-1).astype(np.int64)
    xoff = (uu * (ww + 2 * pw) * c + ee).reshape(-1).astype(np.int64)
    # pooled rows per group: their patches (plane rows per pooled row, plus kh - 1) fit in L1
    row_bytes = (ww + 2 * pw) * c * x.dtype.itemsize
    per_row = -(-ho // hp)
    group = max(1, min(hp, (_L1_BYTES // row_bytes - (kh - 1)) // per_row))
    wp = idx.shape[3]
    _match_at_kernel(x, wt.reshape(k, -1), idx.reshape(n, k, -1), sw.reshape(*sw.shape[:2], -1),
                     use_sw, ph, pw, kh, row, wo, wp, woff, xoff, vrow, group,
                     num_chunks(n), out.reshape(n, k, -1))
    return out
