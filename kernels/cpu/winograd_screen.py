"""The accuracy screen of the Winograd matching kernels and the direct recomputation of
what it flags (Numba CPU).

``screen`` flags the 2x2 output tiles whose z the Winograd kernel may not compute within the
accuracy contract (``kernels.contracts``); ``direct_windows`` (matching) and
``direct_units`` (match_at) recompute, by the classical sum, the pooling windows and the
units that read a flagged tile. See ``winograd`` for the kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..contracts import WINOGRAD
from ._partition import PARALLEL

__all__ = ["screen", "direct_windows", "direct_units"]

# The accuracy screen
# -------------------
# Rounding in F(2x2, 3x3): the input transform (2 roundings per V), the templates' (computed
# in float64, rounded once: at most 4 float64 roundings and one of the dtype), the products
# summed over the C channels, the output transform (4 roundings) and the bias (1) bound the
# error of one z by
#
#     (C + 12) * u * (|bias| + sum_c sum_{a in field, b in taps} K_o(a, b) |x_c,a| |w_kc,b|)
#
# (first order; K_o(a, b) = sum_xi |A_o,xi| |G x G|_xi,b |B x B|_xi,a <= ka_o(a), the
# weights 1, 1, 2 along each axis of the field, mirrored for the tile's second row/column).
# So ``est = sum_c W1_kc * FP_c(o)`` (W1: sum of |w_kc|, FP: the ka-weighted sum of |x| over
# the field) bounds it, and ``room = sum_c wmin_kc * F1_c(o)`` (wmin: the smallest |w_kc|,
# F1: the plain sum of |x|) is at most sum |w||x|: where ``(C + 12) est <= c T room`` (c the
# contract's constant, T = 9 C + 1 terms) the tile meets the contract. Per 2x2 tile: the
# largest FP and the smallest F1 of its four outputs (leaving out those whose field is all
# zero: their z is the bias, exactly; at the edge of a digit they flagged ~24 % of the tiles
# of MNIST's second layer, 0.7 % without). Two float64 matrix products
# (tiles x C by C x K), a few per cent of the kernel's products.

_HIGHER_ORDER = 1.0 + 2.0 ** -10   # covers the second-order terms ((C + 12) u << 2**-10)
_PRODUCT_ROUNDING = 1.0 - 2.0 ** -30  # the screen's own float64 sums of at most 10**6 terms


def screen(x, templates, bias, padding, c=None):
    """Flags (bool, (N, th, tw, K)) of the 2x2 output tiles (tile (i, j): outputs 2i, 2i + 1
    by 2j, 2j + 1) whose z the Winograd kernel may not compute within the accuracy contract
    (``kernels.contracts``, constant ``c``, default the WINOGRAD one): a large input on a
    tiny or zero weight, a dynamic range the transforms cannot carry. Non-finite inputs flag
    their tiles too (the kernel's own check redoes those samples)."""
    c = WINOGRAD if c is None else c
    n, ch = x.shape[:2]
    k = templates.shape[0]
    ho = x.shape[2] + 2 * padding[0] - 2
    wo = x.shape[3] + 2 * padding[1] - 2
    th, tw = -(-ho // 2), -(-wo // 2)
    if n == 0 or th <= 0 or tw <= 0:
        return np.zeros((n, max(th, 0), max(tw, 0), k), dtype=np.bool_)
    aw = np.abs(templates.astype(np.float64)).reshape(k, ch, 9)
    cT = c * (9 * ch + 1)
    w1 = np.ascontiguousarray((ch + 12) * _HIGHER_ORDER * aw.sum(axis=2).T)   # (C, K)
    wmin = np.ascontiguousarray(cT * _PRODUCT_ROUNDING * aw.min(axis=2).T)
    bterm = (cT - ch - 12) * np.abs(bias.astype(np.float64))
    # a "strong" channel (4 w1 <= wmin: FP <= 4 F1 on every field) meets its share of every
    # output's check by itself, so its tile-level lower bound may be raised to 0; a weak one
    # (a tiny or zero weight) keeps its signed bound
    floor = np.where(4.0 * w1 <= wmin, 0.0, -np.inf)
    flags = np.empty((n, th, tw, k), dtype=np.bool_)
    _screen_tiles(x, padding[0], padding[1], th, tw, w1, wmin, floor, bterm, flags)
    return flags


@njit(parallel=PARALLEL, cache=True)
def _screen_tiles(x, ph, pw, th, tw, w1, wmin, floor, bterm, flags):
    """flags[n, ti, tj, k] = not (0 <= bterm[k] + sum_c max(f1[c] wmin[c, k] - fp[c] w1[c, k],
    floor[c, k])) with fp[c] the largest ka-weighted sum of |x_c| over the fields of the
    tile's four outputs and f1[c] the smallest plain sum over them (an all-zero field
    included, see ``_field_sums``).

    Each term bounds channel c's share ``wmin F1_c(o) - w1 FP_c(o)`` of one output's check
    from below, for each of the four outputs o, so the sum certifies every output of the tile;
    ``floor`` is 0 where that share is never negative (a strong channel), so a strong channel
    that is zero on one field costs nothing (without it ~20 % of MNIST layer-2 tiles were
    flagged). float64; a sample at a time, |x| copied into a zero-padded
    buffer; all in one pass (NumPy's BLAS took 30 ms for these small products next to the
    kernels' threads)."""
    n_, c_, hh, ww = x.shape
    k_ = w1.shape[1]
    hb, wb = 2 * th + 2, 2 * tw + 2
    for n in prange(n_):
        buf = np.zeros((c_, hb, wb))
        for c in range(c_):
            for r in range(min(hh, hb - ph)):
                for q in range(min(ww, wb - pw)):
                    buf[c, r + ph, q + pw] = abs(np.float64(x[n, c, r, q]))
        fp = np.empty(c_)
        f1 = np.empty(c_)
        room = np.empty(k_)
        for ti in range(th):
            for tj in range(tw):
                for c in range(c_):
                    fp[c], f1[c] = _field_sums(buf, c, 2 * ti, 2 * tj)
                for kk in range(k_):
                    room[kk] = bterm[kk]
                for c in range(c_):
                    a = fp[c]
                    if a == 0:       # every field of the tile all zero in channel c
                        continue
                    b = f1[c]
                    for kk in range(k_):
                        share = b * wmin[c, kk] - a * w1[c, kk]
                        if share < floor[c, kk]:     # NaN stays NaN
                            share = floor[c, kk]
                        room[kk] += share
                for kk in range(k_):
                    flags[n, ti, tj, kk] = not room[kk] >= 0   # NaN flags


@njit(inline="always")
def _field_sums(buf, c, r0, q0):
    """(largest ka-weighted sum, smallest plain sum) over the four 3x3 fields of the 4x4
    block at (r0, q0) of channel c.

    The smallest sum counts all-zero fields too (then it is 0): the tile's check must hold for
    each of its four outputs, and a channel that is zero on one output's field adds nothing
    to that output's room while its other fields could add to the tile's. Leaving zero fields
    out let a channel with large inputs and strong weights next to an output pay for another
    channel's large input on a zero weight inside it (errors of ~1e-4 where the exact z is
    0). A channel whose whole block is zero is skipped by the caller (it adds to neither)."""
    big = 0.0
    small = np.inf
    for pi in range(2):
        for pj in range(2):
            sp = 0.0
            s1 = 0.0
            for a in range(3):
                wa = 2.0 if a == 2 - 2 * pi else 1.0
                for b in range(3):
                    v = buf[c, r0 + pi + a, q0 + pj + b]
                    sp += wa * (2.0 if b == 2 - 2 * pj else 1.0) * v
                    s1 += v
            if not sp <= big:    # NaN wins
                big = sp
            if not s1 >= small:   # NaN wins
                small = s1
    return big, small


@njit(inline="always")
def _direct_z(x, templates, k, n, i, j, ph, pw, z):
    """z + sum_{c,u,v} W[k,c,u,v] xpad[n,c,i+u,j+v] in x's dtype (the classical bound)."""
    c_, hh, ww = x.shape[1:]
    for c in range(c_):
        for a in range(3):
            r = i + a - ph
            if r < 0 or r >= hh:
                continue
            for b in range(3):
                q = j + b - pw
                if 0 <= q < ww:
                    z += templates[k, c, a, b] * x[n, c, r, q]
    return z


@njit(parallel=PARALLEL, cache=True)
def direct_windows(x, templates, bias, ph, pw, wo, poolh, poolw, sh, sw, leak, flags, need,
                   redo, h, idx):
    """The pooling windows of (n, k) that touch a flagged tile, recomputed directly: z, the
    switch and the first row-major max, as the reference does (the plane ``wo`` wide).
    Samples to be redone anyway (``redo``) are skipped."""
    n_, k_, hp, wp = h.shape
    for nk in prange(n_ * k_):
        n = nk // k_
        k = nk - n * k_
        if redo[n] or not need[n, k]:
            continue
        for pi in range(hp):
            r0 = pi * sh
            for pj in range(wp):
                c0 = pj * sw
                hit = False
                for ti in range(r0 // 2, (r0 + poolh - 1) // 2 + 1):
                    for tj in range(c0 // 2, (c0 + poolw - 1) // 2 + 1):
                        hit |= flags[n, ti, tj, k]
                if not hit:
                    continue
                best = h[n, k, pi, pj]
                barg = -1
                for a in range(poolh):
                    for b in range(poolw):
                        z = _direct_z(x, templates, k, n, r0 + a, c0 + b, ph, pw, bias[k])
                        if z > 0 or z != z:
                            y = z
                        elif leak == 0:
                            y = 0.0
                        else:
                            y = z * leak
                        if barg < 0 or (best == best and (y > best or y != y)):
                            best = y
                            barg = (r0 + a) * wo + c0 + b
                h[n, k, pi, pj] = best
                idx[n, k, pi, pj] = barg


@njit(parallel=PARALLEL, cache=True)
def direct_units(x, templates, ph, pw, wo, idx, sw, use_sw, flags, need, redo, zero, z):
    """match_at's units whose position lies in a flagged tile, recomputed directly (times
    the switch; exactly 0 where it is 0)."""
    n_, k_ = z.shape[:2]
    zf = z.reshape(n_, k_, -1)
    idf = idx.reshape(n_, k_, -1)
    swf = sw.reshape(sw.shape[0], sw.shape[1], -1)
    for nk in prange(n_ * k_):
        n = nk // k_
        k = nk - n * k_
        if redo[n] or not need[n, k]:
            continue
        for e in range(zf.shape[2]):
            p = idf[n, k, e]
            i = p // wo
            j = p - i * wo
            if not flags[n, i // 2, j // 2, k]:
                continue
            if not use_sw:
                zf[n, k, e] = _direct_z(x, templates, k, n, i, j, ph, pw, zero[0])
            elif swf[n, k, e] == 0:
                zf[n, k, e] = 0
            else:
                zf[n, k, e] = _direct_z(x, templates, k, n, i, j, ph, pw, zero[0]) * swf[n, k, e]
