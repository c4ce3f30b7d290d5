"""match_at (the matching read at given positions): host backends x dtypes against an
explicit-loop oracle, the full-plane matching, the adjoint of render, and the edge cases."""

import numpy as np
import pytest

import naive
from checks import DTYPES, HOST_BACKENDS, tol
from fastdrmm import ops
from test_ops_render import GEOMETRIES, latents


# the oracle lives in naive.py with the other explicit-loop oracles; re-exported here for the
# device backends' checks (match_at_checks.py)
naive_match_at = naive.match_at


def _check(backend, dtype, x, templates, idx, padding, switches):
    got = ops.match_at(x, templates, idx, padding=padding, switches=switches, backend=backend)
    assert got.shape == idx.shape and got.dtype == dtype
    rtol, atol = tol(dtype)
    want = naive_match_at(x, templates, idx, padding, switches)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * 10)
    return got


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("switch_kind", ["none", "bool", "real"])
def test_matches_naive_oracle(backend, dtype, geom, switch_kind, rng):
    x, templates, code, idx, on = latents(rng, dtype, geom)
    switches = {"none": None, "bool": on,
                "real": on * rng.standard_normal(on.shape).astype(dtype)}[switch_kind]
    _check(backend, dtype, x, templates, idx, geom[7], switches)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
# rows of kw*C values: shorter than a vector, whole vectors, vectors plus a remainder
@pytest.mark.parametrize("c, kw", [(1, 5), (3, 2), (16, 2), (20, 3), (64, 3)])
def test_any_positions_and_row_lengths(backend, dtype, c, kw, rng):
    n, k, h, w, kh, padding = 3, 5, 7, 9, 3, (2, 1)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    templates = rng.standard_normal((k, c, kh, kw)).astype(dtype)
    ho, wo = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    idx = rng.integers(0, ho * wo, (n, k, 3, 4)).astype(np.int32)  # repeats and any order
    idx[0, 0] = ho * wo - 1  # the last position: its patch ends at the buffer's end
    switches = rng.random(idx.shape) < 0.6
    _check(backend, dtype, x, templates, idx, padding, switches)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_is_the_full_matching_gathered(backend, dtype, geom, rng):
    """What the top-down pass's code gradient used to compute: match on the whole plane with
    the identity switch and no bias, read at idx, times the switches."""
    x, templates, _, idx, on = latents(rng, dtype, geom)
    padding = geom[7]
    z, _ = ops.match_switch_pool(x, templates, np.zeros(len(templates), dtype), padding=padding,
                                 pool=1, leak=1.0, backend=backend)
    n, k = idx.shape[:2]
    want = np.take_along_axis(z.reshape(n, k, -1), idx.reshape(n, k, -1).astype(np.intp), 2)
    want = want.reshape(idx.shape) * on
    got = ops.match_at(x, templates, idx, padding=padding, switches=on, backend=backend)
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_is_the_adjoint_of_render(backend, dtype, geom, rng):
    """<render(code), g> = <code, match_at(g)> for the same latents."""
    n, c, h, w, k, kh, kw, padding = geom[:8]
    x, templates, code, idx, on = latents(rng, dtype, geom)
    g = rng.standard_normal((n, c, h, w)).astype(dtype)
    r = ops.render(code, idx, templates, (h, w), padding=padding, switches=on, backend=backend)
    z = ops.match_at(g, templates, idx, padding=padding, switches=on, backend=backend)
    lhs = np.vdot(r.astype(np.float64), g.astype(np.float64))
    rhs = np.vdot(code.astype(np.float64), z.astype(np.float64))
    assert abs(lhs - rhs) <= tol(dtype)[0] * 10 * (1 + abs(lhs))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, kw", [(1, 5), (20, 3)])
