"""Top-down: unpooling and rendering (transposed correlation), numba.cuda.

unpool: one thread per code entry adds ``code * switch`` into a zeroed plane with
``cuda.atomic.add``. Without collisions (stride >= pool, the usual case) every position gets at
most one addend and the result is exact and deterministic; where overlapping windows send
several entries to one position, they add in an unspecified order (equal to the reference up to
float rounding of that sum).

render: unpool, then a gather kernel, so r needs no atomics and no padded intermediate: one
block computes a tile (``tile``) of the cropped output for ``k_block`` channels of one image.
Per code channel k it stages the tile's halo of U and the taps W[k, c-block] in static shared
memory and accumulates ``r[c, y, x] += U[k, y + ph - a, x + pw - b] * W[k, c, a, b]`` in shared
accumulators, written once at the end. A direct one-thread-per-pixel kernel is the fallback
when the halo or the taps exceed the shared capacities.
"""

from typing import NamedTuple

import numpy as np
from numba import cuda, types

from . import _common, config


def _unpool_source(dtype, cfg):
    threads = cfg.threads
    nbt = _common.nb_type(dtype)

    def unpool_scatter(code, idx, sw, has_sw, u, P, HW):
        for e in range(cuda.blockIdx.x * threads + cuda.threadIdx.x, code.size,
                       cuda.gridDim.x * threads):
            val = code[e]
            if has_sw:
                val *= sw[e]
            cuda.atomic.add(u, (e // P) * HW + idx[e], val)

    i64 = types.int64
    sig = types.void(nbt[::1], types.int32[::1], nbt[::1], types.boolean, nbt[::1], i64, i64)
    return unpool_scatter, sig


def _render_tiled_source(dtype, cfg):
    threads, XS, WS, ZS = cfg.threads, cfg.x_smem, cfg.w_smem, cfg.z_smem
    nbt = _common.nb_type(dtype)
    zero = dtype.type(0)

    def render_tiled(u, w, r, K, C, Ho, Wo, H, W, kh, kw, ph, pw, CB, TH, TW,
                     tiles_h, tiles_w, cgroups):
        us = cuda.shared.array(XS, nbt)
        ws = cuda.shared.array(WS, nbt)
        rs = cuda.shared.array(ZS, nbt)
        tid = cuda.threadIdx.x
        n, cg, ti, tj = _common.unravel(cuda.blockIdx.x, cgroups, tiles_h, tiles_w)
        y0 = ti * TH
        x0 = tj * TW
        c0 = cg * CB
        UW = TW + kw - 1
        UN = (TH + kh - 1) * UW
        ur0 = y0 + ph - (kh - 1)
        uc0 = x0 + pw - (kw - 1)
        taps = kh * kw
        thw = TH * TW
        for t in range(tid, CB * thw, threads):
            rs[t] = zero
        for k in range(K):
            cuda.syncthreads()
            _common.stage_window(us, u, (n * K + k) * Ho, Ho, Wo, ur0, uc0, UW, UN, tid,
                                 threads, zero)
            for t in range(tid, CB * taps, threads):
                cc = t // taps
                if c0 + cc < C:
                    ws[t] = w[(k * C + c0 + cc) * taps + (t - cc * taps)]
                else:
                    ws[t] = zero
            cuda.syncthreads()
            for t in range(tid, CB * thw, threads):
                cc, ty, tx = _common.split(t, thw, TW)
                acc = rs[t]
                wb = cc * taps
                for a in range(kh):
                    ub = (ty + kh - 1 - a) * UW + tx + kw - 1
                    for bb in range(kw):
                        acc += us[ub - bb] * ws[wb + a * kw + bb]
                rs[t] = acc
        cuda.syncthreads()
        for t in range(tid, CB * thw, threads):
            cc, ty, tx = _common.split(t, thw, TW)
            if c0 + cc < C and y0 + ty < H and x0 + tx < W:
                r[((n * C + c0 + cc) * H + y0 + ty) * W + x0 + tx] = rs[t]

    i64 = types.int64
    sig = types.void(nbt[::1], nbt[::1], nbt[::1], *([i64] * 16))
    return render_tiled, sig


def _render_direct_source(dtype, cfg):
    threads = cfg.threads
    nbt = _common.nb_type(dtype)

    def render_direct(u, w, r, N, K, C, Ho, Wo, H, W, kh, kw, ph, pw):
        for o in range(cuda.blockIdx.x * threads + cuda.threadIdx.x, N * C * H * W,
                       cuda.gridDim.x * threads):
            n, c, y, x = _common.unravel(o, C, H, W)
            acc = r[o]  # zero-filled
            for k in range(K):
                for a in range(kh):
                    i = y + ph - a
                    if i >= 0 and i < Ho:
                        for bb in range(kw):
                            j = x + pw - bb
                            if j >= 0 and j < Wo:
                                acc += (u[((n * K + k) * Ho + i) * Wo + j]
                                        * w[((k * C + c) * kh + a) * kw + bb])
            r[o] = acc

    i64 = types.int64
    sig = types.void(nbt[::1], nbt[::1], nbt[::1], *([i64] * 11))
    return render_direct, sig


KERNELS = {"unpool_scatter": _unpool_source, "render_tiled": _render_tiled_source,
           "render_direct": _render_direct_source}


def unpool_on(stream, code, idx, plane_shape, switches):
    """unpool, queued on ``stream`` (render and template_stats unpool on their own stream)."""
    n, k, hp, wp = (int(s) for s in code.shape)
    dtype = np.dtype(code.dtype)
    u = _common.zeros((n, k, *plane_shape), dtype, stream)
    if code.size == 0:
        return u
    cfg = config.snapshot()
    kern = _common.get_kernel(_unpool_source, dtype, cfg)
    cflat = _common.flat(code)
    sw = cflat if switches is None else _common.flat(switches)
    _common.over_items(kern, code.size, cfg, stream)(
        cflat, _common.flat(idx), sw, switches is not None, _common.flat(u),
        hp * wp, plane_shape[0] * plane_shape[1])
    return u


def unpool(code, idx, plane_shape, switches):
    return unpool_on(_common.stream_of(code, idx, switches), code, idx, plane_shape, switches)


class Tiling(NamedTuple):
    """How the tiled render kernel splits the output: ``c_block`` channels and a ``rows`` x
    ``cols`` tile of rendered pixels per block."""

    c_block: int
    rows: int
    cols: int


def plan(cfg, channels, geometry):
    """The Tiling of the tiled render kernel, or None (direct kernel)."""
    (kh, kw), (hh, ww) = geometry.kernel, geometry.input
    cb = min(cfg.k_block, channels, cfg.w_smem // (kh * kw))
    if cb < 1:
        return None
    fitted = _common.fit_tile(
        cb, min(cfg.tile[0], hh), min(cfg.tile[1], ww),
        lambda rows, cols: (rows + kh - 1) * (cols + kw - 1) <= cfg.x_smem,
        lambda block, rows, cols: block * rows * cols <= cfg.z_smem)
    return None if fitted is None else Tiling(*fitted)


def render(code, idx, templates, geometry, switches):
    n, k = int(code.shape[0]), int(code.shape[1])
    c = int(templates.shape[1])
    (hh, ww), (kh, kw), (ph, pw) = geometry.input, geometry.kernel, geometry.padding
    ho, wo = geometry.plane
    dtype = np.dtype(code.dtype)
    stream = _common.stream_of(code, idx, templates, switches)
    cfg = config.snapshot()
    tiling = plan(cfg, c, geometry)
    if n == 0:
        return _common.empty((n, c, hh, ww), dtype, stream)
    u = unpool_on(stream, code, idx, geometry.plane, switches)
    args = (_common.flat(u), _common.flat(templates))
    if tiling is None:
        r = _common.zeros((n, c, hh, ww), dtype, stream)
        kern = _common.get_kernel(_render_direct_source, dtype, cfg)
        _common.over_items(kern, r.size, cfg, stream)(
            *args, _common.flat(r), n, k, c, ho, wo, hh, ww, kh, kw, ph, pw)
        return r
    r = _common.empty((n, c, hh, ww), dtype, stream)
    tiles_h, tiles_w = _common.cdiv(hh, tiling.rows), _common.cdiv(ww, tiling.cols)
    cgroups = _common.cdiv(c, tiling.c_block)
    kern = _common.get_kernel(_render_tiled_source, dtype, cfg)
    kern[n * cgroups * tiles_h * tiles_w, cfg.threads, stream](
        *args, _common.flat(r), k, c, ho, wo, hh, ww, kh, kw, ph, pw, *tiling,
        tiles_h, tiles_w, cgroups)
    return r
