"""template_stats: B, s and G on every backend against the oracles, and the least-squares
properties."""

import numpy as np
import pytest

import naive
import runners
from checks import DTYPES, assert_same_non_finite, check_template_stats, tol
from cpu_algorithms import force
from fastdrmm import ops
from scenarios import CONV_GEOMETRIES, GEMM_GEOMETRIES, RENDER_GEOMETRIES, latents, poisoned_code

# G takes a block per upper-triangle entry: a minute per layer on the CUDA simulator
WITH_G = runners.all_but_the_simulator("G of these layers takes minutes")


@WITH_G
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
@pytest.mark.parametrize("use_switches", [False, True])
def test_stats_match_naive(backend, run, dtype, geom, use_switches, rng):
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    check_template_stats(run, dtype, geom, x, code, idx, switches if use_switches else None,
                         repeat_exact=backend not in runners.ATOMIC)


@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
def test_b_is_the_template_gradient(run, geom, rng):
    """<U, correlate(x, W)> is linear in W with gradient B: check value and a finite difference."""
    x, templates, code, idx, switches = latents(rng, np.float64, geom)
    padding = geom[7]
    big_b, _, _ = run("template_stats", x, code, idx, templates.shape[2:], padding=padding,
                      switches=switches, gram=False)

    def objective(w):
        z, _ = run("match_switch_pool", x, w, np.zeros(len(w)), padding=padding, pool=1,
                   leak=1.0)
        u = run("unpool", code, idx, z.shape[2:], switches=switches)
        return np.sum(u * z)

    w = rng.standard_normal(templates.shape)
    assert objective(w) == pytest.approx(np.sum(big_b * w), rel=1e-10, abs=1e-10)
    step = np.zeros_like(w)
    step[-1, 0, -1, 0] = 1e-3
    fd = (objective(w + step) - objective(w - step)) / 2e-3
    assert fd == pytest.approx(big_b[-1, 0, -1, 0], rel=1e-6, abs=1e-8)


@WITH_G
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding,pool,stride", [(0, 2, None), (2, 2, None), (1, 3, 2)])
def test_least_squares_recovers_planted_templates(run, dtype, padding, pool, stride, rng):
    """Render images from known templates; solve(G + ridge*I, B) gives the templates back."""
    k, c, kh, kw, h, w = 3, 2, 3, 3, 10, 9
    planted = rng.standard_normal((k, c, kh, kw))
    probe = rng.standard_normal((40, c, h, w))
    code, idx = ops.match_switch_pool(probe, rng.standard_normal((k, c, kh, kw)), np.zeros(k),
                                      padding=padding, pool=pool, stride=stride, backend="numpy")
    code = rng.random(code.shape) + 0.5
    images = ops.render(code, idx, planted, (h, w), padding=padding, backend="numpy")
    big_b, _, big_g = run("template_stats", images.astype(dtype), code.astype(dtype), idx,
                          (kh, kw), padding=padding)
    rhs = big_b.astype(np.float64).transpose(0, 2, 3, 1).reshape(k * kh * kw, c)
    fit = np.linalg.solve(big_g.astype(np.float64) + 1e-10 * np.eye(k * kh * kw), rhs)
    fit = fit.reshape(k, kh, kw, c).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(fit, planted, rtol=1e-3 if dtype == np.float32 else 1e-7,
                               atol=1e-3 if dtype == np.float32 else 1e-7)


@runners.only(runners.HOST_ARRAYS)
def test_code_dtype_follows_x_and_views_work(run, rng):
    x, templates, code, idx, switches = latents(rng, np.float64, RENDER_GEOMETRIES[0])
    x32 = x.astype(np.float32)
    got = run("template_stats", np.asfortranarray(x32), code[:, ::-1][:, ::-1], idx, (3, 2),
              padding=1, switches=switches)
    assert got[0].dtype == np.float32 and got[2].dtype == np.float32
    want = run("template_stats", x32, code.astype(np.float32), idx, (3, 2), padding=1,
               switches=switches)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(run, dtype):
    x = np.zeros((0, 2, 6, 6), dtype)
    code = np.zeros((0, 3, 2, 2), dtype)
    big_b, s, big_g = run("template_stats", x, code, np.zeros(code.shape, np.int32), (3, 3))
    assert not big_b.any() and not s.any() and not big_g.any()
    assert big_b.shape == (3, 2, 3, 3) and big_g.shape == (27, 27)


@runners.only(runners.HOST)
def test_deterministic(run, rng):
    x, _, code, idx, switches = latents(rng, np.float32, (6, 4, 15, 13, 5, 3, 3, 1, 2, None))
    a = run("template_stats", x, code, idx, (3, 3), padding=1, switches=switches)
    b = run("template_stats", x, code, idx, (3, 3), padding=1, switches=switches)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


@runners.only(runners.HOST_ARRAYS)
def test_b_agrees_with_pytorch_weight_gradient(run, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 2, 11, 9))
    code, idx = ops.match_switch_pool(x, rng.standard_normal((4, 2, 3, 3)), np.zeros(4),
                                      padding=1, pool=2, backend="numpy")
    u = ops.unpool(code, idx, (11, 9), backend="numpy")
    want = torch.nn.grad.conv2d_weight(torch.from_numpy(x), (4, 2, 3, 3), torch.from_numpy(u),
                                       padding=1)
    big_b = run("template_stats", x, code, idx, (3, 3), padding=1, gram=False)[0]
    np.testing.assert_allclose(big_b, want.numpy(), rtol=1e-12, atol=1e-12)


