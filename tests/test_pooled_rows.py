"""The pooled-rows matching kernel (few channels, 2x2 windows at stride 2): bit for bit the
direct kernel's h and idx, and the float64 oracle's."""

import numpy as np
import pytest

from checks import DTYPES, assert_pooling_matches, random_layer
from cpu_algorithms import force
from fastdrmm import ops
from fastdrmm._validation import match_geometry
from fastdrmm.kernels.cpu import matching, pooled_rows
from fastdrmm.kernels.cpu._vector import lanes


def both_kernels(monkeypatch, x, templates, bias, padding, leak):
    """(h, idx) of the pooled-rows kernel and of the direct kernel, and a spy's count of
    pooled-rows calls (so a test cannot pass by never running it)."""
    calls = []
    real = pooled_rows.match_switch_pool

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(pooled_rows, "match_switch_pool", spy)
    force(monkeypatch, "match_switch_pool", "pooled_rows")
    rows = ops.match_switch_pool(x, templates, bias, padding=padding, pool=2, leak=leak,
                                 backend="cpu")
    assert calls, "the pooled-rows kernel did not run"
    force(monkeypatch, "match_switch_pool", "direct")
    direct = ops.match_switch_pool(x, templates, bias, padding=padding, pool=2, leak=leak,
                                   backend="cpu")
    assert len(calls) == 1
    return rows, direct


def assert_same_bits(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))


