"""Bottom-up: fused matching + bias + switch + max pooling with first-argmax (numba.cuda).

Tiled kernel (the default): one block computes a tile of pooled outputs (``tile`` rows x cols)
of ``k_block`` templates for one image. Per input channel it stages the zero-padded input tile
with its halo and the templates' taps in static shared memory, and accumulates the matches of
the tile's whole z span into shared-memory accumulators (initialised to the bias). After the
last channel each thread switches and pools windows straight out of shared memory and writes
only ``h`` and ``idx``: z never reaches global memory. Positions of the z span that no window
reads (gaps when stride > pool) are skipped.

Direct kernel (fallback for templates/halos larger than the shared capacities): one thread per
pooled output, reading x and W from global memory.

Semantics as the NumPy reference: y = z if z > 0 or z is NaN, else 0 (leak == 0, so -inf -> 0)
or leak*z; a window candidate replaces the best iff best is not NaN and (v > best or v is NaN),
scanning the window row-major; idx = i*Wo + j.

match_at (the matching read at given positions, times the switches): one thread per output
unit, see ``_match_at_source``.
"""

from typing import NamedTuple

import numpy as np
from numba import cuda, types

from . import _common, config


def _tiled_source(dtype, cfg):
    threads, XS, WS, ZS = cfg.threads, cfg.x_smem, cfg.w_smem, cfg.z_smem
    nbt = _common.nb_type(dtype)
    zero = dtype.type(0)

    def match_tiled(x, w, bias, h, idx, leak, C, H, W, K, kh, kw, ph, pw, Wo, Hp, Wp,
                    poolh, poolw, sh, sw, KB, TPH, TPW, ZH, ZW, tiles_h, tiles_w, kgroups):
        xs = cuda.shared.array(XS, nbt)
        ws = cuda.shared.array(WS, nbt)
        zs = cuda.shared.array(ZS, nbt)
        tid = cuda.threadIdx.x
        n, kg, ti, tj = _common.unravel(cuda.blockIdx.x, kgroups, tiles_h, tiles_w)
        p0 = ti * TPH
        q0 = tj * TPW
        k0 = kg * KB
        zr0 = p0 * sh
        zc0 = q0 * sw
        xr0 = zr0 - ph  # the input position of the tile's first z (in the padding if < 0)
        xc0 = zc0 - pw
        XW = ZW + kw - 1
        XN = (ZH + kh - 1) * XW
        taps = kh * kw
        zhw = ZH * ZW
        for t in range(tid, KB * zhw, threads):
            kk = t // zhw
            zs[t] = bias[k0 + kk] if k0 + kk < K else zero
        for c in range(C):
            cuda.syncthreads()  # the previous channel's taps are consumed
            _common.stage_window(xs, x, (n * C + c) * H, H, W, xr0, xc0, XW, XN, tid, threads,
                                 zero)
            for t in range(tid, KB * taps, threads):
                kk = t // taps
                if k0 + kk < K:
                    ws[t] = w[((k0 + kk) * C + c) * taps + (t - kk * taps)]
                else:
                    ws[t] = zero
            cuda.syncthreads()
            for t in range(tid, KB * zhw, threads):
                kk, zi, zj = _common.split(t, zhw, ZW)
                if (zi % sh) < poolh and (zj % sw) < poolw:
                    acc = zs[t]
                    wb = kk * taps
                    for u in range(kh):
                        xb = (zi + u) * XW + zj
                        for v in range(kw):
                            acc += ws[wb + u * kw + v] * xs[xb + v]
                    zs[t] = acc
        cuda.syncthreads()
        tpp = TPH * TPW
        for t in range(tid, KB * tpp, threads):
            kk, pi, qi = _common.split(t, tpp, TPW)
            p = p0 + pi
            q = q0 + qi
            k = k0 + kk
            if p < Hp and q < Wp and k < K:
                best = zero
                where = 0
                first = True
                for a in range(poolh):
                    zi = pi * sh + a
                    for bb in range(poolw):
                        zj = qi * sw + bb
                        y = _common.switched(zs[kk * zhw + zi * ZW + zj], leak, zero)
                        if first or (best == best and (y > best or y != y)):
                            best = y
                            where = (zr0 + zi) * Wo + zc0 + zj
                            first = False
                o = ((n * K + k) * Hp + p) * Wp + q
                h[o] = best
                idx[o] = where

    i64 = types.int64
    sig = types.void(nbt[::1], nbt[::1], nbt[::1], nbt[::1], types.int32[::1], nbt,
                     *([i64] * 23))
    return match_tiled, sig


