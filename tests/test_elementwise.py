"""The element-wise glue kernels against the NumPy expressions they replace."""

import numba
import numpy as np
import pytest

from checks import DTYPES
from fastdrmm import _elementwise
from fastdrmm.kernels.cpu import elementwise
from scenarios import special

SIZES = [1, 7, 16, 17, 1000, 12345]


@pytest.fixture(params=["kernels", "fallback"])
def glue(request, monkeypatch):
    """The dispatching module, through the Numba kernels or through the NumPy fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(_elementwise, "_host_kernels", lambda *arrays: None)
    return _elementwise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_sum_squares(glue, dtype, n, rng):
    a = rng.standard_normal(n).astype(dtype)
    want = np.sum(a.astype(np.float64) ** 2)
    assert glue.sum_squares(a) == pytest.approx(want, rel=1e-12)
    neg = np.minimum(a, 0).astype(np.float64)
    assert glue.negative_sum_squares(a) == pytest.approx(np.sum(neg ** 2), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.uint64, np.bool_])
@pytest.mark.parametrize("n", SIZES)
def test_sum_squares_of_integers_and_bools(glue, dtype, n, rng):
    """Every element converted to float64 first, as np.float64(value) does."""
    if dtype == np.bool_:
        a = rng.random(n) < 0.4
    else:
        info = np.iinfo(dtype)
        a = rng.integers(max(info.min, -2**40), min(info.max, 2**40), n, dtype=dtype)
    wide = a.astype(np.float64)
    assert glue.sum_squares(a) == pytest.approx(np.sum(wide ** 2), rel=1e-12)
    assert glue.negative_sum_squares(a) == pytest.approx(np.sum(np.minimum(wide, 0) ** 2),
                                                         rel=1e-12)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_sum_squares_non_finite(glue, value, rng):
    a = rng.standard_normal(33)
    a[20] = value
    np.testing.assert_equal(glue.sum_squares(a), np.sum(a ** 2))
    np.testing.assert_equal(glue.negative_sum_squares(a), np.sum(np.minimum(a, 0) ** 2))
    assert np.isfinite(glue.negative_sum_squares(a)) == (value == np.inf)


def test_sum_squares_views_and_threads(rng):
    a = rng.standard_normal((40, 30)).astype(np.float32)
    view = a[::2, ::-3]
    want = np.sum(view.astype(np.float64) ** 2)
    assert elementwise.sum_squares(view) == pytest.approx(want, rel=1e-12)
    bits = []
    for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
        numba.set_num_threads(threads)
        bits.append((elementwise.sum_squares(a), elementwise.negative_sum_squares(a)))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert len(set(bits)) == 1


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n", SIZES)
def test_index_range(glue, dtype, n, rng):
    idx = rng.integers(-50, 1000, size=n).astype(dtype)
    assert glue.index_range(idx) == (idx.min(), idx.max())
    grid = idx[:n - n % 4].reshape(-1, 2, 2)[:, ::-1]  # a view
    if grid.size:
        assert glue.index_range(grid) == (grid.min(), grid.max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("low", [0.0, 0.1])
def test_step_mask(glue, dtype, low, rng):
    h = special(rng, 1001, dtype).reshape(7, 11, 13)[:, ::2]
    got = glue.step_mask(h, low, dtype)
    assert got.dtype == dtype and got.shape == h.shape
    np.testing.assert_array_equal(got, np.where(h > 0, 1, low).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("weight", [0.0, 0.25])
@pytest.mark.parametrize("n", SIZES)
def test_mask_add_negative(glue, dtype, use_mask, weight, n, rng):
    g = special(rng, n, dtype)
    code = special(rng, n, dtype)
    mask = (rng.random(n) < 0.6).astype(dtype) if use_mask else None
    want = g.copy()
    with np.errstate(invalid="ignore"):
        if use_mask:
            want *= mask
        if weight:
            want += dtype(weight) * np.minimum(code, 0)
        out = glue.mask_add_negative(g, mask, code, weight)
    assert out is g
    np.testing.assert_allclose(g, want, rtol=1e-6 if dtype == np.float32 else 1e-15)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("weight", [0.0, 0.25])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("finite", [True, False])
def test_mask_add_negative_code_sum_is_negative_sum_squares(glue, dtype, use_mask, weight, n,
                                                            finite, rng):
    """The sum from the update's pass is negative_sum_squares(code), bit for bit, and the
    update is the one without it."""
    g = special(rng, n, dtype)
    code = rng.standard_normal(n).astype(dtype) if finite else special(rng, n, dtype)
    mask = (rng.random(n) < 0.6).astype(dtype) if use_mask else None
    with np.errstate(invalid="ignore"):  # inf * 0 and inf - inf, as in the kernels
        want_g = glue.mask_add_negative(g.copy(), mask, code, weight)
        want_sum = glue.negative_sum_squares(code)
        out, total = glue.mask_add_negative(g, mask, code, weight, code_sum=True)
    assert out is g and isinstance(total, float)
    np.testing.assert_array_equal(g, want_g)
    if finite or not np.isnan(want_sum):
        assert total == want_sum
    else:
        assert np.isnan(total)
    # and it is the float64 sum it claims to be
    want = float(np.sum(np.minimum(code.astype(np.float64), 0) ** 2))
    assert total == pytest.approx(want, rel=1e-12, nan_ok=True)


def test_mask_add_negative_reads_views_and_checks_sizes(rng):
    g = rng.standard_normal((6, 5)).astype(np.float32)
    code = rng.standard_normal((5, 6)).astype(np.float32).T  # a transposed view
    mask = np.asfortranarray((rng.random((6, 5)) < 0.5).astype(np.float32))
    want = g * mask + np.float32(0.5) * np.minimum(code, 0)
    np.testing.assert_allclose(elementwise.mask_add_negative(g, mask, code, 0.5), want,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="C-contiguous"):
        elementwise.mask_add_negative(g.T, None, code, 0.5)
    with pytest.raises(ValueError, match="size"):
        elementwise.mask_add_negative(g, mask[:3], code, 0.5)


@pytest.mark.parametrize("dtype", [*DTYPES, np.int32, np.bool_])
@pytest.mark.parametrize("n", [0] + SIZES)
def test_count_nonzero(dtype, n, rng):
    """As np.count_nonzero: NaN and inf count, +-0 do not; views are read as they are."""
    a = (rng.random(n) < 0.3) if dtype == np.bool_ else (
        special(rng, n, dtype) if n and np.dtype(dtype).kind == "f"
        else rng.integers(-2, 3, n).astype(dtype))
    assert elementwise.count_nonzero(a) == np.count_nonzero(a)
    grid = np.repeat(a[:, None], 3, axis=1)[::2, ::-1]  # a strided view
    assert elementwise.count_nonzero(grid) == np.count_nonzero(grid)


def test_other_dtypes_take_the_numpy_expressions():
    """Types the kernels do not take (uint64 beyond int64, float16) still give exact answers."""
    big = np.array([2**63 + 5, 3, 2**64 - 1], np.uint64)
    assert _elementwise.index_range(big) == (3, 2**64 - 1)
    half = np.array([1.5, -2.0, 0.25], np.float16)
    assert _elementwise.sum_squares(half) == pytest.approx(6.3125)
    assert _elementwise.negative_sum_squares(half) == pytest.approx(4.0)
    np.testing.assert_array_equal(_elementwise.step_mask(half, 0, np.float32), [1, 0, 1])