# (N, C, H, W, K, kh, kw, padding): pooled widths below, at and past one vector (float32 16,
# float64 8 lanes on AVX-512), odd planes (a row and a column left over), K not a multiple
# of the register tile's templates
GEOMETRIES = [
    (3, 1, 28, 28, 32, 5, 5, 4),      # conv-small's layer 1: 16 x 16 pooled, one vector
    (2, 1, 9, 9, 5, 3, 3, 1),         # 4 x 4 pooled
    (2, 3, 32, 32, 7, 3, 3, 1),       # cifar-like, 16 x 16
    (2, 2, 23, 45, 3, 2, 3, (0, 2)),  # 11 x 23 pooled: a vector and a tail; odd plane
    (1, 1, 12, 70, 9, 1, 1, 0),       # 1x1 templates, 35 pooled columns
    (2, 4, 10, 19, 1, 4, 2, (1, 0)),  # one template
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("leak", [0.0, 0.1, -0.5])
def test_same_bits_as_the_direct_kernel_and_the_oracle(monkeypatch, dtype, geom, leak, rng):
    n, c, hh, ww, k, kh, kw, padding = geom
    x, templates, bias = random_layer(rng, dtype, n, c, hh, ww, k, kh, kw)
    rows, direct = both_kernels(monkeypatch, x, templates, bias, padding, leak)
    assert_same_bits(rows, direct)
    pads = (padding, padding) if np.isscalar(padding) else padding
    assert_pooling_matches(*rows, x, templates, bias, padding=pads, pool=(2, 2), leak=leak,
                           dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leak", [0.0, 0.2])
def test_nan_and_inf(monkeypatch, dtype, leak, rng):
    """NaN and +-inf pixels and a NaN template: the same NaN/inf placement and first-NaN
    positions as the direct kernel, bit for bit."""
    x, templates, bias = random_layer(rng, dtype, 3, 2, 20, 37, 6, 3, 3)
    x[0, 1, 7, 8] = np.nan
    x[0, 0, 7, 9] = np.nan
    x[1, 0, 0, 30] = np.inf
    x[1, 1, 19, 0] = -np.inf
    x[2, 0, 5, 5] = np.inf
    x[2, 1, 5, 6] = -np.inf          # inf - inf: NaN
    templates[4, 1, 2, 2] = np.nan
    rows, direct = both_kernels(monkeypatch, x, templates, bias, 1, leak)
    assert np.isnan(rows[0]).any() and np.isinf(rows[0]).any()
    assert_same_bits(rows, direct)
    assert_pooling_matches(*rows, x, templates, bias, padding=(1, 1), pool=(2, 2), leak=leak,
                           dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_first_position(monkeypatch, dtype, rng):
    """Exact ties (zero templates: z = bias everywhere; integer data) keep the first window
    position in row-major order."""
    x = rng.integers(-3, 4, size=(2, 1, 14, 40)).astype(dtype)
    templates = np.zeros((5, 1, 3, 3), dtype)
    templates[3] = rng.integers(-2, 3, size=(1, 3, 3))
    bias = np.array([0.5, -0.25, 0.0, 0.0, 1.0], dtype)
    for leak in (0.0, 0.5):
        rows, direct = both_kernels(monkeypatch, x, templates, bias, 1, leak)
        assert_same_bits(rows, direct)
        h, idx = rows
        wo = 40
        first = (2 * np.arange(7)[:, None] * wo + 2 * np.arange(20)[None, :])
        for kk in (0, 1, 2, 4):      # every window all equal
            np.testing.assert_array_equal(idx[:, kk], np.broadcast_to(first, idx[:, kk].shape))
        assert_pooling_matches(h, idx, x, templates, bias, padding=(1, 1), pool=(2, 2),
                               leak=leak, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input(dtype, rng):
    """A strided x straight into the kernels (the ops layer would have made it contiguous):
    the same bits as the direct kernel and as the contiguous copy."""
    x, templates, bias = random_layer(rng, dtype, 4, 2, 24, 60, 5, 3, 3)
    view = x[::2, :, :, ::2]
    assert not view.flags.c_contiguous
    got = {}
    for algorithm, data in (("pooled_rows", view), ("direct", view),
                            ("pooled_rows", np.ascontiguousarray(view))):
        got[algorithm, data is view] = matching.match_switch_pool(
            data, templates, bias,
            match_geometry(data.shape[2:], templates.shape[2:], (1, 1), (2, 2), (2, 2)), 0.0,
            algorithm=algorithm)
    assert_same_bits(got["pooled_rows", True], got["direct", True])
    assert_same_bits(got["pooled_rows", True], got["pooled_rows", False])


@pytest.mark.parametrize("dtype", DTYPES)
def test_where_it_applies(dtype):
    vl = lanes(dtype)
    assert pooled_rows.applies(1, (2, 2), (2, 2), vl, dtype)
    assert pooled_rows.applies(vl - 1, (2, 2), (2, 2), 2 * vl, dtype)
    assert not pooled_rows.applies(vl, (2, 2), (2, 2), vl, dtype)        # channels: direct
    assert not pooled_rows.applies(1, (2, 2), (2, 2), vl // 2, dtype)    # half the lanes idle
    assert not pooled_rows.applies(1, (3, 3), (3, 3), vl, dtype)
    assert not pooled_rows.applies(1, (2, 2), (1, 1), vl, dtype)
    assert not pooled_rows.applies(1, (2, 2), (2, 2), 0, dtype)
    assert pooled_rows.applies(vl, (2, 2), (2, 2), 1, dtype, any_shape=True)


def test_conv_small_layer_one_takes_it(monkeypatch, rng):
    """The default dispatch sends MNIST's first layer here."""
    calls = []
    real = pooled_rows.match_switch_pool
    monkeypatch.setattr(pooled_rows, "match_switch_pool",
                        lambda *a: calls.append(1) or real(*a))
    x, templates, bias = random_layer(rng, np.float32, 2, 1, 28, 28, 32, 5, 5)
    geometry = match_geometry(x.shape[2:], templates.shape[2:], (4, 4), (2, 2), (2, 2))
    assert matching.plan_match_switch_pool(x, templates, bias, geometry) == "pooled_rows"
    ops.match_switch_pool(x, templates, bias, padding=4, pool=2, backend="cpu")
    assert calls


def _layer_one_variant(rng, variant, n=3):
    """conv-small's layer 1 (1 -> 32, 5x5, padding 4, pool 2) with templates and bias of
    several scales: small templates with a zero bias once measured 4x slower than the rest."""
    x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    std, bias_std = {"std0.1_zero_bias": (0.1, 0.0), "std0.2_zero_bias": (0.2, 0.0),
                     "std0.1_small_bias": (0.1, 1e-3), "subnormal_x": (0.1, 0.0)}[variant]
    if variant == "subnormal_x":
        x *= np.float32(1e-38)  # subnormal inputs and products throughout
    templates = (std * rng.standard_normal((32, 1, 5, 5))).astype(np.float32)
    bias = (bias_std * rng.standard_normal(32)).astype(np.float32)
    return x, templates, bias


@pytest.mark.parametrize("variant", ["std0.1_zero_bias", "std0.2_zero_bias", "std0.1_small_bias",
                                     "subnormal_x"])
def test_layer_one_never_falls_back_whatever_the_values(monkeypatch, rng, variant):
    """The fast path's choice depends on shapes only: for every value scale the default
    dispatch runs the pooled-rows kernel once and never the direct kernel (a data-dependent
    fallback would show here as a direct-kernel call), with the direct kernel's bits."""
    x, templates, bias = _layer_one_variant(rng, variant)
    rows_calls, direct_calls = [], []
    real_rows, real_direct = pooled_rows.match_switch_pool, matching._match_planes
    monkeypatch.setattr(pooled_rows, "match_switch_pool",
                        lambda *a: rows_calls.append(1) or real_rows(*a))
    monkeypatch.setattr(matching, "_match_planes",
                        lambda *a: direct_calls.append(1) or real_direct(*a))
    got = ops.match_switch_pool(x, templates, bias, padding=4, pool=2, backend="cpu")
    assert len(rows_calls) == 1 and not direct_calls
    force(monkeypatch, "match_switch_pool", "direct")
    want = ops.match_switch_pool(x, templates, bias, padding=4, pool=2, backend="cpu")
    assert len(direct_calls) == 1
    assert_same_bits(got, want)
    if variant != "subnormal_x":
        assert_pooling_matches(*got, x, templates, bias, padding=(4, 4), pool=(2, 2),
                               dtype=np.float32)
