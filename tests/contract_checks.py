"""The accuracy contract (``kernels.contracts``) as assertions on the ops' outputs.

Every helper computes the exact value by the float64 NumPy kernels on float64 copies of the
inputs and ``sum |a||b|`` by the same kernels on the absolute values, and asserts

    |o - o_exact| <= c * T * (u * (|bias| + sum |a||b|) + eta)

(``eta``: the dtype's smallest subnormal, the rounding of a result that underflows; for float64
inputs the reference's own error, T * 2**-53 * sum |a||b|, is added). Non-finite exact values
must come back as the same kind (NaN where NaN, the same infinity).
"""

from __future__ import annotations

import numpy as np
from fastdrmm._validation import units_geometry
from fastdrmm.kernels.contracts import CONSTANTS, unit_roundoff
from fastdrmm.kernels.numpy import matching as ref_matching
from fastdrmm.kernels.numpy import rendering as ref_rendering
from fastdrmm.kernels.numpy import statistics as ref_statistics


def _pair(p):
    return (p, p) if np.isscalar(p) else tuple(int(v) for v in p)


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _abs64(a):
    return None if a is None else np.abs(np.asarray(a, dtype=np.float64))


def _scale(dtype, terms, c, sum_abs):
    """The contract's bound for outputs of ``terms`` terms whose sum |a||b| is ``sum_abs``."""
    u = unit_roundoff(dtype)
    eta = float(np.finfo(np.dtype(dtype)).smallest_subnormal)
    bound = c * terms * (u * sum_abs + eta)
    if np.dtype(dtype) == np.float64:
        bound = bound + terms * 2.0 ** -53 * sum_abs
    return bound


def assert_within(got, exact, bound, what):
    """|got - exact| <= bound where exact is finite; the same non-finite value elsewhere."""
    got = np.asarray(got, dtype=np.float64)
    finite = np.isfinite(exact)
    assert np.array_equal(np.isnan(got), np.isnan(exact)), f"{what}: NaN positions differ"
    inf = np.isinf(exact)
    assert np.array_equal(got[inf], exact[inf]), f"{what}: infinities differ"
    with np.errstate(invalid="ignore"):
        err = np.abs(got - exact)
    bad = finite & ~(err <= bound)
    if bad.any():
        at = np.argwhere(bad)[0]
        t = tuple(at)
        raise AssertionError(f"{what}: {bad.sum()} outputs outside the contract, e.g. at {t}: "
                             f"got {got[t]!r}, exact {exact[t]!r}, bound {bound[t]!r}")


def z_and_bound(x, templates, bias, padding, c):
    """The exact z (float64, before the switch) and its contract bound on the whole plane."""
    pad = _pair(padding)
    k, ch, kh, kw = np.shape(templates)
    z = ref_matching.correlate(_f64(x), _f64(templates), pad) + _f64(bias)[None, :, None, None]
    with np.errstate(invalid="ignore", over="ignore"):
        s = (ref_matching.correlate(_abs64(x), _abs64(templates), pad)
             + _abs64(bias)[None, :, None, None])
    return z, _scale(np.asarray(x).dtype, ch * kh * kw + 1, c, s)


def check_match(x, templates, bias, h, idx, padding, pool, stride, leak, c=None):
    """The contract's consequence for h and idx (see ``kernels.contracts``)."""
    c = CONSTANTS["match_switch_pool"] if c is None else c
    pool = _pair(pool)
    stride = pool if stride is None else _pair(stride)
    z, bz = z_and_bound(x, templates, bias, padding, c)
    y = ref_matching.switch(z, float(leak))
    h_exact, _ = ref_matching.pool_argmax(y, pool, stride)
    with np.errstate(invalid="ignore"):
        bwin, _ = ref_matching.pool_argmax(bz, pool, stride)
    u = unit_roundoff(np.asarray(x).dtype)
    bound = max(1.0, abs(float(leak))) * bwin + u * np.abs(np.nan_to_num(h_exact))
    assert_within(h, h_exact, bound, "match_switch_pool h")
    # idx: a position whose exact switched value is within twice the bound of the max
    n, k = y.shape[:2]
    yv = y.reshape(n, k, -1)
    picked = np.take_along_axis(yv, np.asarray(idx, dtype=np.intp).reshape(n, k, -1), axis=2)
    picked = picked.reshape(h_exact.shape)
    finite = np.isfinite(h_exact)
    with np.errstate(invalid="ignore"):
        close = np.abs(picked - h_exact) <= 2 * bound
    assert (close | ~finite).all(), "match_switch_pool idx: an argmax far from the window max"


