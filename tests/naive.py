"""Explicit-loop oracles for the five ops (match_switch_pool, match_at, unpool, render,
template_stats), written straight from DESIGN.md section 2.

Deliberately naive (scalar Python loops in float64, tiny sizes only) so that they share no
code and no vectorisation trick with any backend they judge.
"""

import math

import numpy as np


def _pair(p):
    return (p, p) if np.isscalar(p) else tuple(p)


def match_switch_pool(x, templates, bias, padding=0, pool=2, stride=None, leak=0.0):
    """The fused op from its definition: the switched plane, then each window's first max."""
    return pool_first_max(switched_plane(x, templates, bias, padding, leak), pool, stride)


def unpool(code, idx, plane_shape, switches=None):
    code = np.asarray(code, dtype=np.float64)
    n_, k_, hp, wp = code.shape
    ho, wo = plane_shape
    u = np.zeros((n_, k_, ho, wo))
    for n in range(n_):
        for k in range(k_):
            for p in range(hp):
                for q in range(wp):
                    val = code[n, k, p, q]
                    if switches is not None:
                        val *= float(switches[n, k, p, q])
                    f = int(idx[n, k, p, q])
                    u[n, k, f // wo, f % wo] += val
    return u


def render(code, idx, templates, input_shape, padding=0, switches=None):
    w = np.asarray(templates, dtype=np.float64)
    k_, c_, kh, kw = w.shape
    ph, pw = _pair(padding)
    h_, w_ = input_shape
    ho, wo = h_ + 2 * ph - kh + 1, w_ + 2 * pw - kw + 1
    u = unpool(code, idx, (ho, wo), switches)
    r = np.zeros((u.shape[0], c_, h_, w_))
    for n in range(u.shape[0]):
        for k in range(k_):
            for i in range(ho):
                for j in range(wo):
                    if u[n, k, i, j] == 0:
                        continue
                    for c in range(c_):
                        for a in range(kh):
                            for b in range(kw):
                                y, xx = i + a - ph, j + b - pw
                                if 0 <= y < h_ and 0 <= xx < w_:
                                    r[n, c, y, xx] += u[n, k, i, j] * w[k, c, a, b]
    return r


def template_stats(x, code, idx, kernel_size, padding=0, switches=None):
    """B, s and G, with G built column by column as D^T D of the explicit render map."""
    big_b, s = template_bs(x, code, idx, kernel_size, padding, switches)
    kh, kw = _pair(kernel_size)
    ph, pw = _pair(padding)
    k_ = code.shape[1]
    h_, w_ = x.shape[2:]
    # D: one column per tap (k, a, b): the single-channel image that a unit template paints.
    cols = []
    for k in range(k_):
        for a in range(kh):
            for b in range(kw):
                unit = np.zeros((k_, 1, kh, kw))
                unit[k, 0, a, b] = 1.0
                cols.append(render(code, idx, unit, (h_, w_), (ph, pw), switches).reshape(-1))
    d = np.stack(cols, axis=1)
    return big_b, s, d.T @ d


def template_bs(x, code, idx, kernel_size, padding=0, switches=None):
    """B and s, term by term over the unpooled code; padded positions are real zeros (an
    inf or NaN code on a patch over the padding gives NaN through 0 * inf)."""
    x = np.asarray(x, dtype=np.float64)
    n_, c_, h_, w_ = x.shape
    kh, kw = _pair(kernel_size)
    ph, pw = _pair(padding)
    k_ = code.shape[1]
    ho, wo = h_ + 2 * ph - kh + 1, w_ + 2 * pw - kw + 1
    u = unpool(code, idx, (ho, wo), switches)
    big_b = np.zeros((k_, c_, kh, kw))
    for n in range(n_):
        for k in range(k_):
            for i in range(ho):
                for j in range(wo):
                    for c in range(c_):
                        for a in range(kh):
                            for b in range(kw):
                                y, xx = i + a - ph, j + b - pw
                                inside = 0 <= y < h_ and 0 <= xx < w_
                                xv = x[n, c, y, xx] if inside else 0.0
                                big_b[k, c, a, b] += u[n, k, i, j] * xv
    s = u.sum(axis=(0, 2, 3))
    return big_b, s


# ---------------------------------------------------------------------------------------------
# Whole-plane oracles for the checks of larger layers. The scalar ``match_switch_pool`` above
# costs a Python step per product; these keep its rules but add one tap at a time over the
# whole plane in float64 (numpy broadcasting, no einsum/BLAS), and pool in scalar loops.


def correlation_plane(x, templates, bias, padding=0):
    """z = bias + sum_t w_t xpad_t on the whole (Ho, Wo) plane, float64, taps in (c, u, v)
    order. Padded positions are real zeros (``0 * NaN`` poisons z, as in the scalar oracle)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(templates, dtype=np.float64)
    ph, pw = _pair(padding)
    n_, c_, h_, w_ = x.shape
    k_, _, kh, kw = w.shape
    xpad = np.zeros((n_, c_, h_ + 2 * ph, w_ + 2 * pw))
    xpad[:, :, ph:ph + h_, pw:pw + w_] = x
    ho, wo = h_ + 2 * ph - kh + 1, w_ + 2 * pw - kw + 1
    z = np.zeros((n_, k_, ho, wo))
    z += np.asarray(bias, dtype=np.float64)[None, :, None, None]
    with np.errstate(invalid="ignore", over="ignore"):
        for c in range(c_):
            for u in range(kh):
                for v in range(kw):
                    z += w[None, :, c, u, v, None, None] * xpad[:, None, c, u:u + ho, v:v + wo]
    return z


def switch(z, leak):
    """y = z where z > 0 or z is NaN, else leak * z (0 for the plain ReLU, -inf included)."""
    keep = (z > 0) | np.isnan(z)
    with np.errstate(invalid="ignore", over="ignore"):
        other = np.zeros_like(z) if leak == 0 else leak * z
    return np.where(keep, z, other)


def switched_plane(x, templates, bias, padding=0, leak=0.0):
    """y = switch(z) on the whole (Ho, Wo) plane in float64."""
    return switch(correlation_plane(x, templates, bias, padding), leak)


def pool_first_max(y, pool, stride=None):
    """Window max and flat position, scalar loops: candidates in row-major order, a later one
    wins only if strictly larger (ties keep the first), a NaN wins over every number and the
    first NaN sticks."""
    pool = _pair(pool)
    stride = pool if stride is None else _pair(stride)
    n_, k_, ho, wo = y.shape
    hp, wp = (ho - pool[0]) // stride[0] + 1, (wo - pool[1]) // stride[1] + 1
    h = np.empty((n_, k_, hp, wp))
    idx = np.empty((n_, k_, hp, wp), dtype=np.int64)
    for n in range(n_):
        for k in range(k_):
            plane = y[n, k].tolist()
            for p in range(hp):
                for q in range(wp):
                    best, where = None, None
                    for a in range(pool[0]):
                        for b in range(pool[1]):
                            i, j = p * stride[0] + a, q * stride[1] + b
                            val = plane[i][j]
                            if best is None or (not math.isnan(best)
                                                and (val > best or math.isnan(val))):
                                best, where = val, i * wo + j
                    h[n, k, p, q], idx[n, k, p, q] = best, where
    return h, idx


def match_at(x, templates, idx, padding=0, switches=None):
    """z (no bias, no switch) at the flat plane positions idx, times switches; exactly 0 where
    a switch is 0 (the unit is not matched). Scalar loops in float64 from the definition;
    padded positions are real zeros."""
    x = np.asarray(x, np.float64)
    w = np.asarray(templates, np.float64)
    ph, pw = _pair(padding)
    n_, c_, h_, w_ = x.shape
    k_, _, kh, kw = w.shape
    wo = w_ + 2 * pw - kw + 1
    out = np.zeros(idx.shape)
    for n, k, p, q in np.ndindex(*idx.shape):
        s = 1.0 if switches is None else float(switches[n, k, p, q])
        if s == 0:
            continue
        i, j = divmod(int(idx[n, k, p, q]), wo)
        z = 0.0
        for c in range(c_):
            for u in range(kh):
                for v in range(kw):
                    a, b = i + u - ph, j + v - pw
                    xv = x[n, c, a, b] if (0 <= a < h_ and 0 <= b < w_) else 0.0
                    z += w[k, c, u, v] * xv
        out[n, k, p, q] = s * z
    return out
