"""unpool and render: every host backend x dtype against the oracles, and the adjoint property."""

import numpy as np
import pytest

import naive

from checks import (DTYPES, HOST_BACKENDS, assert_same_non_finite, check_unpool_and_render,
                    host_runner, tol)
from fastdrmm import ops

# (N, C, H, W, K, kh, kw, padding, pool, stride)
GEOMETRIES = [
    (2, 3, 9, 8, 4, 3, 2, 1, 2, None),
    (1, 2, 7, 7, 3, 3, 3, 0, 3, 1),        # overlapping windows: collisions add
    (2, 2, 11, 10, 2, 2, 3, 2, 2, 3),      # gaps
    (3, 1, 6, 9, 5, 1, 1, 0, (2, 3), (1, 2)),
    (2, 1, 8, 8, 3, 5, 5, 4, 2, None),
    (1, 2, 5, 6, 2, 5, 6, 0, 1, None),     # whole-input templates
    (1, 2, 4, 4, 2, 3, 3, 3, 2, 1),        # padding > kernel - 1
]


def latents(rng, dtype, geom, backend="numpy"):
    """Real latents: the code, argmax and switches of a bottom-up pass."""
    n, c, h, w, k, kh, kw, padding, pool, stride = geom
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    templates = rng.standard_normal((k, c, kh, kw)).astype(dtype)
    code, idx = ops.match_switch_pool(x, templates, rng.standard_normal(k).astype(dtype),
                                      padding=padding, pool=pool, stride=stride, leak=0.3,
                                      backend=backend)
    code = rng.standard_normal(code.shape).astype(dtype)  # any code may be rendered
    switches = rng.random(code.shape) < 0.7
    return x, templates, code, idx, switches


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("use_switches", [False, True])
def test_unpool_and_render_match_naive(backend, dtype, geom, use_switches, rng):
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    check_unpool_and_render(host_runner(backend), dtype, geom, code, idx, templates,
                            switches if use_switches else None)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_unpool_sums_collisions(backend):
    code = np.array([[[[1.0, 2.0, 4.0]]]])
    idx = np.array([[[[1, 1, 3]]]], dtype=np.int32)
    u = ops.unpool(code, idx, (1, 4), backend=backend)
    np.testing.assert_array_equal(u, [[[[0.0, 3.0, 0.0, 4.0]]]])
    u = ops.unpool(code, idx, (1, 4), switches=np.array([[[[True, False, True]]]]),
                   backend=backend)
    np.testing.assert_array_equal(u, [[[[0.0, 1.0, 0.0, 4.0]]]])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_render_is_the_adjoint_of_matching(backend, dtype, geom, rng):
    """<match(x) at the fixed latents, code> == <x, render(code)>, for a fresh x."""
    _, templates, code, idx, switches = latents(rng, dtype, geom)
    n, c, h, w = geom[:4]
    padding = geom[7]
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    # the linear part of the matching on the whole plane: zero bias, identity switch, no pool
    z, _ = ops.match_switch_pool(x, templates, np.zeros(len(templates), dtype), padding=padding,
                                 pool=1, leak=1.0, backend=backend)
    z_at = np.take_along_axis(z.reshape(*z.shape[:2], -1).astype(np.float64),
                              idx.reshape(*idx.shape[:2], -1).astype(np.int64), axis=2)
    lhs = np.sum(z_at * (code * switches).reshape(*code.shape[:2], -1))
    r = ops.render(code, idx, templates, (h, w), padding=padding, switches=switches,
                   backend=backend)
    rhs = np.sum(x.astype(np.float64) * r)
    scale = np.sum(np.abs(z_at)) + 1.0
    assert abs(lhs - rhs) <= (1e-5 if dtype == np.float32 else 1e-12) * scale


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_integer_idx(backend, dtype, rng):
    geom = (2, 3, 9, 8, 4, 3, 2, 1, 2, None)
    _, templates, code, idx, switches = latents(rng, dtype, geom)
    code_nc = np.asfortranarray(code)
    idx_64 = np.asfortranarray(idx.astype(np.int64))
    t_nc = np.ascontiguousarray(templates.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    assert not t_nc.flags.c_contiguous
    got = ops.render(code_nc, idx_64, t_nc, (9, 8), padding=1, switches=switches.astype(np.uint8),
                     backend=backend)
    want = ops.render(code, idx, templates, (9, 8), padding=1, switches=switches, backend=backend)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_nan_in_code_stays_local(backend):
    code = np.zeros((1, 1, 2, 2))
    code[0, 0, 0, 0] = np.nan
    idx = np.array([[[[0, 2], [8, 10]]]], dtype=np.int32)
    r = ops.render(code, idx, np.ones((1, 1, 2, 2)), (5, 5), backend=backend)
    assert np.isnan(r[0, 0, :2, :2]).all()
    assert np.isfinite(r[0, 0, 2:, :]).all() and np.isfinite(r[0, 0, :, 2:]).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(backend, dtype):
    code = np.zeros((0, 3, 2, 2), dtype)
    idx = np.zeros((0, 3, 2, 2), np.int32)
    assert ops.unpool(code, idx, (4, 4), backend=backend).shape == (0, 3, 4, 4)
    r = ops.render(code, idx, np.ones((3, 2, 3, 3), dtype), (6, 6), backend=backend)
    assert r.shape == (0, 2, 6, 6) and r.dtype == dtype


def test_render_agrees_with_pytorch(rng):
    """max_unpool2d -> conv_transpose2d is the same computation (non-overlapping windows)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal((2, 3, 12, 10))
    templates = rng.standard_normal((4, 3, 3, 3))
    code, idx = ops.match_switch_pool(x, templates, np.zeros(4), padding=1, pool=2,
                                      backend="numpy")
    for backend in HOST_BACKENDS:
        r = ops.render(code, idx, templates, (12, 10), padding=1, backend=backend)
        u = F.max_unpool2d(torch.from_numpy(code), torch.from_numpy(idx.astype(np.int64)), 2,
                           output_size=(12, 10))
        want = F.conv_transpose2d(u, torch.from_numpy(templates), padding=1)
        np.testing.assert_allclose(r, want.numpy(), rtol=1e-12, atol=1e-12)


# The cpu backend renders dense codes (pool 1) as one GEMM per tap; these geometries make the
# cost model pick it, and the tests below also force it on the others.
GEMM_GEOMETRIES = GEOMETRIES + [
    (3, 32, 9, 9, 40, 3, 3, 0, 1, None),   # valid, 2 vectors of output channels
    (2, 20, 7, 8, 17, 3, 2, 1, 1, None),   # padded, partial vectors, 1 + 1 vector blocks
    (9, 5, 5, 6, 70, 3, 3, 0, 1, None),    # several samples per group, K not a tile multiple
]


@pytest.fixture(params=["scatter-or-dense", "gemm", "dots"])
def cpu_render_path(request, monkeypatch):
    """Force one of the cpu backend's render paths (the scatter/dense choice by cost, the
    GEMM, or the dot products over the templates)."""
    from fastdrmm.kernels.cpu import rendering

    monkeypatch.setattr(rendering, "_GEMM", request.param == "gemm")
    monkeypatch.setattr(rendering, "_DOTS", request.param == "dots")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEMM_GEOMETRIES + [
    (2, 1, 14, 13, 32, 5, 5, 4, 2, None),  # like conv-small's first layer: C = 1, 5x5, pad 4
    (2, 3, 12, 11, 21, 3, 3, 1, 2, None),  # RGB, K not a whole vector
    (1, 2, 19, 9, 40, 2, 3, 0, 1, None),   # rows not a multiple of the pixel tiles
])
def test_cpu_render_paths_match_naive(cpu_render_path, dtype, geom, rng):
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    check_unpool_and_render(host_runner("cpu"), dtype, geom, code, idx, templates, switches)
    r1 = ops.render(code, idx, templates, geom[2:4], padding=geom[7], switches=switches,
                    backend="cpu")
    r2 = ops.render(code, idx, templates, geom[2:4], padding=geom[7], switches=switches,
                    backend="cpu")
    np.testing.assert_array_equal(r1, r2)


def test_cpu_render_dots_non_finite_code_like_numpy(monkeypatch, rng):
    """The dot-product path computes every (position, tap) term of finite templates: NaN and
    inf in the code spread where their taps land, as in the reference; non-finite templates
    take another path."""
    from fastdrmm.kernels.cpu import rendering

    _, templates, code, idx, switches = latents(rng, np.float64, (2, 2, 9, 8, 3, 3, 2, 1, 2,
                                                                  None))
    code[0, 0, 0, 0] = np.nan
    code[1, 1, -1, -1] = np.inf
    code[1, 2, 0, 1] = -np.inf
    want = ops.render(code, idx, templates, (9, 8), padding=1, switches=switches,
                      backend="numpy")
    monkeypatch.setattr(rendering, "_DOTS", True)
    got = ops.render(code, idx, templates, (9, 8), padding=1, switches=switches,
                     backend="cpu")
    assert_same_non_finite(got, want, 1e-12)
    templates[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="finite templates"):
        ops.render(code, idx, templates, (9, 8), padding=1, switches=switches, backend="cpu")
    monkeypatch.setattr(rendering, "_DOTS", None)  # the automatic choice falls back
    got = ops.render(code, idx, templates, (9, 8), padding=1, switches=switches,
                     backend="cpu")
    want = ops.render(code, idx, templates, (9, 8), padding=1, switches=switches,
                      backend="numpy")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("geom", [(2, 3, 6, 7, 4, 3, 3, 1, 1, None),
                                  (2, 2, 9, 8, 3, 3, 2, 1, 2, None)])
def test_cpu_render_gemm_non_finite_like_numpy(monkeypatch, geom, rng):
    """The GEMM path computes every (position, tap) term: 0 * inf = NaN as in the reference,
    NaN stays where its taps land."""
    from fastdrmm.kernels.cpu import rendering

    monkeypatch.setattr(rendering, "_GEMM", True)
    _, templates, code, idx, switches = latents(rng, np.float64, geom)
    h, w, padding = geom[2], geom[3], geom[7]
    code[0, 0] = 0.0
    code[0, 0, 0, 0] = np.nan
    code[1, 1, -1, -1] = np.inf
    for t in (templates, np.where(np.arange(templates.size).reshape(templates.shape) == 5,
                                  np.inf, templates)):
        got = ops.render(code, idx, t, (h, w), padding=padding, switches=switches, backend="cpu")
        want = ops.render(code, idx, t, (h, w), padding=padding, switches=switches,
                          backend="numpy")
        assert_same_non_finite(got, want, 1e-12)


def poisoned_code(rng, dtype, geom):
    """Latents of a geometry with NaN, +inf and -inf codes (their switches on)."""
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    n, k = code.shape[:2]
    for value in (np.nan, np.inf, -np.inf):
        at = (rng.integers(n), rng.integers(k), rng.integers(code.shape[2]),
              rng.integers(code.shape[3]))
        code[at] = value
        switches[at] = True
    return x, templates, code, idx, switches


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_non_finite_codes_against_naive(backend, dtype, geom, rng):
    """unpool and render of NaN/inf codes: NaN and inf exactly where the loop oracle has them
    (each backend judged on its own, the numpy one included)."""
    _, templates, code, idx, switches = poisoned_code(rng, dtype, geom)
    n, c, h, w, k, kh, kw, padding = geom[:8]
    p = (padding, padding) if np.isscalar(padding) else padding
    plane = (h + 2 * p[0] - kh + 1, w + 2 * p[1] - kw + 1)
    _, atol = tol(dtype)
    with np.errstate(invalid="ignore"):  # inf - inf in the oracle and the numpy backend
        want_u = naive.unpool(code, idx, plane, switches)
        want_r = naive.render(code, idx, templates, (h, w), padding, switches)
        got_u = ops.unpool(code, idx, plane, switches=switches, backend=backend)
        got_r = ops.render(code, idx, templates, (h, w), padding=padding, switches=switches,
                           backend=backend)
    assert_same_non_finite(got_u, want_u, atol)
    assert_same_non_finite(got_r, want_r, 10 * atol)
