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
