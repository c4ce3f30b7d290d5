"""Matching for few input channels with 2x2 pooling: vectors over pooled columns (Numba CPU).

Why
---
The direct kernel (``matching._match_planes``) puts templates in the vector lanes and pixels
in the register tile. With one input channel (MNIST's first layer: 1 -> 32, 5x5, pool 2) that
leaves a switched plane of K channel-last values per pixel to pool and then to copy out
element by element into the channel-first h and idx, which cost more than the products:
layer 1 at batch 256 took ~7.5 ms for 0.42 GFLOP (~55 GFLOP/s, a sixth of the matmul rate).

Here the lanes are VL consecutive pooled columns of one pooled row, and the register tile
is NT templates x the 4 positions of the 2x2 window (4 NT accumulators)::

    z[k, 2p + r, 2q + s] = bias[k] + sum_t w[k, t] xpad[c_t, 2p + r + a_t, 2q + s + b_t]

For a fixed window position (r, s) and tap t, the VL values over q are every other column of
one padded row, so the padded sample is stored split into its even and odd columns
(``xs[c][column parity][row][column // 2]``) and each is one contiguous vector load. Per tap
a step loads the 4 vectors and NT broadcast weights and does 4 NT fused multiply-adds. The
epilogue switches the 4 NT vectors, max-pools the 4 window positions in row-major order with
the reference's NaN rule, and stores VL pooled values and VL positions per template straight
into the rows of h and idx: nothing to pool or copy out afterwards.

The arithmetic is the direct kernel's, term for term: each z starts from the bias and adds
the taps in the same (channel, row, column) order with ``llvm.fmuladd``; the switch and the
pooling comparisons are ``conv_tile``'s and ``pool_step``'s. So h and idx are bit-for-bit
those of the direct kernel, for any values (NaN and inf included).

When: 2x2 windows at stride 2, fewer input channels than a vector has lanes (more channels
favour the direct kernel's vectors over templates), and at least two thirds of the lanes of
the pooled row's vectors in use.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import buffers
from ._partition import PARALLEL, chunk_bounds, num_chunks, vector_empty, vector_zeros
from ._vector import I32, I64, VBYTES, counted_loop, lanes, literal_int, vector_helpers

__all__ = ["applies", "match_switch_pool"]

# templates per register tile: 4 NT accumulators + 4 loads + NT broadcasts in the registers
NT = 4 if VBYTES == 64 else 2


def applies(c, pool, stride, wp, dtype, any_shape=False):
    """Whether this kernel takes a matching: 2x2 windows at stride 2 and, unless
    ``any_shape`` (tests), fewer channels than lanes and at least 2/3 of the lanes of each
    pooled row's vectors in use."""
    if tuple(pool) != (2, 2) or tuple(stride) != (2, 2) or wp <= 0:
        return False
    vl = lanes(dtype)
    return any_shape or (c < vl and 3 * wp >= 2 * (-(-wp // vl) * vl))


@intrinsic(prefer_literal=True)
def pool2_tile(typingctx, xs, xbase, toff, ntaps, w, wofs, bias, bofs, leak, h, hofs, hstride,
               idx, flat0, wo, NT_):
    """``NT`` templates x VL pooled columns of one pooled row, switched and 2x2-pooled::

        for j < NT, window position e = 2 r + s < 4, lane l < VL:
            acc = bias[bofs + j]
            for t in range(ntaps):                          # fixed order
                acc = fmuladd(w[wofs + t*NT + j], xs[xbase + toff[4 t + e] + l], acc)
            z_e = acc if (acc > 0 or acc is NaN) else (0 if leak == 0 else leak * acc)
        h[hofs + j*hstride + l]   = the first maximum of z_0..z_3 (a NaN wins and sticks)
        idx[hofs + j*hstride + l] = flat0 + r*wo + s + 2 l   of that maximum

    ``xs``, ``w``, ``bias`` and ``h`` share a float dtype; ``toff`` is int64, ``idx`` int32;
    ``NT`` is a compile-time constant. No bounds checks.
    """
    nt = literal_int("pool2_tile", "NT_", NT_, "it sets how many templates of accumulators "
                     "the tile holds in registers")
    dt = xs.dtype
    sig = types.void(xs, xbase, toff, ntaps, w, wofs, bias, bofs, leak, h, hofs, hstride, idx,
                     flat0, wo, NT_)

    def codegen(context, builder, signature, args):
        k = vector_helpers(context, builder, dt, signature, args)
        vl = k.vl
        xbase_, ntaps_, wofs_, bofs_, hofs_, hstr_ = k.int64("xbase", "ntaps", "wofs", "bofs",
                                                             "hofs", "hstride")
        flat0_, wo_ = k.arg("flat0", types.int32), k.arg("wo", types.int32)
        switch = k.switch(k.arg("leak", dt))
        xp, tp, wp_, bp, hp_, ip = k.data("xs", "toff", "w", "bias", "h", "idx")
        init = [k.splat(k.load(bp, builder.add(bofs_, I64(j)))) for j in range(nt)]

        def step(t, accs):
            t4 = builder.mul(t, I64(4))
            xv = [k.vload(xp, builder.add(xbase_, k.load(tp, builder.add(t4, I64(e)))))
                  for e in range(4)]
            wrow = builder.add(wofs_, builder.mul(t, I64(nt)))
            new = []
            for j in range(nt):
                wv = k.splat(k.load(wp_, builder.add(wrow, I64(j))))
                for e in range(4):
                    new.append(k.fmuladd(wv, xv[e], accs[4 * j + e]))
            return new

        accs, _ = counted_loop(builder, "p2", I64(0), ntaps_, 1,
                               [v for v in init for _e in range(4)], step)
        base = builder.add(k.splat(flat0_), k.mask([2 * l for l in range(vl)]))
        flats = []
        for r in range(2):
            for s in range(2):
                shift = builder.add(builder.mul(wo_, I32(r)), I32(s))
                flats.append(builder.add(base, k.splat(shift)))
        for j in range(nt):
            best = arg = None
            for e in range(4):
                v = switch(accs[4 * j + e])
                if best is None:
                    best, arg = v, flats[e]
                    continue
                take = builder.and_(builder.fcmp_ordered("==", best, best),
                                    builder.or_(builder.fcmp_ordered(">", v, best),
                                                builder.fcmp_unordered("uno", v, v)))
                best = builder.select(take, v, best)
                arg = builder.select(take, flats[e], arg)
            at = builder.add(hofs_, builder.mul(hstr_, I64(j)))
            k.vstore(best, hp_, at)
            k.vstore(arg, ip, at)

    return sig, codegen



@njit(inline="always")
def _tile(xs, xbase, toff, ntaps, w, wofs, bias, bofs, leak, h, hofs, hstride, idx, flat0, wo):
    pool2_tile(xs, xbase, toff, ntaps, w, wofs, bias, bofs, leak, h, hofs, hstride, idx, flat0,
               wo, NT)


@njit(parallel=PARALLEL, cache=True)
def _match_pool2(x, wt, bpad, toff, ph, pw, hpad, w2, leak, wo, vl, nchunks, h, idx):
    """h and idx (flat (N, K, hp, wp) views) of every sample, one chunk of samples each."""
    n_, c_, hh, ww = x.shape
    k_, hp, wp = h.shape[1], h.shape[2], h.shape[3]
    ntaps = toff.shape[0] // 4
    hf = h.reshape(-1)
    idf = idx.reshape(-1)
    plane = hp * wp
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        # even and odd columns of the padded sample; the border and the slack stay zero
        xs = vector_zeros(c_ * 2 * hpad * w2, x.dtype)
        th = vector_empty(NT * vl, x.dtype)     # a tile that does not fit h: its edges
        ti = vector_empty(NT * vl, np.int32)
        for n in range(lo, hi):
            for c in range(c_):
                for i in range(hh):
                    row = (c * 2 * hpad + i + ph) * w2
                    for j in range(ww):
                        jj = j + pw
                        xs[row + (jj & 1) * hpad * w2 + (jj >> 1)] = x[n, c, i, j]
            for k0 in range(0, k_, NT):
                nk = min(NT, k_ - k0)
                for p in range(hp):
                    for q0 in range(0, wp, vl):
                        xbase = 2 * p * w2 + q0
                        flat0 = 2 * p * wo + 2 * q0
                        at = ((n * k_ + k0) * hp + p) * wp + q0
                        nq = min(vl, wp - q0)
                        if nk == NT and nq == vl:
                            _tile(xs, xbase, toff, ntaps, wt, k0 * ntaps, bpad, k0, leak, hf,
                                  at, plane, idf, flat0, wo)
                        else:
                            _tile(xs, xbase, toff, ntaps, wt, k0 * ntaps, bpad, k0, leak, th,
                                  0, vl, ti, flat0, wo)
                            for j in range(nk):
                                for l in range(nq):
                                    hf[at + j * plane + l] = th[j * vl + l]
                                    idf[at + j * plane + l] = ti[j * vl + l]


def match_switch_pool(x, templates, bias, geometry, leak):
    """h and idx of the fused op for 2x2 windows at stride 2 (see ``applies``)."""
    n, c, hh, ww = x.shape
    k, _, kh, kw = templates.shape
    ph, pw = geometry.padding
    hpad, wpad = hh + 2 * ph, ww + 2 * pw
    wo = geometry.plane[1]
    hp, wp = geometry.pooled
    dtype = x.dtype
    vl = lanes(dtype)
    h = buffers.empty((n, k, hp, wp), dtype)
    idx = buffers.empty((n, k, hp, wp), np.int32)
    if n == 0 or hp == 0 or wp == 0:
        return h, idx
    # half-width rows: every vector of a pooled row (the last one past wp included) and every
    # column shift b // 2 of a tap stay inside the row
    w2 = max((wpad + 1) // 2, -(-wp // vl) * vl + kw // 2 + 1)
    taps = c * kh * kw
    kpad = -(-k // NT) * NT
    # weights [block of NT templates][tap (c, a, b)][template in the block]
    wk = np.zeros((kpad, taps), dtype=dtype)
    wk[:k] = templates.reshape(k, taps)
    wt = buffers.aligned_zeros(kpad * taps, dtype)
    wt[:] = wk.reshape(kpad // NT, NT, taps).transpose(0, 2, 1).reshape(-1)
    bpad = buffers.aligned_zeros(kpad, dtype)
    bpad[:k] = bias
    # toff[4 t + 2 r + s]: where window position (r, s) of tap t = (c, a, b) reads, relative
    # to the pooled row's first even-column element
    cc, aa, bb, rr, ss = np.meshgrid(np.arange(c), np.arange(kh), np.arange(kw), np.arange(2),
                                     np.arange(2), indexing="ij")
    col = ss + bb
    toff = (((cc * 2 + (col & 1)) * hpad + rr + aa) * w2 + (col >> 1)).reshape(-1)
    _match_pool2(x, wt, bpad, toff.astype(np.int64), ph, pw, hpad, w2, float(leak), wo, vl,
                 num_chunks(n), h, idx)
    return h, idx
