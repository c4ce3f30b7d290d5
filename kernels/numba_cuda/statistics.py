"""M-step statistics of the templates (numba.cuda): B, s and the Gram matrix G.

The code is unpooled once (``rendering.unpool_on``; collisions are summed first, G being
quadratic in U). Every entry of B, s and G is then a reduction over the batch and the plane,
computed by one block: a strided per-thread partial sum in a fixed order, then a two-level sum
in static shared memory (two barriers), so the results are deterministic (no float atomics). The shifted planes of the
reference (a K*kh*kw x N*H*W matrix) are never formed: G[(k,a,b), (k2,a2,b2)] sums
``U[n,k,y+ph-a,x+pw-b] * U[n,k2,y+ph-a2,x+pw-b2]`` over the cropped image directly, one block
per entry of the upper triangle, written to both halves (G is exactly symmetric).
"""

import numpy as np
from numba import cuda, types

from . import _common, config
from .rendering import unpool_on


def _stats_source(dtype, cfg):
    """One kernel for B (blocks [0, K*C*kh*kw)) and s (the next K blocks)."""
    threads = cfg.threads
    nbt = _common.nb_type(dtype)
    zero = dtype.type(0)

    def stats_bs(u, x, big_b, s, N, K, C, H, W, Ho, Wo, kh, kw, ph, pw):
        red = cuda.shared.array(threads, nbt)
        tid = cuda.threadIdx.x
        blk = cuda.blockIdx.x
        nb = K * C * kh * kw
        how = Ho * Wo
        acc = zero
        if blk < nb:
            k, c, a, b = _common.unravel(blk, C, kh, kw)
            for e in range(tid, N * how, threads):
                n = e // how
                pos = e - n * how
                i = pos // Wo
                j = pos - i * Wo
                xr = i + a - ph
                xc = j + b - pw
                if xr >= 0 and xr < H and xc >= 0 and xc < W:
                    acc += u[(n * K + k) * how + pos] * x[((n * C + c) * H + xr) * W + xc]
        else:
            k = blk - nb
            for e in range(tid, N * how, threads):
                n = e // how
                acc += u[(n * K + k) * how + e - n * how]
        total = _common.block_sum(red, tid, acc, threads)
        if tid == 0:
            if blk < nb:
                big_b[blk] = total
            else:
                s[blk - nb] = total

    i64 = types.int64
    sig = types.void(nbt[::1], nbt[::1], nbt[::1], nbt[::1], *([i64] * 11))
    return stats_bs, sig


def _gram_source(dtype, cfg):
    threads = cfg.threads
    nbt = _common.nb_type(dtype)
    zero = dtype.type(0)

    def stats_gram(u, g, N, K, H, W, Ho, Wo, kh, kw, ph, pw):
        red = cuda.shared.array(threads, nbt)
        tid = cuda.threadIdx.x
        T = K * kh * kw
        # block -> (row, col) of the upper triangle, row-major
        rest = cuda.blockIdx.x
        row = 0
        while rest >= T - row:
            rest -= T - row
            row += 1
        col = row + rest
        b1 = row % kw
        a1 = (row // kw) % kh
        k1 = row // (kw * kh)
        b2 = col % kw
        a2 = (col // kw) % kh
        k2 = col // (kw * kh)
        how = Ho * Wo
        hw = H * W
        acc = zero
        for e in range(tid, N * hw, threads):
            n, y, x = _common.split(e, hw, W)
            i1 = y + ph - a1
            j1 = x + pw - b1
            i2 = y + ph - a2
            j2 = x + pw - b2
            if (i1 >= 0 and i1 < Ho and j1 >= 0 and j1 < Wo
                    and i2 >= 0 and i2 < Ho and j2 >= 0 and j2 < Wo):
                acc += (u[(n * K + k1) * how + i1 * Wo + j1]
                        * u[(n * K + k2) * how + i2 * Wo + j2])
        total = _common.block_sum(red, tid, acc, threads)
        if tid == 0:
            g[row * T + col] = total
            g[col * T + row] = total

    i64 = types.int64
    sig = types.void(nbt[::1], nbt[::1], *([i64] * 10))
    return stats_gram, sig


KERNELS = {"stats_bs": _stats_source, "stats_gram": _gram_source}


def template_stats(x, code, idx, geometry, switches, gram):
    n, c = (int(s) for s in x.shape[:2])
    k = int(code.shape[1])
    (hh, ww), (kh, kw), (ph, pw) = geometry.input, geometry.kernel, geometry.padding
    ho, wo = geometry.plane
    dtype = np.dtype(x.dtype)
    stream = _common.stream_of(x, code, idx, switches)
    cfg = config.snapshot()
    rows = k * kh * kw  # of G: one per template tap (k, a, b)
    if n == 0:  # empty sums
        return (_common.zeros((k, c, kh, kw), dtype, stream), _common.zeros((k,), dtype, stream),
                _common.zeros((rows, rows), dtype, stream) if gram else None)
    u = _common.flat(unpool_on(stream, code, idx, geometry.plane, switches))
    big_b = _common.empty((k, c, kh, kw), dtype, stream)
    s = _common.empty((k,), dtype, stream)
    geo = (ho, wo, kh, kw, ph, pw)
    kern = _common.get_kernel(_stats_source, dtype, cfg)
    kern[k * c * kh * kw + k, cfg.threads, stream](
        u, _common.flat(x), _common.flat(big_b), s, n, k, c, hh, ww, *geo)
    big_g = None
    if gram:
        big_g = _common.empty((rows, rows), dtype, stream)
        kern = _common.get_kernel(_gram_source, dtype, cfg)
        kern[rows * (rows + 1) // 2, cfg.threads, stream](u, _common.flat(big_g), n, k, hh,
                                                          ww, *geo)
    return big_b, s, big_g
