"""Comparison helpers shared by the op tests: tie-aware pooling checks against the float64
oracles of ``naive``, and the per-op scenario checks that every backend's tests run (their
inputs come from ``scenarios``)."""

import numpy as np

import naive
import runners
from scenarios import latents, pair, plane_of, random_layer

DTYPES = [np.float32, np.float64]


def tol(dtype):
    """(rtol, atol) for a result of this dtype against the float64 oracle."""
    return (2e-4, 2e-4) if np.dtype(dtype) == np.float32 else (1e-10, 1e-10)


def assert_same_non_finite(got, want, tol):
    """NaN and inf exactly where the reference has them, the finite entries within tol."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=tol, atol=tol)


def switched_plane(x, templates, bias, padding, leak):
    """y on the whole (Ho, Wo) plane, in float64, from the independent oracle (never from a
    backend under test: the numpy backend is judged too)."""
    return naive.switched_plane(x, templates, bias, padding, leak)


def window_candidates(y, pool, stride):
    """(P, N, K, Hp, Wp) values and flat positions of every window, in row-major order."""
    ho, wo = y.shape[2:]
    hp, wp = (ho - pool[0]) // stride[0] + 1, (wo - pool[1]) // stride[1] + 1
    vals, flats = [], []
    for a in range(pool[0]):
        for b in range(pool[1]):
            rows = np.arange(hp)[:, None] * stride[0] + a
            cols = np.arange(wp)[None, :] * stride[1] + b
            vals.append(y[:, :, rows, cols])
            flats.append(np.broadcast_to(rows * wo + cols, vals[-1].shape))
    return np.stack(vals), np.stack(flats)


def assert_pooling_matches(h, idx, x, templates, bias, *, padding=(0, 0), pool=(2, 2),
                           stride=None, leak=0.0, dtype=np.float64):
    """Check h/idx of match_switch_pool against the float64 loop oracle (``naive``), tolerant
    only at near-ties.

    Exact where the answer is exact: NaN placement, the position of the first NaN, the
    first-position rule on exact ties. Where two candidates of a window are closer than the
    dtype's rounding, either may win, but h must still be the value at idx.
    """
    pool = tuple(pool)
    stride = pool if stride is None else tuple(stride)
    y = switched_plane(x, templates, bias, padding, leak)
    vals, flats = window_candidates(y, pool, stride)
    want_h, want_idx = naive.pool_first_max(y, pool, stride)
    assert h.shape == want_h.shape and idx.shape == want_h.shape
    assert h.dtype == np.dtype(dtype) and idx.dtype == np.int32
    rtol, atol = tol(dtype)
    nan_want = np.isnan(want_h)
    np.testing.assert_array_equal(np.isnan(h), nan_want, err_msg="NaN placement differs")
    np.testing.assert_array_equal(idx[nan_want], want_idx[nan_want], err_msg="first NaN differs")
    inf_want = np.isinf(want_h)
    np.testing.assert_array_equal(h[inf_want], want_h[inf_want])
    fin = ~nan_want & ~inf_want
    np.testing.assert_allclose(h[fin], want_h[fin], rtol=rtol, atol=atol)
    # idx must name a position of its own window...
    in_window = (flats == idx[None]).any(axis=0)
    assert in_window.all(), "idx points outside its pooling window"
    # ...whose value is the window max (to rounding) ...
    y_at = np.take_along_axis(y.reshape(y.shape[0], y.shape[1], -1),
                              idx.reshape(idx.shape[0], idx.shape[1], -1).astype(np.int64),
                              axis=2).reshape(idx.shape)
    np.testing.assert_allclose(y_at[fin], want_h[fin], rtol=rtol, atol=atol)
    # ... and exactly the oracle's where no other candidate comes within rounding of the max.
    finite_vals = np.where(np.isfinite(vals), vals, -np.inf)
    with np.errstate(invalid="ignore"):
        close = np.abs(finite_vals - want_h[None]) <= atol + rtol * np.abs(want_h[None])
    clear = fin & (close.sum(axis=0) == 1)
    exact_tie = fin & (vals == want_h[None]).sum(axis=0).astype(bool)
    np.testing.assert_array_equal(idx[clear], want_idx[clear], err_msg="argmax differs")
    # exact ties in float64 (e.g. all-zero windows) must take the first position.
    if np.dtype(dtype) == np.float64:
        exact = exact_tie & ((vals == want_h[None]).sum(axis=0) > 1)
        np.testing.assert_array_equal(idx[exact], want_idx[exact], err_msg="tie not first")
    # In any dtype, a ReLU window whose every z is negative beyond rounding is an exact tie of
    # zeros, whatever the backend's rounding: the first position must win.
    if leak == 0:
        zero_tie = fin & clearly_negative_windows(x, templates, bias, padding, pool, stride,
                                                  dtype)
        np.testing.assert_array_equal(idx[zero_tie], want_idx[zero_tie],
                                      err_msg="tie of switched-off zeros not first")


def clearly_negative_windows(x, templates, bias, padding, pool, stride, dtype):
    """Windows whose every z is below 0 by more than the dtype's dot-product rounding bound
    ``(taps + 2) * eps * (|b| + sum |w||x|)``, from the float64 oracle."""
    z = naive.correlation_plane(x, templates, bias, padding)
    with np.errstate(invalid="ignore"):
        scale = naive.correlation_plane(np.abs(np.asarray(x, np.float64)),
                                        np.abs(np.asarray(templates, np.float64)),
                                        np.abs(np.asarray(bias, np.float64)), padding)
        taps = np.prod(np.shape(templates)[1:])
        margin = (taps + 2) * np.finfo(dtype).eps * scale
        negative = z < -margin
    cand, _ = window_candidates(negative.astype(np.int8), pool, stride)
    return cand.all(axis=0)


# ---------------------------------------------------------------------------------------------
# matching scenarios shared by every backend's tests. ``match(x, templates, bias, **geometry)``
# runs match_switch_pool on the backend under test, taking and returning host NumPy arrays.


def as_pairs(padding, pool, stride):
    q = pair(pool)
    return pair(padding), q, q if stride is None else pair(stride)


def check_match_geometry(match, rng, dtype, geom):
    """One (N, C, H, W, K, kh, kw, padding, pool, stride, leak) case against both oracles."""
    n, c, h, w, k, kh, kw, padding, pool, stride, leak = geom
    x, templates, bias = random_layer(rng, dtype, n, c, h, w, k, kh, kw)
    got_h, got_idx = match(x, templates, bias, padding=padding, pool=pool, stride=stride,
                           leak=leak)
    p, q, s = as_pairs(padding, pool, stride)
    assert_pooling_matches(got_h, got_idx, x, templates, bias, padding=p, pool=q, stride=s,
                           leak=leak, dtype=dtype)
    if dtype == np.float64:
        want_h, want_idx = naive.match_switch_pool(x, templates, bias, padding, pool, stride, leak)
        np.testing.assert_allclose(got_h, want_h, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(got_idx, want_idx)


def check_match_ties(match, rng, dtype, shape=(2, 2, 7, 6)):
    """Exact ties take the first row-major position; with a leak the largest negative wins."""
    x = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    # all-equal windows: zero templates make z = bias everywhere
    templates = np.zeros((3, c, 2, 2), dtype)
    bias = np.array([0.7, -0.3, 0.0], dtype)
    h, idx = match(x, templates, bias, pool=2, stride=1, leak=0.0)
    want_h, want_idx = naive.match_switch_pool(x, templates, bias, 0, 2, 1, 0.0)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(h, want_h.astype(dtype))
    # all-negative windows with the plain ReLU: every y is 0, the first position wins
    neg = -np.abs(rng.standard_normal((3, c, 2, 2))).astype(dtype)
    minus = np.full(3, -1.0, dtype)
    h, idx = match(np.abs(x), neg, minus, pool=2)
    assert (h == 0).all()
    want = naive.match_switch_pool(np.abs(x), neg, np.full(3, -1.0), 0, 2, None, 0.0)[1]
    np.testing.assert_array_equal(idx, want)
    # ... and with a leak the largest negative value wins instead
    h, idx = match(np.abs(x), neg, minus, pool=2, leak=0.2)
    assert (h < 0).all()
    assert_pooling_matches(h, idx, np.abs(x), neg, minus, pool=(2, 2), leak=0.2, dtype=dtype)


def check_match_nan_and_inf(match, rng, dtype, leak, size=9):
    """NaN, +inf and -inf pixels: exact NaN/inf placement and first-NaN positions."""
    x = rng.standard_normal((2, 2, size, size)).astype(dtype)
    x[0, 1, size // 2, size // 2] = np.nan
    x[1, 0, 0, size - 2] = np.inf
    x[1, 1, size - 1, 0] = -np.inf
    templates = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    bias = rng.standard_normal(3).astype(dtype)
    h, idx = match(x, templates, bias, padding=1, pool=2, stride=1, leak=leak)
    assert np.isnan(h).any() and np.isinf(h).any()
    assert_pooling_matches(h, idx, x, templates, bias, padding=(1, 1), pool=(2, 2),
                           stride=(1, 1), leak=leak, dtype=dtype)
    want_h, want_idx = naive.match_switch_pool(x, templates, bias, 1, 2, 1, leak)
    special = ~np.isfinite(want_h)
    np.testing.assert_array_equal(idx[special], want_idx[special])


# ---------------------------------------------------------------------------------------------
# top-down and M-step scenarios. ``run(op_name, *args, **kwargs)`` calls fastdrmm.ops.<op_name>
# on the backend under test, taking and returning host NumPy arrays (None stays None).


def host_runner(backend):
    """The ``run`` of a host backend (runners.runner, the adapter of the ``run`` fixture)."""
    return runners.runner(backend)


def check_unpool_and_render(run, dtype, geom, code, idx, templates, switches):
    """unpool and render of given latents against the explicit-loop oracles."""
    n, c, h, w, k, kh, kw, padding = geom[:8]
    plane = plane_of(geom)
    rtol, atol = tol(dtype)
    u = run("unpool", code, idx, plane, switches=switches)
    assert u.shape == (n, k, *plane) and u.dtype == dtype
    np.testing.assert_allclose(u, naive.unpool(code, idx, plane, switches), rtol=rtol, atol=atol)
    r = run("render", code, idx, templates, (h, w), padding=padding, switches=switches)
    assert r.shape == (n, c, h, w) and r.dtype == dtype
    want = naive.render(code, idx, templates, (h, w), padding, switches)
    np.testing.assert_allclose(r, want, rtol=rtol, atol=atol * 10)


def check_render_adjoint_of_matching(run, rng, dtype, geom):
    """<match(x) at the fixed latents, code> == <x, render(code)> for a fresh x, both ops on
    the backend under test."""
    _, templates, code, idx, switches = latents(rng, dtype, geom)
    n, c, h, w = geom[:4]
    padding = geom[7]
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    # the linear part of the matching on the whole plane: zero bias, identity switch, no pool
    z, _ = run("match_switch_pool", x, templates, np.zeros(len(templates), dtype),
               padding=padding, pool=1, leak=1.0)
    z_at = np.take_along_axis(z.reshape(*z.shape[:2], -1).astype(np.float64),
                              idx.reshape(*idx.shape[:2], -1).astype(np.int64), axis=2)
    lhs = np.sum(z_at * (code * switches).reshape(*code.shape[:2], -1))
    r = run("render", code, idx, templates, (h, w), padding=padding, switches=switches)
    rhs = np.sum(x.astype(np.float64) * r)
    scale = np.sum(np.abs(z_at)) + 1.0
    assert abs(lhs - rhs) <= (1e-5 if dtype == np.float32 else 1e-12) * scale


def check_template_stats(run, dtype, geom, x, code, idx, switches, *, repeat_exact=True):
    """B, s and G against the oracles; gram=False gives the same B and s (bit for bit unless
    the backend sums collisions with atomics: ``repeat_exact=False``)."""
    k, kh, kw, padding = geom[4], geom[5], geom[6], geom[7]
    big_b, s, big_g = run("template_stats", x, code, idx, (kh, kw), padding=padding,
                          switches=switches)
    want_b, want_s, want_g = naive.template_stats(x, code, idx, (kh, kw), padding, switches)
    assert big_b.shape == (k, x.shape[1], kh, kw) and big_b.dtype == dtype
    assert s.shape == (k,) and s.dtype == dtype
    assert big_g.shape == (k * kh * kw,) * 2 and big_g.dtype == dtype
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(big_b, want_b, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(s, want_s, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(big_g, want_g, rtol=rtol, atol=atol * 10)
    np.testing.assert_array_equal(big_g, big_g.T)
    no_g = run("template_stats", x, code, idx, (kh, kw), padding=padding, switches=switches,
               gram=False)
    assert no_g[2] is None
    if repeat_exact:
        np.testing.assert_array_equal(no_g[0], big_b)
        np.testing.assert_array_equal(no_g[1], s)
    else:
        np.testing.assert_allclose(no_g[0], big_b, rtol=rtol, atol=atol)
        np.testing.assert_allclose(no_g[1], s, rtol=rtol, atol=atol)
