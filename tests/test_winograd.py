"""The cpu backend's Winograd F(2x2, 3x3) matching kernel against the float64 oracles.

``algorithm="winograd"`` forces the kernel on any 3x3 layer (the automatic choice takes it
only for >= 16 channels and templates), so small layers can test every geometry.
"""

import functools

import numba
import numpy as np
import pytest

import naive
from checks import (DTYPES, assert_pooling_matches, assert_same_non_finite, check_match_geometry,
                    check_match_nan_and_inf, check_template_stats, check_unpool_and_render,
                    host_runner, random_layer)
from cpu_algorithms import force
from fastdrmm import ops
from fastdrmm._validation import match_geometry, units_geometry
from fastdrmm.kernels.cpu import matching, rendering, statistics, winograd
from fastdrmm.kernels.geometry import Geometry


def _contract(x, templates, padding, pool, stride, leak):
    """(geometry, leak): the backend contract's arguments of a pooled matching."""
    return match_geometry(x.shape[2:], templates.shape[2:], padding, pool, stride), leak


def _units(x, templates, idx, padding):
    """The backend contract's geometry of match_at on the positions idx."""
    return units_geometry(x.shape[2:], templates.shape[2:], padding, idx.shape[2:])


@pytest.fixture(autouse=True)
def _winograd_in_the_automatic_choice(monkeypatch):
    # these tests check the Winograd kernels and the rules by which the automatic choice
    # takes them, so the choice may take them here (``winograd.AUTO`` is off by default)
    monkeypatch.setattr(winograd, "AUTO", True)


def _winograd(x, templates, bias, padding=0, pool=2, stride=None, leak=0.0):
    padding = (padding, padding) if np.isscalar(padding) else tuple(padding)
    pool = (pool, pool) if np.isscalar(pool) else tuple(pool)
    stride = pool if stride is None else ((stride, stride) if np.isscalar(stride)
                                          else tuple(stride))
    return matching.match_switch_pool(x, templates, bias,
                                      *_contract(x, templates, padding, pool, stride, leak),
                                      algorithm="winograd")


# (N, C, H, W, K, kh, kw, padding, pool, stride, leak)
GEOMETRIES = [
    (2, 3, 9, 8, 4, 3, 3, 1, 2, None, 0.0),            # odd sizes: a half tile at the edge
    (1, 1, 7, 7, 3, 3, 3, 0, 3, 1, 0.0),               # overlapping windows, odd row starts
    (2, 2, 11, 10, 2, 3, 3, 2, 2, 3, 0.1),             # gaps between windows, leaky
    (3, 2, 6, 9, 5, 3, 3, 0, (2, 3), (1, 2), -0.5),    # pairs, negative leak
    (1, 4, 5, 5, 2, 3, 3, 0, 1, None, 1.0),            # identity switch, 3x3 plane
    (2, 5, 3, 3, 7, 3, 3, 0, 1, None, 0.0),            # a 1x1 plane (one half-used tile)
    (1, 3, 10, 7, 6, 3, 3, (2, 0), (3, 2), None, 0.0),  # asymmetric padding
    (2, 17, 12, 13, 18, 3, 3, 1, 2, None, 0.0),         # channels not a whole vector
    (1, 6, 30, 9, 5, 3, 3, 1, 1, None, 0.0),            # many groups of tile rows
    (2, 4, 16, 16, 8, 3, 3, 2, 2, None, 0.0),           # conv-small layer 3 in miniature
    (7, 16, 8, 8, 40, 3, 3, 0, 1, None, 0.0),           # small plane: samples tiled together
    (7, 6, 6, 7, 20, 3, 3, 1, 2, None, 0.1),            # ... with pooling, 7 = 5 + 2 samples
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_matches_the_oracles(dtype, geom, rng):
    check_match_geometry(_winograd, rng, dtype, geom)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [9, 20, 40, 56, 100])