def test_nan_in_x_reaches_b_on_every_path(run, rng):
    """A NaN pixel poisons B through 0 * NaN even where the code is zero, for whole-input
    templates (the matrix-product path) as for sliding ones."""
    for shape, kernel in [((3, 1, 4, 4), (4, 4)), ((3, 1, 6, 6), (3, 3))]:
        x = rng.standard_normal(shape)
        x[1, 0, 2, 2] = np.nan
        plane = (shape[2] - kernel[0] + 1, shape[3] - kernel[1] + 1)
        code = np.zeros((3, 2, 1, 1))
        code[0] = 1.0
        idx = np.zeros(code.shape, np.int32)
        big_b = run("template_stats", x, code, idx, kernel, gram=False)[0]
        want = naive.template_stats(x, code, idx, kernel)[0]
        np.testing.assert_array_equal(np.isnan(big_b), np.isnan(want))
        assert np.isnan(big_b).any(), plane


@pytest.fixture(params=["sparse", "gemm", "kvec"])
def cpu_stats_path(request, monkeypatch):
    """Force one of the cpu backend's B kernels: sparse units, GEMM over C, or vectors over K
    (Winograd, 3x3 only, has its own tests)."""
    force(monkeypatch, "template_stats", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEMM_GEOMETRIES + CONV_GEOMETRIES + [
    (1, 7, 9, 9, 70, 2, 3, 0, 1, None),    # several template blocks, taps not a tile multiple
    (2, 1, 10, 10, 100, 3, 3, 1, 2, None),  # template blocks with different tile sizes
])
def test_cpu_stats_paths_match_naive(cpu_stats_path, dtype, geom, rng):
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    if cpu_stats_path == "sparse" and geom in GEMM_GEOMETRIES:
        # G too (one kernel whatever the B path), where the naive G is quick
        check_template_stats(runners.runner("cpu"), dtype, geom, x, code, idx, switches)
    else:
        big_b, s, _ = ops.template_stats(x, code, idx, (geom[5], geom[6]), padding=geom[7],
                                         switches=switches, gram=False, backend="cpu")
        want_b, want_s = naive.template_bs(x, code, idx, (geom[5], geom[6]), geom[7], switches)
        rtol, atol = tol(dtype)
        assert big_b.dtype == dtype and s.dtype == dtype
        np.testing.assert_allclose(big_b, want_b, rtol=rtol, atol=atol * 10)
        np.testing.assert_allclose(s, want_s, rtol=rtol, atol=atol * 10)
    a = ops.template_stats(x, code, idx, (geom[5], geom[6]), padding=geom[7],
                           switches=switches, gram=False, backend="cpu")
    b = ops.template_stats(x, code, idx, (geom[5], geom[6]), padding=geom[7],
                           switches=switches, gram=False, backend="cpu")
    for p, q in zip(a[:2], b[:2]):
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("path", ["gemm", "kvec"])
def test_cpu_stats_dense_paths_non_finite_like_numpy(monkeypatch, path, rng):
    """The GEMM and k-vector kernels compute every (position, tap) term: 0 * inf = NaN as in
    the reference."""
    force(monkeypatch, "template_stats", path)
    x, _, code, idx, switches = latents(rng, np.float64, (3, 2, 7, 6, 3, 3, 3, 1, 1, None))
    x[1, 0, 2, 2] = np.nan
    x[2, 1, 0, 0] = np.inf
    code[0, 1, 1, 1] = np.inf
    got = ops.template_stats(x, code, idx, (3, 3), padding=1, switches=switches, gram=False,
                             backend="cpu")
    with np.errstate(invalid="ignore"):  # the reference's own 0 * inf
        want = ops.template_stats(x, code, idx, (3, 3), padding=1, switches=switches,
                                  gram=False, backend="numpy")
    for g, w in zip(got[:2], want[:2]):
        assert_same_non_finite(g, w, 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
def test_non_finite_b_and_s_against_naive(run, dtype, geom, rng):
    """B and s with NaN/inf codes and pixels: NaN and inf exactly where the loop oracle has
    them (each backend judged on its own, the numpy one included)."""
    x, _, code, idx, switches = poisoned_code(rng, dtype, geom)
    x[0, 0, 0, 0] = np.nan
    x[-1, -1, -1, -1] = np.inf
    x[0, -1, x.shape[2] // 2, 0] = -np.inf
    kernel = geom[5:7]
    _, atol = tol(dtype)
    with np.errstate(invalid="ignore"):
        want_b, want_s = naive.template_bs(x, code, idx, kernel, geom[7], switches)
        got_b, got_s, _ = run("template_stats", x, code, idx, kernel, padding=geom[7],
                              switches=switches, gram=False)
    assert_same_non_finite(got_b, want_b, 10 * atol)
    assert_same_non_finite(got_s, want_s, 10 * atol)
