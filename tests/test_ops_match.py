"""match_switch_pool: every host backend x dtype against the oracles."""

import functools

import numpy as np
import pytest

import naive
from checks import (DTYPES, HOST_BACKENDS, assert_pooling_matches, check_match_geometry,
                    check_match_nan_and_inf, check_match_ties, random_layer)
from fastdrmm import ops

# (N, C, H, W, K, kh, kw, padding, pool, stride, leak)
GEOMETRIES = [
    (2, 3, 9, 8, 4, 3, 2, 1, 2, None, 0.0),          # odd sizes, padding, non-square kernel
    (1, 1, 7, 7, 3, 3, 3, 0, 3, 1, 0.0),             # stride < pool: overlapping windows
    (2, 2, 11, 10, 2, 2, 3, 2, 2, 3, 0.1),           # stride > pool: gaps, leaky
    (3, 2, 6, 9, 5, 1, 1, 0, (2, 3), (1, 2), -0.5),  # 1x1 templates, pairs, negative leak
    (1, 4, 5, 5, 2, 5, 5, 0, 1, None, 1.0),          # kernel = whole input, identity switch
    (2, 1, 8, 8, 1, 5, 5, 4, 2, None, 0.0),          # conv-small layer 1 in miniature
    (1, 3, 10, 7, 6, 3, 3, (2, 0), (3, 2), None, 0.0),
]