def _direct_source(dtype, cfg):
    threads = cfg.threads
    nbt = _common.nb_type(dtype)
    zero = dtype.type(0)

    def match_direct(x, w, bias, h, idx, leak, N, C, H, W, K, kh, kw, ph, pw, Wo, Hp, Wp,
                     poolh, poolw, sh, sw):
        total = N * K * Hp * Wp
        for o in range(cuda.blockIdx.x * threads + cuda.threadIdx.x, total,
                       cuda.gridDim.x * threads):
            n, k, p, q = _common.unravel(o, K, Hp, Wp)
            best = zero
            where = 0
            first = True
            for a in range(poolh):
                i = p * sh + a
                for bb in range(poolw):
                    j = q * sw + bb
                    z = bias[k]
                    for c in range(C):
                        for u in range(kh):
                            xr = i + u - ph
                            if xr >= 0 and xr < H:
                                for v in range(kw):
                                    xc = j + v - pw
                                    if xc >= 0 and xc < W:
                                        z += (w[((k * C + c) * kh + u) * kw + v]
                                              * x[((n * C + c) * H + xr) * W + xc])
                    y = _common.switched(z, leak, zero)
                    if first or (best == best and (y > best or y != y)):
                        best = y
                        where = i * Wo + j
                        first = False
            h[o] = best
            idx[o] = where

    i64 = types.int64
    sig = types.void(nbt[::1], nbt[::1], nbt[::1], nbt[::1], types.int32[::1], nbt,
                     *([i64] * 16))
    return match_direct, sig


def _match_at_source(dtype, cfg):
    """One thread per output unit (n, k, p, q), a grid-stride loop over the units.

    Why not tiles or a warp per unit: every unit has its own position, so units share no
    patch to stage, and there are many of them (N * K * Hp * Wp, hundreds of thousands for a
    conv layer of a training batch: enough threads without splitting a unit's C*kh*kw taps
    over lanes, which would add a shuffle reduction per unit). Consecutive threads take
    consecutive units of one (n, k) plane, so a warp reads the same template tap at once (one
    broadcast load) and nearby patches (argmax positions of neighbouring windows), which the
    L1 cache serves. A switched-off unit writes 0 without reading x: a NaN there cannot leak.
    Taps in the padding multiply a zero, as in the reference (an inf template tap gives NaN).
    """
    threads = cfg.threads
    nbt = _common.nb_type(dtype)
    zero, one = dtype.type(0), dtype.type(1)

    def match_at_units(x, w, idx, sw, has_sw, out, C, H, W, K, kh, kw, ph, pw, Wo, P):
        taps = kh * kw
        for o in range(cuda.blockIdx.x * threads + cuda.threadIdx.x, out.size,
                       cuda.gridDim.x * threads):
            s = sw[o] if has_sw else one
            if s == 0:
                out[o] = zero
                continue
            nk = o // P
            k = nk % K
            n = nk // K
            i = idx[o] // Wo
            j = idx[o] - i * Wo
            acc = zero
            for c in range(C):
                xb = (n * C + c) * H
                wb = (k * C + c) * taps
                for u in range(kh):
                    xr = i + u - ph
                    row_inside = xr >= 0 and xr < H
                    for v in range(kw):
                        xc = j + v - pw
                        xv = zero
                        if row_inside and xc >= 0 and xc < W:
                            xv = x[(xb + xr) * W + xc]
                        acc += w[wb + u * kw + v] * xv
            out[o] = acc * s

    i64 = types.int64
    sig = types.void(nbt[::1], nbt[::1], types.int32[::1], nbt[::1], types.boolean, nbt[::1],
                     *([i64] * 10))
    return match_at_units, sig


KERNELS = {"match_tiled": _tiled_source, "match_direct": _direct_source,
           "match_at_units": _match_at_source}