def test_nan_and_inf_stay_in_their_patches(backend, dtype, c, kw, rng):
    """A NaN or inf poisons exactly the units whose patch holds it, and only where the switch
    is on; an off switch gives 0 without matching (no 0 * NaN). The scenario is the one the
    GPU backends are held to."""
    from match_at_checks import check_nan_and_inf  # it imports this module's oracle

    def run(name, *args, **kwargs):
        return getattr(ops, name)(*args, backend=backend, **kwargs)

    check_nan_and_inf(run, rng, dtype, c, kw)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_and_ties(backend, dtype, rng):
    """Zero data and zero templates give exact zeros; a unit listed twice (a tie decided
    the same way twice) gets the same value twice."""
    x = np.zeros((2, 3, 6, 6), dtype)
    templates = rng.standard_normal((2, 3, 3, 3)).astype(dtype)
    idx = np.zeros((2, 2, 2, 2), np.int32)
    assert (ops.match_at(x, templates, idx, backend=backend) == 0).all()
    x = rng.standard_normal(x.shape).astype(dtype)
    assert (ops.match_at(x, 0 * templates, idx, backend=backend) == 0).all()
    idx[..., 1] = idx[..., 0] = 7
    got = ops.match_at(x, templates, idx, backend=backend)
    assert (got[..., 0] == got[..., 1]).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(backend, dtype, rng):
    big = rng.standard_normal((3, 8, 20, 22)).astype(dtype)
    x = big[::2, 1::3, ::2, 1::2]                       # (2, 3, 10, 11), strided
    templates = np.moveaxis(rng.standard_normal((3, 4, 3, 2)).astype(dtype), 0, 1)[:, :, :, :]
    templates = templates.transpose(0, 1, 3, 2)         # (4, 3, 2, 3), transposed view
    idx_big = rng.integers(0, 11 * 11, (2, 4, 5, 6)).astype(np.int64)
    idx = idx_big[:, :, ::2, ::2]                        # int64, strided
    switches = (rng.random((2, 4, 6, 6)) < 0.5)[:, :, ::2, 1::2]
    assert not (x.flags.c_contiguous or templates.flags.c_contiguous
                or idx.flags.c_contiguous or switches.flags.c_contiguous)
    got = ops.match_at(x, templates, idx, padding=1, switches=switches, backend=backend)
    want = ops.match_at(*(np.ascontiguousarray(a) for a in (x, templates, idx)), padding=1,
                        switches=np.ascontiguousarray(switches), backend=backend)
    np.testing.assert_array_equal(got, want)
    _check(backend, dtype, x, templates, idx, 1, switches)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_empty_batch_and_dtype(backend, rng):
    got = ops.match_at(np.zeros((0, 2, 6, 6), np.float32), np.ones((3, 2, 3, 3)),
                       np.zeros((0, 3, 2, 2), np.int32), backend=backend)
    assert got.shape == (0, 3, 2, 2) and got.dtype == np.float32


def test_validation():
    x = np.zeros((2, 3, 6, 6))
    templates = np.zeros((4, 3, 3, 3))
    with pytest.raises(ValueError, match="idx must have shape"):
        ops.match_at(x, templates, np.zeros((2, 3, 2, 2), np.int32))
    with pytest.raises(ValueError, match="idx out of range"):
        ops.match_at(x, templates, np.full((2, 4, 2, 2), 16, np.int32))
    with pytest.raises(ValueError, match="idx must be a 4-d array"):
        ops.match_at(x, templates, np.zeros((2, 4, 2), np.int32))
    with pytest.raises(TypeError, match="idx must hold integers"):
        ops.match_at(x, templates, np.zeros((2, 4, 2, 2)))
    with pytest.raises(ValueError, match="switches must have shape"):
        ops.match_at(x, templates, np.zeros((2, 4, 2, 2), np.int32), switches=np.ones(3))
    with pytest.raises(ValueError, match="channels"):
        ops.match_at(x, np.zeros((4, 2, 3, 3)), np.zeros((2, 4, 2, 2), np.int32))