def host_match(backend):
    return functools.partial(ops.match_switch_pool, backend=backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_matches_naive_oracle(backend, dtype, geom, rng):
    check_match_geometry(host_match(backend), rng, dtype, geom)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_larger_random_layer(backend, dtype, rng):
    """A layer large enough to cross any tiling/blocking boundary of the fast kernels."""
    x, templates, bias = random_layer(rng, dtype, 5, 7, 23, 19, 13, 3, 3)
    got = ops.match_switch_pool(x, templates, bias, padding=2, pool=2, backend=backend)
    assert_pooling_matches(*got, x, templates, bias, padding=(2, 2), pool=(2, 2), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [9, 20, 40, 56, 100])
@pytest.mark.parametrize("width", [30, 13])
def test_every_register_tile(dtype, k, width, rng):
    """Channel counts that give blocks of 1 to 4 vectors (float32 16 lanes, float64 8 on
    AVX-512; 8 and 4 elsewhere), on rows wide enough for tiles of consecutive pixels (one
    base register) and narrow enough for tiles that cross rows (a base per pixel)."""
    x, templates, bias = random_layer(rng, dtype, 2, 3, 9, width, k, 3, 3)
    got = ops.match_switch_pool(x, templates, bias, padding=1, pool=2, backend="cpu")
    assert_pooling_matches(*got, x, templates, bias, padding=(1, 1), pool=(2, 2), dtype=dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_first_position(backend, dtype, rng):
    check_match_ties(host_match(backend), rng, dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_nan_and_inf_propagate(backend, dtype, leak, rng):
    check_match_nan_and_inf(host_match(backend), rng, dtype, leak)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_nan_in_a_template_poisons_its_channel_only(backend, rng):
    x = rng.standard_normal((1, 1, 6, 6))
    templates = rng.standard_normal((2, 1, 3, 3))
    templates[1, 0, 1, 1] = np.nan
    h, idx = ops.match_switch_pool(x, templates, np.zeros(2), pool=2, backend=backend)
    assert np.isfinite(h[:, 0]).all() and np.isnan(h[:, 1]).all()
    assert (idx[:, 1] == naive.match_switch_pool(x, templates, np.zeros(2))[1][:, 1]).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(backend, dtype, rng):
    big = rng.standard_normal((3, 8, 20, 22)).astype(dtype)
    x = big[::2, 1::3, ::2, 1::2]                      # strided view
    t_big = rng.standard_normal((3, 5, 3, 4)).astype(dtype)
    templates = np.moveaxis(t_big, 0, 1)[:, :3]        # (5, 3, 3, 4)... transposed view
    templates = templates.transpose(0, 1, 2, 3)[:, :, :, :3]
    bias = rng.standard_normal(10).astype(dtype)[::2]
    assert not x.flags.c_contiguous and not templates.flags.c_contiguous
    got = ops.match_switch_pool(x, templates, bias, padding=1, pool=2, backend=backend)
    want = ops.match_switch_pool(np.ascontiguousarray(x), np.ascontiguousarray(templates),
                                 np.ascontiguousarray(bias), padding=1, pool=2, backend=backend)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(backend, dtype):
    x = np.zeros((0, 2, 6, 6), dtype)
    h, idx = ops.match_switch_pool(x, np.ones((3, 2, 3, 3), dtype), np.zeros(3, dtype),
                                   backend=backend)
    assert h.shape == (0, 3, 2, 2) and idx.shape == (0, 3, 2, 2)
    assert h.dtype == dtype and idx.dtype == np.int32


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_templates_and_bias_take_the_dtype_of_x(backend, rng):
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    h, _ = ops.match_switch_pool(x, rng.standard_normal((3, 2, 3, 3)), np.zeros(3),
                                 backend=backend)
    assert h.dtype == np.float32


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_deterministic(backend, rng):
    x, templates, bias = random_layer(rng, np.float32, 4, 5, 17, 15, 9, 3, 3)
    a = ops.match_switch_pool(x, templates, bias, padding=1, backend=backend)
    b = ops.match_switch_pool(x, templates, bias, padding=1, backend=backend)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_agrees_with_pytorch(rng):
    """conv2d -> leaky_relu -> max_pool2d(return_indices=True) is the same computation."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, templates, bias = random_layer(rng, np.float64, 3, 4, 13, 12, 6, 3, 3)
    for backend in HOST_BACKENDS:
        h, idx = ops.match_switch_pool(x, templates, bias, padding=1, pool=2, leak=0.1,
                                       backend=backend)
        z = F.conv2d(torch.from_numpy(x), torch.from_numpy(templates), torch.from_numpy(bias),
                     padding=1)
        th, tidx = F.max_pool2d(F.leaky_relu(z, 0.1), 2, return_indices=True)
        np.testing.assert_allclose(h, th.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(idx, tidx.numpy())


# ---------------------------------------------------------------------------------------------
# A bounded campaign: fresh random layers, all four ops on both host backends against the
# explicit-loop float64 oracles of naive.py (never against a backend).

from hypothesis import given, strategies as st  # noqa: E402

from campaign import campaign  # noqa: E402
from checks import assert_same_non_finite, tol  # noqa: E402


def _strided(rng, shape, dtype, strided):
    """A fresh array of ``shape``: a C-contiguous one, or a strided view into a larger one."""
    if not strided:
        return np.empty(shape, dtype)
    big = np.empty((shape[0], shape[1] * 2, shape[2], shape[3] * 2 + 1), dtype)
    return big[:, ::2, :, 1::2]


def _layer(rng, case):
    """x, templates, bias with the case's quirks: values on a coarse grid (exact ties, exact
    zeros, exactly representable sums in float32), a zero template (every window tied), a
    zero block of x, NaN / +-inf pixels."""
    dtype = np.dtype(case["dtype"])
    n, c, h, w, k, kh, kw = (case[key] for key in ("n", "c", "h", "w", "k", "kh", "kw"))
    x = _strided(rng, (n, c, h, w), dtype, case["strided"])
    templates = _strided(rng, (k, c, kh, kw), dtype, case["strided"])
    if case["grid"]:
        x[...] = rng.integers(-3, 4, x.shape) / 2
        templates[...] = rng.integers(-3, 4, templates.shape) / 4
    else:
        x[...] = rng.standard_normal(x.shape)
        templates[...] = rng.standard_normal(templates.shape)
    bias = (rng.integers(-2, 3, k) / 4).astype(dtype)
    if case["zero_template"]:
        templates[rng.integers(k)] = 0
    if case["zero_block"]:
        x[:, :, : h // 2, : w // 2] = 0
    for value in case["specials"]:
        x[rng.integers(n), rng.integers(c), rng.integers(h), rng.integers(w)] = value
    return x, templates, bias


LAYER_CASES = st.fixed_dictionaries({
    "backend": st.sampled_from(HOST_BACKENDS), "dtype": st.sampled_from(["float32", "float64"]),
    "n": st.integers(1, 2), "c": st.integers(1, 3), "h": st.integers(3, 8),
    "w": st.integers(3, 26), "k": st.integers(1, 3), "kh": st.integers(1, 3),
    "kw": st.integers(1, 3), "padding": st.tuples(st.integers(0, 3), st.integers(0, 3)),
    "pool": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "stride": st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),
    "leak": st.sampled_from([0.0, 0.0, 0.2, -0.5]), "grid": st.booleans(),
    "zero_template": st.booleans(), "zero_block": st.booleans(), "strided": st.booleans(),
    "specials": st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), max_size=2),
    "switches": st.sampled_from(["none", "bool", "real"]), "seed": st.integers(0, 2**32 - 1),
})


@campaign(25)
@given(case=LAYER_CASES)
def test_campaign_ops_against_naive(case):
    rng = np.random.default_rng(case["seed"])
    x, templates, bias = _layer(rng, case)
    dtype, backend = np.dtype(case["dtype"]), case["backend"]
    padding, pool, stride, leak = case["padding"], case["pool"], case["stride"], case["leak"]
    plane = (case["h"] + 2 * padding[0] - case["kh"] + 1,
             case["w"] + 2 * padding[1] - case["kw"] + 1)
    if min(plane) < 1 or pool[0] > plane[0] or pool[1] > plane[1]:
        return  # no matching plane for this geometry (the validation tests cover it)
    h, idx = ops.match_switch_pool(x, templates, bias, padding=padding, pool=pool,
                                   stride=stride, leak=leak, backend=backend)
    assert_pooling_matches(h, idx, x, templates, bias, padding=padding, pool=pool,
                           stride=stride, leak=leak, dtype=dtype)
    on = rng.random(idx.shape) < 0.6
    switches = {"none": None, "bool": on,
                "real": on * rng.standard_normal(idx.shape).astype(dtype)}[case["switches"]]
    rtol, atol = tol(dtype)
    got = ops.match_at(x, templates, idx, padding=padding, switches=switches, backend=backend)
    with np.errstate(invalid="ignore"):
        assert_same_non_finite(got, naive.match_at(x, templates, idx, padding, switches),
                               10 * atol)
    if not np.isfinite(x).all():
        return  # codes below come from a finite layer: non-finite ones are judged above
    code = rng.standard_normal(h.shape).astype(dtype)
    u = ops.unpool(code, idx, plane, switches=switches, backend=backend)
    np.testing.assert_allclose(u, naive.unpool(code, idx, plane, switches), rtol=rtol,
                               atol=atol)
    in_hw = (case["h"], case["w"])
    r = ops.render(code, idx, templates, in_hw, padding=padding, switches=switches,
                   backend=backend)
    np.testing.assert_allclose(r, naive.render(code, idx, templates, in_hw, padding, switches),
                               rtol=rtol, atol=10 * atol)
    got_b, got_s, got_g = ops.template_stats(x, code, idx, (case["kh"], case["kw"]),
                                             padding=padding, switches=switches,
                                             backend=backend)
    want = naive.template_stats(x, code, idx, (case["kh"], case["kw"]), padding, switches)
    for g, w in zip((got_b, got_s, got_g), want):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=10 * atol)