class Tiling(NamedTuple):
    """How the tiled matching kernel splits the pooled grid: ``k_block`` templates and a
    ``rows`` x ``cols`` tile of pooled units per block, reading a ``span`` of the z plane."""

    k_block: int
    rows: int
    cols: int
    span_rows: int
    span_cols: int


def plan(cfg, templates, geometry):
    """The Tiling of the tiled kernel, or None when nothing fits (direct kernel)."""
    (kh, kw), (hp, wp) = geometry.kernel, geometry.pooled
    pool, stride = geometry.pool, geometry.stride
    kb = min(cfg.k_block, templates, cfg.w_smem // (kh * kw))
    if kb < 1:
        return None

    def span(rows, cols):  # of the z plane that a tile of pooled units reads
        return (rows - 1) * stride[0] + pool[0], (cols - 1) * stride[1] + pool[1]

    def halo_fits(rows, cols):
        zh, zw = span(rows, cols)
        return (zh + kh - 1) * (zw + kw - 1) <= cfg.x_smem

    def accumulators_fit(block, rows, cols):
        zh, zw = span(rows, cols)
        return block * zh * zw <= cfg.z_smem

    fitted = _common.fit_tile(kb, min(cfg.tile[0], hp), min(cfg.tile[1], wp), halo_fits,
                              accumulators_fit)
    if fitted is None:
        return None
    kb, rows, cols = fitted
    return Tiling(kb, rows, cols, *span(rows, cols))


def match_switch_pool(x, templates, bias, geometry, leak):
    n, c = (int(s) for s in x.shape[:2])
    k = int(templates.shape[0])
    (hh, ww), (kh, kw), (ph, pw) = geometry.input, geometry.kernel, geometry.padding
    wo = geometry.plane[1]
    (hp, wp), pool, stride = geometry.pooled, geometry.pool, geometry.stride
    dtype = np.dtype(x.dtype)
    stream = _common.stream_of(x, templates, bias)
    h = _common.empty((n, k, hp, wp), dtype, stream)
    idx = _common.empty((n, k, hp, wp), np.int32, stream)
    if h.size == 0:
        return h, idx
    cfg = config.snapshot()
    args = (_common.flat(x), _common.flat(templates), bias, _common.flat(h), _common.flat(idx),
            dtype.type(leak))
    geo = (kh, kw, ph, pw, wo, hp, wp, *pool, *stride)
    tiling = plan(cfg, k, geometry)
    if tiling is None:
        kern = _common.get_kernel(_direct_source, dtype, cfg)
        _common.over_items(kern, h.size, cfg, stream)(*args, n, c, hh, ww, k, *geo)
        return h, idx
    tiles_h, tiles_w = _common.cdiv(hp, tiling.rows), _common.cdiv(wp, tiling.cols)
    kgroups = _common.cdiv(k, tiling.k_block)
    kern = _common.get_kernel(_tiled_source, dtype, cfg)
    blocks = n * kgroups * tiles_h * tiles_w
    kern[blocks, cfg.threads, stream](*args, c, hh, ww, k, *geo, *tiling,
                                      tiles_h, tiles_w, kgroups)
    return h, idx


def match_at(x, templates, idx, geometry, switches):
    c = int(x.shape[1])
    k = int(templates.shape[0])
    (hh, ww), (kh, kw), (ph, pw) = geometry.input, geometry.kernel, geometry.padding
    dtype = np.dtype(x.dtype)
    stream = _common.stream_of(x, templates, idx, switches)
    out = _common.empty(idx.shape, dtype, stream)
    if out.size == 0:
        return out
    cfg = config.snapshot()
    kern = _common.get_kernel(_match_at_source, dtype, cfg)
    xflat = _common.flat(x)
    sw = xflat if switches is None else _common.flat(switches)  # not read without switches
    units_per_plane = geometry.pooled[0] * geometry.pooled[1]
    _common.over_items(kern, out.size, cfg, stream)(
        xflat, _common.flat(templates), _common.flat(idx), sw, switches is not None,
        _common.flat(out), c, hh, ww, k, kh, kw, ph, pw, geometry.plane[1], units_per_plane)
    return out
