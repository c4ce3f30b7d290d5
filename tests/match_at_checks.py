"""match_at checks that every backend is held to (test_ops_match_at.py on each backend of the
``run`` fixture; test_numba_cuda.py, test_cuda_c.py and test_winograd.py on theirs).
``run(op_name, *args, **kwargs)`` calls fastdrmm.ops.<op_name> on the backend under test,
taking and returning host NumPy arrays; the oracle is the explicit-loop ``naive.match_at``; the
inputs come from ``scenarios``."""

import numpy as np

import naive
from checks import tol
from scenarios import latents, switches_of


def check_match_at(run, dtype, x, templates, idx, padding, switches):
    """One call against the oracle: shape, dtype, values, and exact zeros where switched off."""
    got = run("match_at", x, templates, idx, padding=padding, switches=switches)
    assert got.shape == idx.shape and got.dtype == dtype
    rtol, atol = tol(dtype)
    want = naive.match_at(x, templates, idx, padding, switches)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * 10)
    if switches is not None:
        off = np.asarray(switches) == 0
        assert (got[off] == 0).all() and not np.signbit(got[off]).any()
    return got


def check_geometry(run, rng, dtype, geom, switch_kind):
    """Real latents (the argmax of a bottom-up pass) of one geometry, fresh random data."""
    x, templates, _, idx, on = latents(rng, dtype, geom)
    switches = switches_of(switch_kind, rng, on, dtype)
    check_match_at(run, dtype, x, templates, idx, geom[7], switches)


def check_any_positions(run, rng, dtype, c, kw, size=(3, 5, 7, 9)):
    """Positions in any order with repeats, odd sizes, the plane's last position, asymmetric
    padding."""
    n, k, h, w = size
    kh, padding = 3, (2, 1)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    templates = rng.standard_normal((k, c, kh, kw)).astype(dtype)
    ho, wo = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    idx = rng.integers(0, ho * wo, (n, k, 3, 5)).astype(np.int32)
    idx[0, 0] = ho * wo - 1  # the last position: its patch ends at the padded corner
    idx[-1, -1, 0] = 0       # the first one: its patch starts in the padding
    switches = rng.random(idx.shape) < 0.6
    check_match_at(run, dtype, x, templates, idx, padding, switches)


def check_nan_and_inf(run, rng, dtype, c, kw, size=(2, 4, 8, 9)):
    """A NaN or inf poisons exactly the switched-on units whose patch holds it; a switched-off
    unit gives 0 without matching (no 0 * NaN)."""
    n, k, h, w = size
    kh = 3
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    x[0, c - 1, 3, 4] = np.nan
    x[1, 0, 5, 2] = np.inf
    templates = np.abs(rng.standard_normal((k, c, kh, kw))).astype(dtype) + 0.1  # no inf - inf
    ho, wo = h + 2 - kh + 1, w + 2 - kw + 1
    idx = np.broadcast_to(np.arange(ho * wo, dtype=np.int32).reshape(ho, wo), (n, k, ho, wo))
    switches = rng.random(idx.shape) < 0.5
    got = check_match_at(run, dtype, x, templates, idx, 1, switches)
    assert np.isnan(got[0]).any() and np.isinf(got[1]).any()
    # every unit is listed once, so each of the two samples' poisoned units are exactly those
    # whose patch covers the bad pixel and whose switch is on
    top = np.arange(ho)[:, None] - 1   # padding 1: the patch of (i, j) starts at x[i-1, j-1]
    left = np.arange(wo)[None, :] - 1
    for sample, (r, col) in ((0, (3, 4)), (1, (5, 2))):
        covers = (top <= r) & (r < top + kh) & (left <= col) & (col < left + kw)
        bad = ~np.isfinite(got[sample])
        np.testing.assert_array_equal(bad, covers[None] & switches[sample])


def check_zeros_and_ties(run, rng, dtype):
    """Zero data or zero templates give exact zeros; a position listed twice (a tie decided
    the same way twice) gets the same value twice, bit for bit."""
    x = np.zeros((2, 3, 6, 7), dtype)
    templates = rng.standard_normal((2, 3, 3, 3)).astype(dtype)
    idx = np.zeros((2, 2, 2, 3), np.int32)
    assert (run("match_at", x, templates, idx) == 0).all()
    x = rng.standard_normal(x.shape).astype(dtype)
    assert (run("match_at", x, 0 * templates, idx) == 0).all()
    idx[..., 2] = idx[..., 1] = idx[..., 0] = 7
    got = run("match_at", x, templates, idx, switches=np.ones(idx.shape, bool))
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    got = check_match_at(run, dtype, x, templates, idx, 0, None)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def check_non_contiguous(run, rng, dtype):
    """Strided x, a transposed view of the templates, strided int64 idx and bool switches (the
    ops layer makes contiguous copies); equal to the contiguous call and to the oracle."""
    big = rng.standard_normal((3, 8, 20, 22)).astype(dtype)
    x = big[::2, 1::3, ::2, 1::2]                # (2, 3, 10, 11): an 11 x 11 plane at padding 1
    templates = rng.standard_normal((4, 3, 3, 2)).astype(dtype).transpose(0, 1, 3, 2)
    idx = rng.integers(0, 11 * 11, (2, 4, 5, 6)).astype(np.int64)[:, :, ::2, ::2]
    switches = (rng.random((2, 4, 6, 6)) < 0.5)[:, :, ::2, 1::2]
    assert not (x.flags.c_contiguous or templates.flags.c_contiguous
                or idx.flags.c_contiguous or switches.flags.c_contiguous)
    got = check_match_at(run, dtype, x, templates, idx, 1, switches)
    want = run("match_at", *(np.ascontiguousarray(a) for a in (x, templates, idx)), padding=1,
               switches=np.ascontiguousarray(switches))
    np.testing.assert_array_equal(got, want)


def check_adjoint_of_render(run, rng, dtype, geom):
    """<render(code), g> = <code, match_at(g)> for the same latents, both on the backend."""
    n, c, h, w, k, kh, kw, padding = geom[:8]
    _, templates, code, idx, on = latents(rng, dtype, geom)
    g = rng.standard_normal((n, c, h, w)).astype(dtype)
    r = run("render", code, idx, templates, (h, w), padding=padding, switches=on)
    z = run("match_at", g, templates, idx, padding=padding, switches=on)
    lhs = np.vdot(r.astype(np.float64), g.astype(np.float64))
    rhs = np.vdot(code.astype(np.float64), z.astype(np.float64))
    assert abs(lhs - rhs) <= tol(dtype)[0] * 10 * (1 + abs(lhs))


def check_full_matching_gathered(run, rng, dtype, geom):
    """The whole-plane matching of the same backend (identity switch, no bias), read at idx."""
    x, templates, _, idx, on = latents(rng, dtype, geom)
    padding = geom[7]
    z, _ = run("match_switch_pool", x, templates, np.zeros(len(templates), dtype),
               padding=padding, pool=1, leak=1.0)
    n, k = idx.shape[:2]
    want = np.take_along_axis(z.reshape(n, k, -1), idx.reshape(n, k, -1).astype(np.intp), 2)
    got = run("match_at", x, templates, idx, padding=padding, switches=on)
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(got, want.reshape(idx.shape) * on, rtol=rtol, atol=atol * 10)
