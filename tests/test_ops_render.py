"""unpool and render: every backend x dtype against the oracles, and the adjoint property."""

import numpy as np
import pytest

import naive
import runners
from checks import (DTYPES, assert_same_non_finite, check_render_adjoint_of_matching,
                    check_unpool_and_render, tol)
from cpu_algorithms import force
from fastdrmm import ops
from scenarios import (CONV_GEOMETRIES, GEMM_GEOMETRIES, RENDER_GEOMETRIES, latents, plane_of,
                       poisoned_code)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
@pytest.mark.parametrize("use_switches", [False, True])
def test_unpool_and_render_match_naive(run, dtype, geom, use_switches, rng):
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    check_unpool_and_render(run, dtype, geom, code, idx, templates,
                            switches if use_switches else None)


def test_unpool_sums_collisions(run):
    code = np.array([[[[1.0, 2.0, 4.0]]]])
    idx = np.array([[[[1, 1, 3]]]], dtype=np.int32)
    u = run("unpool", code, idx, (1, 4))
    np.testing.assert_array_equal(u, [[[[0.0, 3.0, 0.0, 4.0]]]])
    u = run("unpool", code, idx, (1, 4), switches=np.array([[[[True, False, True]]]]))
    np.testing.assert_array_equal(u, [[[[0.0, 1.0, 0.0, 4.0]]]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
def test_render_is_the_adjoint_of_matching(run, dtype, geom, rng):
    check_render_adjoint_of_matching(run, rng, dtype, geom)


@runners.only(runners.HOST_ARRAYS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_integer_idx(run, dtype, rng):
    geom = RENDER_GEOMETRIES[0]
    _, templates, code, idx, switches = latents(rng, dtype, geom)
    code_nc = np.asfortranarray(code)
    idx_64 = np.asfortranarray(idx.astype(np.int64))
    t_nc = np.ascontiguousarray(templates.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    assert not t_nc.flags.c_contiguous
    got = run("render", code_nc, idx_64, t_nc, (9, 8), padding=1,
              switches=switches.astype(np.uint8))
    want = run("render", code, idx, templates, (9, 8), padding=1, switches=switches)
    np.testing.assert_array_equal(got, want)


def test_nan_in_code_stays_local(run):
    code = np.zeros((1, 1, 2, 2))
    code[0, 0, 0, 0] = np.nan
    idx = np.array([[[[0, 2], [8, 10]]]], dtype=np.int32)
    r = run("render", code, idx, np.ones((1, 1, 2, 2)), (5, 5))
    assert np.isnan(r[0, 0, :2, :2]).all()
    assert np.isfinite(r[0, 0, 2:, :]).all() and np.isfinite(r[0, 0, :, 2:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(run, dtype):
    code = np.zeros((0, 3, 2, 2), dtype)
    idx = np.zeros((0, 3, 2, 2), np.int32)
    assert run("unpool", code, idx, (4, 4)).shape == (0, 3, 4, 4)
    r = run("render", code, idx, np.ones((3, 2, 3, 3), dtype), (6, 6))
    assert r.shape == (0, 2, 6, 6) and r.dtype == dtype


@runners.only(runners.HOST_ARRAYS)
def test_render_agrees_with_pytorch(run, rng):
    """max_unpool2d -> conv_transpose2d is the same computation (non-overlapping windows)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal((2, 3, 12, 10))
    templates = rng.standard_normal((4, 3, 3, 3))
    code, idx = ops.match_switch_pool(x, templates, np.zeros(4), padding=1, pool=2,
                                      backend="numpy")
    r = run("render", code, idx, templates, (12, 10), padding=1)
    u = F.max_unpool2d(torch.from_numpy(code), torch.from_numpy(idx.astype(np.int64)), 2,
                       output_size=(12, 10))
    want = F.conv_transpose2d(u, torch.from_numpy(templates), padding=1)
    np.testing.assert_allclose(r, want.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
def test_non_finite_codes_against_naive(run, dtype, geom, rng):
    """unpool and render of NaN/inf codes: NaN and inf exactly where the loop oracle has them
    (each backend judged on its own, the numpy one included)."""
    _, templates, code, idx, switches = poisoned_code(rng, dtype, geom)
    h, w, padding = geom[2], geom[3], geom[7]
    plane = plane_of(geom)
    _, atol = tol(dtype)
    with np.errstate(invalid="ignore"):  # inf - inf in the oracle and the numpy backend
        want_u = naive.unpool(code, idx, plane, switches)
        want_r = naive.render(code, idx, templates, (h, w), padding, switches)
        got_u = run("unpool", code, idx, plane, switches=switches)
        got_r = run("render", code, idx, templates, (h, w), padding=padding, switches=switches)
    assert_same_non_finite(got_u, want_u, atol)
    assert_same_non_finite(got_r, want_r, 10 * atol)


# ---------------------------------------------------------------------------------------------
# The cpu backend's render paths, each forced.


@pytest.fixture(params=["scatter", "conv", "gemm", "dots"])
def cpu_render_path(request, monkeypatch):
    """Force one of the cpu backend's render algorithms on any geometry (Winograd, 3x3 only,
    has its own tests)."""
    force(monkeypatch, "render", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEMM_GEOMETRIES + CONV_GEOMETRIES + [
    (1, 2, 19, 9, 40, 2, 3, 0, 1, None),   # rows not a multiple of the pixel tiles
])
def test_cpu_render_paths_match_naive(cpu_render_path, dtype, geom, rng):
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    check_unpool_and_render(runners.runner("cpu"), dtype, geom, code, idx, templates, switches)
    r1 = ops.render(code, idx, templates, geom[2:4], padding=geom[7], switches=switches,
                    backend="cpu")
    r2 = ops.render(code, idx, templates, geom[2:4], padding=geom[7], switches=switches,
                    backend="cpu")
    np.testing.assert_array_equal(r1, r2)


def test_cpu_render_dots_non_finite_code_like_numpy(monkeypatch, rng):
    """The dot-product path computes every (position, tap) term of finite templates: NaN and
    inf in the code spread where their taps land, as in the reference; non-finite templates
    take another path."""
    _, templates, code, idx, switches = latents(rng, np.float64, (2, 2, 9, 8, 3, 3, 2, 1, 2,
                                                                  None))
    code[0, 0, 0, 0] = np.nan
    code[1, 1, -1, -1] = np.inf
    code[1, 2, 0, 1] = -np.inf
    want = ops.render(code, idx, templates, (9, 8), padding=1, switches=switches,
                      backend="numpy")
    force(monkeypatch, "render", "dots")
    got = ops.render(code, idx, templates, (9, 8), padding=1, switches=switches,
                     backend="cpu")
    assert_same_non_finite(got, want, 1e-12)
    templates[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="finite templates"):
        ops.render(code, idx, templates, (9, 8), padding=1, switches=switches, backend="cpu")
    monkeypatch.undo()  # the automatic choice falls back
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
    force(monkeypatch, "render", "gemm")
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
