"""The accuracy screen of the Winograd kernels, and the direct recomputation of what it flags
(Numba CPU).

The kernel's error
------------------
Rounding in F(2x2, 3x3): the input transform (2 roundings per V), the templates' (computed
in float64, rounded once), the products summed over the C channels, the output transform (4
roundings) and the bias (1) bound the error of one z by

    E(o) <= (C + 12) * u * (|bias| + Q(o)),   Q(o) = sum_c sum_{a in field(o), b in taps}
                                                     K_o(a, b) |x_c,a| |w_kc,b|

(first order; the second-order terms are covered by a factor 1 + 2**-9). K_o couples an
input position of output o's own 3x3 field with every tap (the supports of B and A are those
of the field) with K_o(a, b) <= 4, so Q(o) <= 4 sum_c W1_kc F1_c(o), W1_kc = sum |w_kc| and
F1_c(o) the plain sum of |x_c| over o's field. The contract (``kernels.contracts``) asks
E(o) <= c T u (|bias| + S(o)) with S(o) = sum |w||x| >= sum_c wmin_kc F1_c(o) (wmin: the
smallest |w_kc|). So o meets it where

    room_k(o) = sum_c coef_kc F1_c(o) + (c T - (C + 12)(1 + 2**-9)) |bias_k| >= 0,
    coef_kc   = c T wmin_kc - 4 (C + 12)(1 + 2**-9) W1_kc.

(Where the caller rounds more, ``extra`` roundings of u |x| each, e.g. render's products
with the switches and colliding units, or u |z| after, match_at's product with the switch,
the second term of coef grows by ``extra`` W1_kc: their error is at most u sum |w||x| <=
u sum_c W1_kc F1_c(o) each.) coef is negative only for a "weak" pair, a template whose channel has a tiny or zero weight
(~9 % of the pairs of He templates): a large input there is the transform's failure. The
screen is per output, not per 2x2 tile: a tile's outputs see different fields, and at the
edge of a digit pairing one output's empty field with another's full one flagged ~20 % of
MNIST's tiles. Per output it flags none of MNIST's layer inputs (He templates, layers 2-4).

Cheaply: for template k all channels whose coef is at least m_k (the 10th percentile of its
positive coefs) are bounded by m_k, the rest (the exceptions: the weak pairs and ~10 % of the
strong ones, ~19 % of all) exactly:

    room_k(o) >= m_k F1(o) + sum_{c in exceptions_k} (coef_kc - m_k) F1_c(o)

with F1(o) = sum_c F1_c(o): ~a fifth of a (C x K) product per output, where Winograd's are 4;
an output this bound flags is checked again with every channel's own coef.
F1 and the sums are in x's dtype; their rounding (F1: 9 u relative; the sums' terms are at
most 3 max |coef| F1) is covered by asking room >= (4 E + 64) u max_c |coef_kc| F1(o) (E
exceptions at most; an infinite F1 flags). Flagged outputs are recomputed by the classical
sum (``recompute_windows``, ``recompute_units``), vectorised over the channels of a
channel-last copy of the sample.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..contracts import WINOGRAD
from ._partition import PARALLEL

__all__ = ["screen", "screen_code", "window_flags", "channel_last_templates",
           "recompute_windows", "recompute_units", "samples_to_redo"]

_ERROR_MARGIN = 1.0 + 2.0 ** -9    # second-order terms
_EXCEPTION_QUANTILE = 0.1          # m_k: this quantile of template k's positive coefs


def screen(x, templates, bias, padding, plane, c=None, extra=0):
    """Flags (uint8, (N, K, Ho, Wo)) of the outputs z of the 3x3 correlation of x (N, C, H,
    W) with ``templates`` at ``padding`` (output ``plane`` (Ho, Wo)) that the Winograd kernel
    may not compute within the accuracy contract (constant ``c``, default ``WINOGRAD``), or
    None where it flags none. A non-finite input flags its outputs (the kernel's own check
    redoes those samples anyway). ``extra``: roundings of u |x| each that the caller adds to
    every input, or u |z| to the output (match_at's product with the switch: 1)."""
    dummy = np.zeros((1, 1, 1), x.dtype)
    return _screen(x, dummy, np.zeros((1, 1, 1), np.int32), dummy, False, False, x.shape[2:],
                   templates, bias, padding, plane, c, extra)


def screen_code(code, idx, switches, code_plane, templates, padding, plane, collisions,
                c=None):
    """``screen`` of the correlation of the code (N, K, Hp, Wp) unpooled at ``idx`` onto the
    ``code_plane`` (times ``switches`` if given) with ``templates`` (no bias): sum |code sw|
    at each position, as the contract's sum of absolute products counts colliding units. The
    kernel rounds each product with a switch and each of at most ``collisions`` additions
    of units in one position before the transforms: ``extra`` = collisions + 1."""
    n, k = code.shape[:2]
    use_sw = switches is not None
    sw = switches.reshape(n, k, -1) if use_sw else np.zeros((1, 1, 1), code.dtype)
    return _screen(np.zeros((n, k, 1, 1), code.dtype), code.reshape(n, k, -1),
                   idx.reshape(n, k, -1), sw, True, use_sw, code_plane, templates,
                   np.zeros(templates.shape[0], code.dtype), padding, plane, c,
                   collisions + 1)


def _screen(x, code, cidx, csw, from_code, use_sw, in_plane, templates, bias, padding, plane,
            c, extra):
    c = WINOGRAD if c is None else c
    n, ch = x.shape[:2]
    k = templates.shape[0]
    ho, wo = plane
    if n == 0 or ho <= 0 or wo <= 0 or k == 0:
        return None
    u = float(np.finfo(x.dtype).eps) / 2
    ct = c * (9 * ch + 1)
    aw = np.abs(templates.astype(np.float64)).reshape(k, ch, 9)
    # (the extra roundings: u |x| each, times at most W1 per field position: S <= W1 F1)
    coef = ct * aw.min(axis=2) - (4 * (ch + 12) + extra) * _ERROR_MARGIN * aw.sum(axis=2)
    bterm = (ct - (ch + 12) * _ERROR_MARGIN) * np.abs(bias.astype(np.float64))
    # m_k: the quantile of template k's positive coefs (0 where it has none)
    npos = (coef > 0).sum(axis=1)
    ordered = np.sort(np.where(coef > 0, coef, np.inf), axis=1)
    at = np.minimum((_EXCEPTION_QUANTILE * npos).astype(np.int64), max(ch - 1, 0))
    m = np.where(npos > 0, ordered[np.arange(k), at], 0.0)
    exceptional = ~(coef >= m[:, None])           # NaN coefs (overflow) are exceptions
    exc_n = exceptional.sum(axis=1).astype(np.int64)
    width = max(int(exc_n.max()), 1)
    order = np.ascontiguousarray(np.argsort(~exceptional, axis=1, kind="stable")[:, :width])
    exc_w = np.take_along_axis(coef - m[:, None], order, axis=1)
    # F1's rounding (9 u) and the sums' (in x's dtype) of terms at most 3 max |coef| F1
    cmax = np.abs(coef).max(axis=1, initial=0.0)
    thr = (4 * width + 64) * u * cmax
    thr_exact = 64 * u * cmax       # F1's rounding only: the float64 sum's is far below
    flags = np.empty((n, k, ho * wo), np.uint8)
    counts = np.zeros(n, np.int64)
    _screen_samples(x, code, cidx, csw, from_code, use_sw, in_plane[0], in_plane[1],
                    padding[0], padding[1], ho, wo, m.astype(x.dtype), order,
                    np.ascontiguousarray(exc_w, dtype=x.dtype), exc_n, bterm, thr, coef,
                    thr_exact, flags, counts)
    if not counts.any():
        return None
    return flags.reshape(n, k, ho, wo)


@njit(parallel=PARALLEL, cache=True)
def _screen_samples(x, code, cidx, csw, from_code, use_sw, hh, ww, ph, pw, ho, wo, m, exc_c,
                    exc_w, exc_n, bterm, thr, coef, thr_exact, flags, counts):
    """Per sample: |x| (or the unpooled |code sw|) zero-padded, F1 (the 3x3 field sums of
    every channel, in x's dtype) and their channel sum (float64), then per template
    room = m_k F1 + sum over the exceptions of exc_w F1_c, and flags[n, k, p] =
    not (room + bterm_k >= thr_k F1 and F1 finite), where that fails checked again with every
    channel's own coef (float64, ``thr_exact``); counts[n] = flags set."""
    n_, k_, P = flags.shape
    c_ = code.shape[1] if from_code else x.shape[1]
    hb, wb = ho + 2, wo + 2
    for n in prange(n_):
        buf = np.zeros((c_, hb, wb), dtype=x.dtype)
        if from_code:
            for c in range(c_):
                for e in range(code.shape[2]):
                    v = abs(code[n, c, e])
                    if use_sw:
                        v = v * abs(csw[n, c, e])
                    pos = cidx[n, c, e]
                    r = pos // ww + ph
                    q = pos - (pos // ww) * ww + pw
                    if 0 <= r < hb and 0 <= q < wb:
                        buf[c, r, q] += v
        else:
            for c in range(c_):
                for r in range(max(0, -ph), min(hh, hb - ph)):
                    for q in range(max(0, -pw), min(ww, wb - pw)):
                        buf[c, r + ph, q + pw] = abs(x[n, c, r, q])
        f1 = np.empty((c_, P), dtype=x.dtype)
        rows = np.empty((hb, wo), dtype=x.dtype)
        total = np.zeros(P)
        for c in range(c_):
            for r in range(hb):
                for j in range(wo):
                    rows[r, j] = buf[c, r, j] + buf[c, r, j + 1] + buf[c, r, j + 2]
            for i in range(ho):
                for j in range(wo):
                    v = rows[i, j] + rows[i + 1, j] + rows[i + 2, j]
                    f1[c, i * wo + j] = v
                    total[i * wo + j] += v
        room = np.empty(P, dtype=x.dtype)
        tot = np.empty(P, dtype=x.dtype)
        for p in range(P):
            tot[p] = total[p]
        cnt = 0
        for k in range(k_):
            mk = m[k]
            for p in range(P):
                room[p] = mk * tot[p]
            for e in range(exc_n[k]):
                w = exc_w[k, e]
                src = f1[exc_c[k, e]]
                for p in range(P):
                    room[p] += w * src[p]
            bk = bterm[k]
            tk = thr[k]
            for p in range(P):
                bad = not (room[p] + bk >= tk * total[p] and total[p] < np.inf)
                if bad and total[p] < np.inf:
                    # the bound by m_k was too loose: every channel exactly, in float64
                    exact = bk
                    for c in range(c_):
                        exact += coef[k, c] * f1[c, p]
                    bad = not exact >= thr_exact[k] * total[p]
                flags[n, k, p] = bad
                cnt += bad
        counts[n] = cnt


@njit(parallel=PARALLEL, cache=True)
def window_flags(flags, poolh, poolw, sh, sw, out):
    """out[n, k, pi, pj] = whether any output of the pooling window is flagged."""
    n_, k_, hp, wp = out.shape
    for nk in prange(n_ * k_):
        n = nk // k_
        k = nk - n * k_
        for pi in range(hp):
            for pj in range(wp):
                hit = False
                for a in range(poolh):
                    for b in range(poolw):
                        hit |= flags[n, k, pi * sh + a, pj * sw + b] != 0
                out[n, k, pi, pj] = hit


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _dot(a, aofs, b, bofs, length, acc):
    """acc + sum_t a[aofs + t] b[bofs + t], in any order (vectorised): the classical bound
    holds for every order."""
    for t in range(length):
        acc += a[aofs + t] * b[bofs + t]
    return acc


@njit(inline="always")
def _channel_last(x, n, ph, pw):
    """Sample n of x (N, C, H, W), zero-padded and channel-last: (H + 2 ph, W + 2 pw, C),
    flat."""
    c_, hh, ww = x.shape[1:]
    wb = ww + 2 * pw
    buf = np.zeros((hh + 2 * ph) * wb * c_, dtype=x.dtype)
    for c in range(c_):
        for r in range(hh):
            for q in range(ww):
                buf[((r + ph) * wb + q + pw) * c_ + c] = x[n, c, r, q]
    return buf


def samples_to_redo(flags, redo):
    """uint8 (N,): the samples with a flagged output that the caller does not redo whole."""
    n = flags.shape[0]
    return (flags.reshape(n, -1).any(axis=1) & (redo == 0)).astype(np.uint8)


@njit(inline="always")
def _z(buf, wb, c_, tcl, k, i, j, acc):
    """The classical z of output (i, j), template k: three contiguous rows of 3C."""
    row = 3 * c_
    for a in range(3):
        acc = _dot(buf, ((i + a) * wb + j) * c_, tcl, (k * 3 + a) * row, row, acc)
    return acc


def channel_last_templates(templates):
    """(K, 3, 3, C) contiguous, flat: the taps of one template row next to each other."""
    return np.ascontiguousarray(templates.transpose(0, 2, 3, 1)).reshape(-1)


@njit(parallel=PARALLEL, cache=True)
def recompute_windows(x, tcl, bias, ph, pw, poolh, poolw, sh, sw, wo, leak, flags, todo, h,
                      idx, with_idx):
    """The flagged pooling windows (``flags`` (N, K, Hp, Wp) = 1) recomputed by the classical
    sum: z, the switch (``leak`` in x's dtype) and the first row-major max, as the reference
    does (NaN wins); idx too where ``with_idx``. Only samples n with ``todo[n]`` (see
    ``samples_to_redo``). ``tcl``: ``channel_last_templates``."""
    c_, ww = x.shape[1], x.shape[3]
    k_, hp, wp = h.shape[1:]
    wb = ww + 2 * pw
    for n in prange(x.shape[0]):
        if not todo[n]:
            continue
        buf = _channel_last(x, n, ph, pw)
        for k in range(k_):
            for pi in range(hp):
                r0 = pi * sh
                for pj in range(wp):
                    if not flags[n, k, pi, pj]:
                        continue
                    c0 = pj * sw
                    best = h[n, k, pi, pj]
                    barg = -1
                    for a in range(poolh):
                        for b in range(poolw):
                            z = _z(buf, wb, c_, tcl, k, r0 + a, c0 + b, bias[k])
                            if z > 0 or z != z:
                                y = z
                            elif leak == 0:
                                y = abs(leak)     # 0 in x's dtype, -inf included
                            else:
                                y = z * leak
                            if barg < 0 or (best == best and (y > best or y != y)):
                                best = y
                                barg = (r0 + a) * wo + c0 + b
                    h[n, k, pi, pj] = best
                    if with_idx:
                        idx[n, k, pi, pj] = barg


@njit(parallel=PARALLEL, cache=True)
def recompute_units(x, tcl, ph, pw, wo, idx, sw, use_sw, flags, todo, zero, z):
    """match_at's flagged units (``flags`` (N, K, units) = 1) of the samples with
    ``todo[n]`` recomputed by the classical sum, times the switch (``zero``: a 0 of x's
    dtype, the sum's start)."""
    c_, ww = x.shape[1], x.shape[3]
    k_, units = z.shape[1:]
    wb = ww + 2 * pw
    for n in prange(x.shape[0]):
        if not todo[n]:
            continue
        buf = _channel_last(x, n, ph, pw)
        for k in range(k_):
            for e in range(units):
                if not flags[n, k, e]:
                    continue
                if use_sw and sw[n, k, e] == 0:
                    continue       # the kernel's exact 0 (+0, as the reference's)
                p = idx[n, k, e]
                i = p // wo
                v = _z(buf, wb, c_, tcl, k, i, p - i * wo, zero[0])
                z[n, k, e] = v * sw[n, k, e] if use_sw else v