def test_every_register_tile(dtype, k, rng):
    """Template counts giving channel blocks of 1 to 4 vectors (and a second block)."""
    x, templates, bias = random_layer(rng, dtype, 2, 5, 11, 14, k, 3, 3)
    got = _winograd(x, templates, bias, padding=1, pool=2)
    assert_pooling_matches(*got, x, templates, bias, padding=(1, 1), pool=(2, 2), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_on_small_integers_ties_included(dtype, rng):
    """With integer data every intermediate of the transforms is an integer or a half, so
    the result is exact, and the many exact ties take the first position."""
    x = rng.integers(-1, 2, size=(3, 4, 9, 10)).astype(dtype)
    templates = rng.integers(-1, 2, size=(6, 4, 3, 3)).astype(dtype)
    bias = rng.integers(-2, 3, size=6).astype(dtype)
    for pool, stride, leak in [(2, None, 0.0), (3, 1, 0.0), (2, None, 0.5), (1, None, 0.0)]:
        h, idx = _winograd(x, templates, bias, padding=1, pool=pool, stride=stride, leak=leak)
        want_h, want_idx = naive.match_switch_pool(x.astype(np.float64),
                                                   templates.astype(np.float64),
                                                   bias.astype(np.float64), 1, pool, stride,
                                                   leak)
        np.testing.assert_array_equal(h, want_h.astype(dtype))
        np.testing.assert_array_equal(idx, want_idx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_nan_and_inf_are_redone_by_the_direct_kernel(dtype, leak, rng):
    check_match_nan_and_inf(_winograd, rng, dtype, leak)


def test_only_the_samples_with_non_finite_values_are_redone(rng):
    x, templates, bias = random_layer(rng, np.float32, 4, 3, 9, 9, 5, 3, 3)
    x[2, 1, 4, 4] = np.nan
    x[3, 0, 0, 0] = -np.inf
    geometry = ((1, 1), (2, 2), (2, 2), 0.0)
    h, idx = matching.match_switch_pool(x, templates, bias, *_contract(x, templates, *geometry),
                                        algorithm="winograd")
    wh, widx, redo = winograd.match_switch_pool(x, templates, bias,
                                                *_contract(x, templates, *geometry))
    dh, didx = matching.match_switch_pool(x, templates, bias,
                                          *_contract(x, templates, *geometry), algorithm="direct")
    np.testing.assert_array_equal(redo, [0, 0, 1, 1])
    np.testing.assert_array_equal(h[:2], wh[:2])        # Winograd's own results kept ...
    np.testing.assert_array_equal(idx[:2], widx[:2])
    np.testing.assert_array_equal(h[2:], dh[2:])        # ... the others are the direct ones
    np.testing.assert_array_equal(idx[2:], didx[2:])


def test_overflow_in_the_transforms_is_redone():
    """Finite inputs whose transforms overflow (3e38 - (-3e38)) while the direct sums do not:
    every sample is redone, so the result is the direct kernel's, finite."""
    rng = np.random.default_rng(5)
    x, templates, bias = random_layer(rng, np.float32, 2, 2, 6, 6, 3, 3, 3)
    x[:, :, 0, 0], x[:, :, 2, 0] = 3e38, -3e38
    templates *= np.float32(1e-3)
    geometry = ((0, 0), (2, 2), (2, 2), 0.0)
    run = functools.partial(matching.match_switch_pool, x, templates, bias,
                            *_contract(x, templates, *geometry))
    got, want = run(algorithm="winograd"), run(algorithm="direct")
    assert np.isfinite(want[0]).all()
    assert winograd.match_switch_pool(x, templates, bias,
                                      *_contract(x, templates, *geometry))[2].all()
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_a_nan_template_poisons_its_channel_only(rng):
    x = rng.standard_normal((2, 3, 8, 8))
    templates = rng.standard_normal((4, 3, 3, 3))
    templates[1, 2, 0, 1] = np.nan
    h, idx = _winograd(x, templates, np.zeros(4), padding=1, pool=2)
    assert np.isfinite(h[:, [0, 2, 3]]).all() and np.isnan(h[:, 1]).all()
    want_idx = naive.match_switch_pool(x, templates, np.zeros(4), 1, 2, None, 0.0)[1]
    np.testing.assert_array_equal(idx[:, 1], want_idx[:, 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, rng):
    big = rng.standard_normal((4, 40, 20, 22)).astype(dtype)
    x = big[::2, 1::2, ::2, 1::2]
    templates = np.moveaxis(rng.standard_normal((20, 16, 3, 3)).astype(dtype), 0, 1)
    bias = rng.standard_normal(32).astype(dtype)[::2]
    assert not (x.flags.c_contiguous or templates.flags.c_contiguous or bias.flags.c_contiguous)
    got = _winograd(x, templates, bias, padding=1)
    want = _winograd(np.ascontiguousarray(x), np.ascontiguousarray(templates),
                     np.ascontiguousarray(bias), padding=1)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_the_same_for_any_thread_count(rng):
    x, templates, bias = random_layer(rng, np.float32, 5, 16, 14, 14, 40, 3, 3)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _winograd(x, templates, bias, padding=2)
        numba.set_num_threads(before)
        many = _winograd(x, templates, bias, padding=2)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_samples_tiled_together_give_the_same_bits(dtype, rng):
    """Each tile's products do not depend on which tiles share the micro-kernel call, so any
    number of samples per work item gives the same result, bit for bit."""
    x, templates, bias = random_layer(rng, dtype, 7, 16, 8, 8, 40, 3, 3)
    geometry = _contract(x, templates, (0, 0), (1, 1), (1, 1), 0.0)
    results = []
    for spi in (1, 2, 3, 5, 7):
        h, idx, redo = winograd.match_switch_pool(x, templates, bias, *geometry,
                                                  samples_per_item=spi)
        assert not redo.any()
        results.append((h, idx))
    for h, idx in results[1:]:
        np.testing.assert_array_equal(h, results[0][0])
        np.testing.assert_array_equal(idx, results[0][1])


def test_empty_batch():
    h, idx = _winograd(np.zeros((0, 2, 6, 6), np.float32), np.ones((3, 2, 3, 3), np.float32),
                       np.zeros(3, np.float32))
    assert h.shape == idx.shape == (0, 3, 2, 2)


def test_the_automatic_choice(rng):
    """Winograd for 3x3 layers with >= 16 channels and templates and finite parameters."""
    x, templates, bias = random_layer(rng, np.float32, 2, 16, 10, 10, 16, 3, 3)
    assert winograd.applies(templates, bias, (8, 8))
    geometry = _contract(x, templates, (1, 1), (2, 2), (2, 2), 0.0)
    assert matching.plan_match_switch_pool(x, templates, bias, geometry[0]) == "winograd"
    auto = matching.match_switch_pool(x, templates, bias, *geometry)
    forced = _winograd(x, templates, bias, padding=1)
    np.testing.assert_array_equal(auto[0], forced[0])
    np.testing.assert_array_equal(auto[1], forced[1])
    assert not winograd.applies(templates[:, :8], bias, (8, 8))          # too few channels
    assert not winograd.applies(templates[:8], bias[:8], (8, 8))         # too few templates
    assert not winograd.applies(np.zeros((16, 16, 5, 5)), bias, (6, 6))  # not 3x3
    poisoned = templates.copy()
    poisoned[0, 0, 0, 0] = np.inf
    assert not winograd.applies(poisoned, bias, (8, 8))
    # planes where the 2x2 blocks save products: 5x5 (9 blocks, 144 vs 225), not 1x1 or
    # 1x7 (4 half-used blocks, 64 vs 63)
    assert winograd.applies(templates, bias, (5, 5))
    assert not winograd.applies(templates, bias, (1, 1))
    assert not winograd.applies(templates, bias, (1, 7))
    assert winograd.applies(templates, bias, (3, 9))   # 3x9 padded by 1: a 3x9 plane


def test_bad_algorithm_arguments(rng):
    x, templates, bias = random_layer(rng, np.float32, 1, 2, 6, 6, 2, 2, 2)
    geometry = _contract(x, templates, (0, 0), (1, 1), (1, 1), 0.0)
    with pytest.raises(ValueError, match="algorithm"):
        matching.match_switch_pool(x, templates, bias, *geometry, algorithm="fft")
    with pytest.raises(ValueError, match="3x3"):
        matching.match_switch_pool(x, templates, bias, *geometry, algorithm="winograd")
    with pytest.raises(ValueError, match="2x2 windows at stride 2"):
        matching.match_switch_pool(x, templates, bias, *geometry, algorithm="pooled_rows")


@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_the_direct_kernel_on_a_preset_layer(dtype, rng):
    """conv-small's pooled 64-channel layer at a small batch: the two kernels differ by
    rounding only."""
    x, templates, bias = random_layer(rng, dtype, 3, 64, 14, 14, 64, 3, 3)
    templates *= dtype(1 / 24)  # unit-scale z, as in a trained layer
    run = functools.partial(matching.match_switch_pool, x, templates, bias,
                            *_contract(x, templates, (2, 2), (2, 2), (2, 2), 0.0))
    got, want = run(algorithm="winograd"), run(algorithm="direct")
    assert_pooling_matches(*got, x, templates, bias, padding=(2, 2), pool=(2, 2), dtype=dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=rtol)


# ---------------------------------------------------------------------------------------------
# render: the transposed correlation of the unpooled code, by the same kernel

# (N, C, H, W, K, kh, kw, padding, pool, stride)
RENDER_GEOMETRIES = [
    (2, 3, 9, 8, 4, 3, 3, 1, 2, None),        # odd sizes
    (1, 2, 7, 7, 3, 3, 3, 0, 3, 1),           # overlapping windows: collisions add
    (2, 2, 11, 10, 2, 3, 3, 2, 2, 3),         # gaps
    (2, 17, 8, 9, 20, 3, 3, 1, 1, None),      # dense code, partial vectors
    (3, 4, 6, 5, 40, 3, 3, (0, 2), (2, 1), None),
    (2, 16, 14, 14, 16, 3, 3, 2, 2, None),    # conv-small layer 3 in miniature
]


@pytest.fixture
def winograd_render(monkeypatch):
    force(monkeypatch, "render", "winograd")


def _latents(rng, dtype, geom):
    n, c, h, w, k, kh, kw, padding, pool, stride = geom
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    templates = rng.standard_normal((k, c, kh, kw)).astype(dtype)
    _, idx = ops.match_switch_pool(x, templates, np.zeros(k, dtype), padding=padding, pool=pool,
                                   stride=stride, backend="numpy")
    code = rng.standard_normal(idx.shape).astype(dtype)
    switches = rng.random(idx.shape) < 0.7
    return templates, code, idx, switches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
@pytest.mark.parametrize("use_switches", [False, True])
def test_render_matches_the_oracle(winograd_render, dtype, geom, use_switches, rng):
    templates, code, idx, switches = _latents(rng, dtype, geom)
    padding = (geom[7],) * 2 if np.isscalar(geom[7]) else geom[7]
    assert winograd.render_applies(templates, padding, any_size=True)
    check_unpool_and_render(host_runner("cpu"), dtype, geom, code, idx, templates,
                            switches if use_switches else None)


def test_render_non_finite_values_are_redone(winograd_render, rng):
    """NaN/inf in the code (and 0 * inf from a template) land where the reference puts
    them: the flagged samples are rendered again by the exact paths."""
    geom = (3, 3, 8, 9, 4, 3, 3, 1, 2, None)
    templates, code, idx, switches = _latents(rng, np.float64, geom)
    code[0, 0, 0, 0] = np.nan
    code[1, 1, -1, -1] = np.inf
    inf_template = templates.copy()
    inf_template[2, 1, 0, 2] = np.inf
    for t in (templates, inf_template):
        got = ops.render(code, idx, t, (8, 9), padding=1, switches=switches, backend="cpu")
        want = ops.render(code, idx, t, (8, 9), padding=1, switches=switches, backend="numpy")
        assert_same_non_finite(got, want, 1e-12)


def test_render_automatic_choice():
    """3x3 layers with >= 16 channels both sides and finite templates take the Winograd
    kernel, dense codes only where it saves products; fewer channels, other template sizes
    and padding > 2 do not."""
    def takes(code, t, input_hw, padding):
        geometry = units_geometry(input_hw, t.shape[2:], padding, code.shape[2:])
        return rendering.plan_render(code, None, t, geometry, None) == "winograd"

    t = np.zeros((16, 16, 3, 3), np.float32)
    code = np.zeros((1, 16, 4, 4), np.float32)              # pooled: the plane is 8x8
    assert takes(code, t, (8, 8), (1, 1))
    assert not takes(code[:0], t, (8, 8), (1, 1))
    assert not takes(code, t[:8], (8, 8), (1, 1))
    assert not takes(code, t[:, :8], (8, 8), (1, 1))
    assert not takes(code, t, (4, 4), (3, 3))
    assert not takes(code, np.zeros((16, 16, 5, 5)), (10, 10), (1, 1))
    assert not takes(code, np.full((16, 16, 3, 3), np.inf), (8, 8), (1, 1))
    # dense codes: 14x14 -> 16x16 saves products (1024 vs 1764), 5x5 -> 7x7 does not
    assert takes(np.zeros((1, 16, 14, 14)), t, (16, 16), (0, 0))
    assert not takes(np.zeros((1, 16, 5, 5)), t, (7, 7), (0, 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_switches", [False, True])
def test_render_dense_code_with_other_positions_is_redone(winograd_render, dtype,
                                                          use_switches, rng):
    """A dense code (one unit per plane position) normally has the identity as argmax
    positions, and is copied, not scattered; where a sample's positions differ it is
    rendered again by the exact paths. Sample 1 differs in one unit inside a register
    block, sample 2 in one unit of the scalar rest (the last channel)."""
    geom = (4, 20, 9, 11, 18, 3, 3, 1, 1, None)   # 18 = 16 + 2: a vector block and a tail
    templates, code, idx, switches = _latents(rng, dtype, geom)
    idx = idx.copy()
    idx[1, 3, 0, 2] = 7          # a collision with position 7
    idx[2, 17, 5, 4] = 0
    got = ops.render(code, idx, templates, (9, 11), padding=1,
                     switches=switches if use_switches else None, backend="cpu")
    want = naive.render(code, idx, templates, (9, 11), 1, switches if use_switches else None)
    rtol, atol = (2e-4, 2e-3) if dtype == np.float32 else (1e-10, 1e-9)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    flipped = np.ascontiguousarray(templates[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    # the render's correlation: the unpooled 9x11 plane at padding 2 - 1 onto the 9x11 image
    geometry = Geometry((9, 11), (3, 3), (1, 1), (9, 11), (1, 1), (1, 1), (9, 11))
    redo = winograd._correlate(code, flipped, np.zeros(20, dtype), geometry, 1.0, False,
                               code_idx=idx,
                               code_sw=switches.astype(dtype) if use_switches else None)[2]
    np.testing.assert_array_equal(redo, [0, 1, 1, 0])


# ---------------------------------------------------------------------------------------------
# match_at: the whole plane by the same kernel, read at the given positions


def _winograd_match_at(x, templates, idx, padding=0, switches=None):
    """``ops.match_at``'s conversions, then the cpu kernel with Winograd forced."""
    x = np.ascontiguousarray(x)
    templates = np.ascontiguousarray(templates, x.dtype)
    padding = (padding, padding) if np.isscalar(padding) else tuple(padding)
    switches = None if switches is None else np.ascontiguousarray(switches, x.dtype)
    idx = np.ascontiguousarray(idx, np.int32)
    return matching.match_at(x, templates, idx, _units(x, templates, idx, padding), switches,
                             algorithm="winograd")


def _match_at_runner(name, *args, **kwargs):
    assert name == "match_at"
    return _winograd_match_at(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
@pytest.mark.parametrize("switch_kind", ["none", "bool", "real"])
def test_match_at_matches_the_oracle(dtype, geom, switch_kind, rng):
    from match_at_checks import check_geometry

    check_geometry(_match_at_runner, rng, dtype, geom, switch_kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [3, 20])
def test_match_at_any_positions(dtype, c, rng):
    """Positions anywhere on the plane (not in any window), repeated, the plane's corners."""
    from match_at_checks import check_any_positions

    check_any_positions(_match_at_runner, rng, dtype, c, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_match_at_non_finite_values_are_redone(dtype, rng):
    """A NaN or inf anywhere on a sample's plane sends the sample to the unit-by-unit kernel:
    poisoned exactly where the switch is on and the patch holds it, 0 where it is off."""
    from match_at_checks import check_nan_and_inf

    check_nan_and_inf(_match_at_runner, rng, dtype, 20, 3)
    x = rng.standard_normal((3, 16, 6, 7)).astype(dtype)
    x[1, 5, 0, 6] = np.inf
    templates = rng.standard_normal((16, 16, 3, 3)).astype(dtype)
    idx = np.zeros((3, 16, 1, 1), np.int32)   # the unit reads a position far from the inf
    _, redo = winograd.match_at(x, templates, idx, _units(x, templates, idx, (1, 1)), None)
    np.testing.assert_array_equal(redo, [0, 1, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_match_at_agrees_with_the_unit_kernel(dtype, rng):
    """conv-small's pooled 64-channel layer at a small batch, its real argmax positions: the
    two kernels differ by rounding only; exactly on small integers, and exactly 0 (not -0)
    where a switch is off."""
    x, templates, bias = random_layer(rng, dtype, 3, 64, 14, 14, 64, 3, 3)
    _, idx = matching.match_switch_pool(x, templates, bias,
                                        *_contract(x, templates, (2, 2), (2, 2), (2, 2), 0.0))
    switches = (rng.random(idx.shape) < 0.8).astype(dtype)
    run = functools.partial(matching.match_at, x, templates, idx,
                            _units(x, templates, idx, (2, 2)), switches)
    rtol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(run(algorithm="winograd"), run(algorithm="units"), rtol=rtol,
                               atol=rtol * float(np.abs(run(algorithm="units")).max()))
    x = rng.integers(-3, 4, x.shape).astype(dtype)
    templates = rng.integers(-3, 4, templates.shape).astype(dtype)
    got = matching.match_at(x, templates, idx, _units(x, templates, idx, (2, 2)), switches,
                             algorithm="winograd")
    want = matching.match_at(x, templates, idx, _units(x, templates, idx, (2, 2)), switches,
                             algorithm="units")
    np.testing.assert_array_equal(got, want)
    off = switches == 0
    assert (got[off] == 0).all() and not np.signbit(got[off]).any()


def test_match_at_automatic_choice(rng):
    """Winograd where enough of the plane is read, on layers where it applies."""
    x, templates, bias = random_layer(rng, np.float32, 2, 16, 10, 10, 16, 3, 3)
    plane_units = 2 * 16 * 10 * 10          # padding 1: a 10 x 10 plane
    assert winograd.match_at_applies(2, templates, (10, 10), plane_units // 4)
    assert not winograd.match_at_applies(2, templates, (10, 10), plane_units // 25)
    assert not winograd.match_at_applies(2, templates[:, :8], (10, 10), plane_units)
    poisoned = templates.copy()
    poisoned[0, 0, 0, 0] = np.nan
    assert not winograd.match_at_applies(2, poisoned, (10, 10), plane_units)


def test_match_at_bad_algorithm_arguments(rng):
    x, templates, bias = random_layer(rng, np.float32, 1, 2, 6, 6, 2, 2, 2)
    idx = np.zeros((1, 2, 2, 2), np.int32)
    with pytest.raises(ValueError, match="algorithm"):
        matching.match_at(x, templates, idx, _units(x, templates, idx, (0, 0)), None,
                          algorithm="fft")
    with pytest.raises(ValueError, match="3x3"):
        matching.match_at(x, templates, idx, _units(x, templates, idx, (0, 0)), None,
                          algorithm="winograd")


# ---------------------------------------------------------------------------------------------
# template_stats: B and s by F(3x3, 2x2), the same transforms turned around


@pytest.fixture
def winograd_stats(monkeypatch):
    force(monkeypatch, "template_stats", "winograd")


STATS_GEOMETRIES = RENDER_GEOMETRIES + [
    (5, 16, 6, 6, 20, 3, 3, 0, 1, None),      # small plane: several samples per product call
]


def _finish_in_numpy(mpart, spart, k, c):
    """The partial sums added in chunk order in float64, then G^T M G by whole-array
    expressions: the reduction the compiled ``_finish`` replaces."""
    msum = mpart[0].astype(np.float64)
    s = spart[0].astype(np.float64)
    for i in range(1, mpart.shape[0]):
        msum += mpart[i]
        s += spart[i]
    m = msum[:, :k, :c].reshape(4, 4, k, c)

    def gt(a0, a1, a2, a3):
        return a0 + 0.5 * (a1 + a2), 0.5 * (a1 - a2), 0.5 * (a1 + a2) + a3

    rows = gt(m[0], m[1], m[2], m[3])
    big_b = np.stack([np.stack(gt(r[0], r[1], r[2], r[3])) for r in rows])
    return big_b.transpose(2, 3, 0, 1).astype(mpart.dtype), s.astype(mpart.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nch, k, c", [(1, 3, 5), (4, 20, 17), (3, 64, 32)])
def test_stats_finish_is_the_numpy_reduction_bit_for_bit(dtype, nch, k, c, rng):
    from fastdrmm.kernels.cpu import winograd_stats

    mpart = (rng.standard_normal((nch, 16, k + 9, c + 3)) * 10.0 ** rng.integers(
        -3, 4, (nch, 16, k + 9, c + 3))).astype(dtype)
    spart = rng.standard_normal((nch, k)).astype(dtype)
    mpart[0, 5, 1, 2] = np.nan
    big_b = np.empty((k, c, 3, 3), dtype)
    s = np.empty(k, dtype)
    winograd_stats._finish(mpart, spart, big_b, s)
    want_b, want_s = _finish_in_numpy(mpart, spart, k, c)
    np.testing.assert_array_equal(big_b, want_b)
    np.testing.assert_array_equal(s, want_s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", STATS_GEOMETRIES)
@pytest.mark.parametrize("use_switches", [False, True])
def test_stats_match_the_oracle(winograd_stats, dtype, geom, use_switches, rng):
    n, c, h, w = geom[:4]
    templates, code, idx, switches = _latents(rng, dtype, geom)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    check_template_stats(host_runner("cpu"), dtype, geom, x, code, idx,
                         switches if use_switches else None)


def test_stats_the_same_for_any_thread_count(winograd_stats, rng):
    geom = (9, 16, 10, 10, 20, 3, 3, 0, 1, None)
    _, code, idx, switches = _latents(rng, np.float32, geom)
    x = rng.standard_normal((9, 16, 10, 10)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = ops.template_stats(x, code, idx, (3, 3), switches=switches, gram=False,
                                 backend="cpu")
    finally:
        numba.set_num_threads(before)
    many = ops.template_stats(x, code, idx, (3, 3), switches=switches, gram=False,
                              backend="cpu")
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


@pytest.mark.parametrize("where", ["x", "code", "position"])
def test_stats_left_out_samples_are_added_exactly(winograd_stats, where, rng):
    """Samples with NaN/inf (in x or the code) or a dense code whose argmax positions are not
    the identity are left out by the Winograd kernel and added by the exact ones: NaN and inf
    land as in the numpy backend."""
    from fastdrmm.kernels.cpu import winograd_stats as ws

    geom = (4, 16, 8, 9, 18, 3, 3, 1, 1, None)
    _, code, idx, switches = _latents(rng, np.float64, geom)
    x = rng.standard_normal((4, 16, 8, 9))
    code, idx = code.copy(), idx.copy()
    if where == "x":
        x[1, 2, 3, 4], x[2, 0, 0, 0] = np.nan, np.inf
    elif where == "code":
        code[1, 5, 2, 2], code[2, 17, 7, 8] = np.inf, -np.inf
    else:
        idx[1, 3, 0, 2] = 7
        idx[2, 17, 5, 4] = 0
    got = ops.template_stats(x, code, idx, (3, 3), padding=1, switches=switches, gram=False,
                             backend="cpu")
    with np.errstate(invalid="ignore"):  # the float64 reference: 0 * inf = NaN, on purpose
        want = ops.template_stats(x, code, idx, (3, 3), padding=1, switches=switches,
                                  gram=False, backend="numpy")
    for g, w in zip(got[:2], want[:2]):
        assert_same_non_finite(g, w, 1e-10)
    geometry = units_geometry(x.shape[2:], (3, 3), (1, 1), code.shape[2:])
    redo = ws.template_stats_bs(x, code, idx, geometry, switches.astype(np.float64))[2]
    np.testing.assert_array_equal(redo, [0, 1, 1, 0])


def test_stats_automatic_choice():
    """Unpooled 3x3 layers with >= 16 channels and templates; pooled ones keep the sparse
    kernel."""
    def takes(x, code, kernel):
        geometry = units_geometry(x.shape[2:], kernel, (0, 0), code.shape[2:])
        return statistics.plan_template_stats(x, code, None, geometry, None) == "winograd"

    x = np.zeros((1, 16, 8, 8), np.float32)
    dense, pooled = np.zeros((1, 16, 6, 6), np.float32), np.zeros((1, 16, 3, 3), np.float32)
    assert takes(x, dense, (3, 3))
    assert not takes(x, pooled, (3, 3))
    assert not takes(x[:, :8], dense, (3, 3))
    assert not takes(x, dense[:, :8], (3, 3))
    assert not takes(x, np.zeros((1, 16, 4, 4), np.float32), (5, 5))
    thin = np.zeros((1, 16, 3, 7), np.float32)                       # a 1x5 plane
    assert not takes(thin, np.zeros((1, 16, 1, 5), np.float32), (3, 3))
