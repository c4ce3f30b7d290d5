"""Bad input fails early with an error that names the argument."""

import numpy as np
import pytest

from fastdrmm import ops

X = np.zeros((2, 3, 8, 8))
W = np.zeros((4, 3, 3, 3))
B = np.zeros(4)
CODE, IDX = ops.match_switch_pool(X, W, B, backend="numpy")  # (2, 4, 3, 3) on a 6x6 plane


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("call,error,words", [
    (lambda b: ops.match_switch_pool(X[0], W, B, backend=b), ValueError, "x must be a 4-d"),
    (lambda b: ops.match_switch_pool(X.astype(int), W, B, backend=b), TypeError, "x must be float"),
    (lambda b: ops.match_switch_pool(X.astype(np.float16), W, B, backend=b), TypeError, "x must"),
    (lambda b: ops.match_switch_pool(X, W[:, :2], B, backend=b), ValueError, "channels"),
    (lambda b: ops.match_switch_pool(X, W[0], B, backend=b), ValueError, "templates must be a 4-d"),
    (lambda b: ops.match_switch_pool(X, W.astype(int), B, backend=b), TypeError, "templates"),
    (lambda b: ops.match_switch_pool(X, W, B[:3], backend=b), ValueError, "bias must have shape"),
    (lambda b: ops.match_switch_pool(X, np.zeros((4, 3, 9, 9)), B, backend=b), ValueError,
     "larger than the padded input"),
    (lambda b: ops.match_switch_pool(X, W, B, pool=0, backend=b), ValueError, "pool must be >= 1"),
    (lambda b: ops.match_switch_pool(X, W, B, pool=7, backend=b), ValueError, "pool"),
    (lambda b: ops.match_switch_pool(X, W, B, stride=(1, 0), backend=b), ValueError, "stride"),
    (lambda b: ops.match_switch_pool(X, W, B, padding=-1, backend=b), ValueError, "padding"),
    (lambda b: ops.match_switch_pool(X, W, B, pool=2.5, backend=b), TypeError, "pool"),
    (lambda b: ops.match_switch_pool(X, W, B, pool=(1, 2, 3), backend=b), TypeError, "pool"),
    (lambda b: ops.match_switch_pool(X, W, B, leak=np.nan, backend=b), ValueError, "leak"),
    (lambda b: ops.match_switch_pool(X, W, B, leak="0", backend=b), TypeError, "leak"),
    (lambda b: ops.match_switch_pool(X, np.zeros((0, 3, 3, 3)), B[:0], backend=b), ValueError,
     "at least one template"),
    (lambda b: ops.unpool(CODE, IDX, (2, 2), backend=b), ValueError, "idx out of range"),
    (lambda b: ops.unpool(CODE, -IDX - 1, (6, 6), backend=b), ValueError, "idx out of range"),
    (lambda b: ops.unpool(CODE, IDX.astype(float), (6, 6), backend=b), TypeError, "idx must hold"),
    (lambda b: ops.unpool(CODE, IDX[:1], (6, 6), backend=b), ValueError, "idx must have shape"),
    (lambda b: ops.unpool(CODE.astype(int), IDX, (6, 6), backend=b), TypeError, "code must be"),
    (lambda b: ops.unpool(CODE, IDX, (0, 6), backend=b), ValueError, "plane_shape"),
    (lambda b: ops.unpool(CODE, IDX, (6, 6), switches=np.ones(3), backend=b), ValueError,
     "switches must have shape"),
    (lambda b: ops.unpool(CODE, IDX, (6, 6), switches=np.full(CODE.shape, "a"), backend=b),
     TypeError, "switches"),
    (lambda b: ops.render(CODE, IDX, W[:3], (8, 8), backend=b), ValueError, "templates hold 3"),
    (lambda b: ops.render(CODE, IDX, W, (4, 4), backend=b), ValueError, "idx out of range"),
    (lambda b: ops.render(CODE, IDX, W, (2, 2), backend=b), ValueError, "larger than the padded"),
    (lambda b: ops.render(CODE, IDX, W, 8.0, backend=b), TypeError, "input_shape"),
    (lambda b: ops.template_stats(X[:1], CODE, IDX, (3, 3), backend=b), ValueError,
     "code holds 2 samples but x holds 1"),
    (lambda b: ops.template_stats(X, CODE, IDX, (3, 3), gram=1, backend=b), TypeError, "gram"),
    (lambda b: ops.template_stats(X, CODE, IDX, (9, 3), backend=b), ValueError, "larger than"),
    (lambda b: ops.template_stats(X, CODE, IDX, (5, 5), backend=b), ValueError, "idx out of range"),
    (lambda b: ops.template_stats(X.astype(np.int8), CODE, IDX, (3, 3), backend=b), TypeError,
     "x must be float"),
    (lambda b: ops.render(CODE, IDX, W, (8, 8), check_idx=0, backend=b), TypeError, "check_idx"),
    # wider positions are narrowed to int32, so they are checked even when told not to
    (lambda b: ops.match_at(X, W, IDX.astype(np.int64) + 2**32, check_idx=False, backend=b),
     ValueError, "idx out of range"),
    (lambda b: ops.unpool(CODE, IDX.astype(np.int64) - 2**33, (6, 6), check_idx=False,
                          backend=b), ValueError, "idx out of range"),
])
def test_errors_name_the_argument(backend, call, error, words):
    with pytest.raises(error, match=words):
        call(backend)


def test_bad_input_never_reaches_a_kernel(monkeypatch):
    """Validation happens before dispatch: a kernel that would crash is never called."""
    import fastdrmm.kernels.numpy as backend_module

    def explode(*args, **kwargs):
        raise AssertionError("kernel called on invalid input")

    monkeypatch.setattr(backend_module, "match_switch_pool", explode)
    with pytest.raises(ValueError):
        ops.match_switch_pool(X, W, B[:3], backend="numpy")


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_unchecked_positions_give_the_checked_results(backend):
    """check_idx=False only skips the range pass: valid positions give the same arrays."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 9))
    templates = rng.standard_normal((4, 3, 3, 3))
    code, idx = ops.match_switch_pool(x, templates, np.zeros(4), backend=backend)
    switches = code > 0
    calls = [
        lambda **kw: ops.match_at(x, templates, idx, switches=switches, backend=backend, **kw),
        lambda **kw: ops.unpool(code, idx, (7, 7), switches=switches, backend=backend, **kw),
        lambda **kw: ops.render(code, idx, templates, (9, 9), switches=switches,
                                backend=backend, **kw),
        lambda **kw: ops.template_stats(x, code, idx, (3, 3), switches=switches,
                                        backend=backend, **kw)[0],
    ]
    for call in calls:
        np.testing.assert_array_equal(call(check_idx=False), call())


def test_unchecked_positions_skip_the_range_pass(monkeypatch):
    from fastdrmm import _elementwise

    def explode(idx):
        raise AssertionError("range pass run")

    monkeypatch.setattr(_elementwise, "index_range", explode)
    ops.render(CODE, IDX, W, (8, 8), check_idx=False, backend="cpu")
    with pytest.raises(AssertionError, match="range pass"):
        ops.render(CODE, IDX, W, (8, 8), backend="cpu")
