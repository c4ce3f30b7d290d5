"""match_switch_pool: every backend x dtype against the oracles."""

import functools

import numpy as np
import pytest
from hypothesis import given

import naive
import runners
from campaign import campaign
from checks import (DTYPES, assert_pooling_matches, assert_same_non_finite, check_match_geometry,
                    check_match_nan_and_inf, check_match_ties, tol)
from fastdrmm import ops
from scenarios import LAYER_CASES, MATCH_GEOMETRIES, layer_of, random_layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", MATCH_GEOMETRIES)
def test_matches_naive_oracle(run, dtype, geom, rng):
    check_match_geometry(functools.partial(run, "match_switch_pool"), rng, dtype, geom)


@runners.all_but_the_simulator("a minute for this layer")
@pytest.mark.parametrize("dtype", DTYPES)
def test_larger_random_layer(run, dtype, rng):
    """A layer large enough to cross any tiling/blocking boundary of the fast kernels."""
    x, templates, bias = random_layer(rng, dtype, 5, 7, 23, 19, 13, 3, 3)
    got = run("match_switch_pool", x, templates, bias, padding=2, pool=2)
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_first_position(run, dtype, rng):
    check_match_ties(functools.partial(run, "match_switch_pool"), rng, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_nan_and_inf_propagate(run, dtype, leak, rng):
    check_match_nan_and_inf(functools.partial(run, "match_switch_pool"), rng, dtype, leak)


def test_nan_in_a_template_poisons_its_channel_only(run, rng):
    x = rng.standard_normal((1, 1, 6, 6))
    templates = rng.standard_normal((2, 1, 3, 3))
    templates[1, 0, 1, 1] = np.nan
    h, idx = run("match_switch_pool", x, templates, np.zeros(2), pool=2)
    assert np.isfinite(h[:, 0]).all() and np.isnan(h[:, 1]).all()
    assert (idx[:, 1] == naive.match_switch_pool(x, templates, np.zeros(2))[1][:, 1]).all()


@runners.only(runners.HOST_ARRAYS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(run, dtype, rng):
    big = rng.standard_normal((3, 8, 20, 22)).astype(dtype)
    x = big[::2, 1::3, ::2, 1::2]                      # strided view
    t_big = rng.standard_normal((3, 5, 3, 4)).astype(dtype)
    templates = np.moveaxis(t_big, 0, 1)[:, :3]        # (5, 3, 3, 4)... transposed view
    templates = templates.transpose(0, 1, 2, 3)[:, :, :, :3]
    bias = rng.standard_normal(10).astype(dtype)[::2]
    assert not x.flags.c_contiguous and not templates.flags.c_contiguous
    got = run("match_switch_pool", x, templates, bias, padding=1, pool=2)
    want = run("match_switch_pool", np.ascontiguousarray(x), np.ascontiguousarray(templates),
               np.ascontiguousarray(bias), padding=1, pool=2)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(run, dtype):
    x = np.zeros((0, 2, 6, 6), dtype)
    h, idx = run("match_switch_pool", x, np.ones((3, 2, 3, 3), dtype), np.zeros(3, dtype))
    assert h.shape == (0, 3, 2, 2) and idx.shape == (0, 3, 2, 2)
    assert h.dtype == dtype and idx.dtype == np.int32


def test_templates_and_bias_take_the_dtype_of_x(run, rng):
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    h, _ = run("match_switch_pool", x, rng.standard_normal((3, 2, 3, 3)), np.zeros(3))
    assert h.dtype == np.float32


@runners.only(runners.HOST_ARRAYS)
def test_deterministic(run, rng):
    x, templates, bias = random_layer(rng, np.float32, 4, 5, 17, 15, 9, 3, 3)
    a = run("match_switch_pool", x, templates, bias, padding=1)
    b = run("match_switch_pool", x, templates, bias, padding=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@runners.only(runners.HOST_ARRAYS)
def test_agrees_with_pytorch(run, rng):
    """conv2d -> leaky_relu -> max_pool2d(return_indices=True) is the same computation."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, templates, bias = random_layer(rng, np.float64, 3, 4, 13, 12, 6, 3, 3)
    h, idx = run("match_switch_pool", x, templates, bias, padding=1, pool=2, leak=0.1)
    z = F.conv2d(torch.from_numpy(x), torch.from_numpy(templates), torch.from_numpy(bias),
                 padding=1)
    th, tidx = F.max_pool2d(F.leaky_relu(z, 0.1), 2, return_indices=True)
    np.testing.assert_allclose(h, th.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(idx, tidx.numpy())


# ---------------------------------------------------------------------------------------------
# A bounded campaign: fresh random layers, all five ops on both host backends against the
# explicit-loop float64 oracles of naive.py (never against a backend).


@campaign(25)
@given(case=LAYER_CASES)
def test_campaign_ops_against_naive(case):
    rng = np.random.default_rng(case["seed"])
    x, templates, bias = layer_of(rng, case)
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