def check_match_at(x, templates, idx, switches, out, padding, c=None):
    c = CONSTANTS["match_at"] if c is None else c
    k = np.shape(templates)[0]
    z, bz = z_and_bound(x, templates, np.zeros(k), padding, c)
    n = z.shape[0]
    flat = np.asarray(idx, dtype=np.intp).reshape(n, k, -1)
    picked = np.take_along_axis(z.reshape(n, k, -1), flat, axis=2).reshape(np.shape(idx))
    bound = np.take_along_axis(bz.reshape(n, k, -1), flat, axis=2).reshape(np.shape(idx))
    u = unit_roundoff(np.asarray(x).dtype)
    if switches is not None:
        sw = _f64(switches)
        with np.errstate(invalid="ignore", over="ignore"):
            exact = np.where(sw != 0, picked * sw, 0.0)
            bound = (np.where(sw != 0, np.abs(sw) * bound, 0.0)
                     + u * np.abs(np.nan_to_num(exact)))
    else:
        exact = picked
    assert_within(out, exact, bound, "match_at")


def _collisions(pool, stride):
    pool, stride = _pair(pool), _pair(stride)
    return -(-pool[0] // stride[0]) * -(-pool[1] // stride[1])


def check_render(code, idx, templates, input_shape, switches, r, padding, pool, stride,
                 c=None):
    c = CONSTANTS["render"] if c is None else c
    pad = _pair(padding)
    k, _, kh, kw = np.shape(templates)
    geometry = units_geometry(tuple(input_shape), (kh, kw), pad, np.shape(code)[2:])
    exact = ref_rendering.render(_f64(code), np.asarray(idx), _f64(templates), geometry,
                                 _f64(switches))
    with np.errstate(invalid="ignore", over="ignore"):
        s = ref_rendering.render(_abs64(code), np.asarray(idx), _abs64(templates), geometry,
                                 _abs64(switches))
    terms = k * kh * kw + _collisions(pool, stride)
    assert_within(r, exact, _scale(np.asarray(code).dtype, terms, c, s), "render")


def check_stats(x, code, idx, kernel_size, switches, got, padding, pool, stride, gram):
    pad = _pair(padding)
    ks = _pair(kernel_size)
    n, _, hh, ww = np.shape(x)
    ho, wo = hh + 2 * pad[0] - ks[0] + 1, ww + 2 * pad[1] - ks[1] + 1
    args = (np.asarray(idx), units_geometry((hh, ww), ks, pad, np.shape(code)[2:]))
    exact = ref_statistics.template_stats(_f64(x), _f64(code), *args, _f64(switches), gram)
    with np.errstate(invalid="ignore", over="ignore"):
        s = ref_statistics.template_stats(_abs64(x), _abs64(code), *args, _abs64(switches),
                                          gram)
    m = _collisions(pool, stride)
    dtype = np.asarray(x).dtype
    names = ("B", "s", "G")
    terms = (n * ho * wo + m, n * ho * wo + m, n * hh * ww * m * m)
    for name, g, e, a, t in zip(names, got, exact, s, terms):
        if e is None:
            continue
        c = CONSTANTS["template_stats." + name]
        assert_within(g, e, _scale(dtype, t, c, a), "template_stats " + name)
