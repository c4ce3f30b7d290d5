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


# ---------------------------------------------------------------------------------------------
# Integer arguments: every op, every argument, bounded before any backend sees it (a Numba
# kernel would fail with a typing error beyond int64, NumPy with an OverflowError).

INT_ARGS = {  # op: (call taking the argument by keyword, argument names)
    "match_switch_pool": (lambda b, **kw: ops.match_switch_pool(X, W, B, backend=b, **kw),
                          ("padding", "pool", "stride")),
    "match_at": (lambda b, **kw: ops.match_at(X, W, IDX, backend=b, **kw), ("padding",)),
    "unpool": (lambda b, plane_shape=(6, 6): ops.unpool(CODE, IDX, plane_shape, backend=b),
               ("plane_shape",)),
    "render": (lambda b, input_shape=(8, 8), **kw: ops.render(CODE, IDX, W, input_shape,
                                                             backend=b, **kw),
               ("input_shape", "padding")),
    "template_stats": (lambda b, kernel_size=(3, 3), **kw: ops.template_stats(
        X, CODE, IDX, kernel_size, backend=b, **kw), ("kernel_size", "padding")),
}
CASES = [(op, arg) for op, (_, args) in INT_ARGS.items() for arg in args]
TOO_LARGE = [2**31, 2**63, 2**64, 10**30, np.uint64(2**64 - 1), np.int64(2**62),
             np.uint32(2**32 - 1), (1, 2**64), (np.uint64(2**63), 1)]
NEGATIVE = [-1, -2**64, np.int8(-1), np.int64(-2**63), (2, -1)]
NOT_INTS = [True, False, np.bool_(True), 2.0, np.float32(2), np.float64(1), (2, 2.0),
            (True, 2), "2", None, 1 + 0j]


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("op,arg", CASES)
def test_integer_arguments_out_of_range_are_value_errors(backend, op, arg):
    call = INT_ARGS[op][0]
    for value in TOO_LARGE + NEGATIVE:
        with pytest.raises(ValueError, match=arg) as info:
            call(backend, **{arg: value})
        assert len(str(info.value).splitlines()) == 1, str(info.value)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("op,arg", CASES)
def test_integer_arguments_of_other_types_are_type_errors(backend, op, arg):
    call = INT_ARGS[op][0]
    for value in NOT_INTS:
        if arg == "stride" and value is None:
            continue  # stride=None means stride=pool
        with pytest.raises(TypeError, match=arg):
            call(backend, **{arg: value})


INT_TYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("int_type", INT_TYPES)
def test_numpy_integers_of_every_width_are_taken(backend, int_type):
    x = np.random.default_rng(1).standard_normal((1, 2, 9, 8))
    t = np.random.default_rng(2).standard_normal((3, 2, 3, 2))
    want = ops.match_switch_pool(x, t, np.zeros(3), padding=1, pool=(2, 3), stride=(1, 2),
                                 backend=backend)
    got = ops.match_switch_pool(x, t, np.zeros(3), padding=int_type(1),
                                pool=(int_type(2), int_type(3)),
                                stride=(int_type(1), int_type(2)), backend=backend)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    u = ops.unpool(CODE, IDX, (int_type(6), int_type(6)), backend=backend)
    np.testing.assert_array_equal(u, ops.unpool(CODE, IDX, (6, 6), backend=backend))


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("call,words", [
    # planes whose flat positions i*Wo + j would not fit idx's int32
    (lambda b: ops.unpool(CODE, IDX, (2**16, 2**16), backend=b), "plane_shape"),
    (lambda b: ops.unpool(CODE, IDX, (1, 2**31), backend=b), "plane_shape"),
    (lambda b: ops.render(CODE, IDX, W, (2**16, 2**15 + 1), backend=b), "input"),
    (lambda b: ops.render(CODE, IDX, W, (8, 8), padding=2**16, backend=b), "padding"),
    (lambda b: ops.match_switch_pool(X, W, B, padding=(2**15, 2**15), backend=b), "padding"),
    (lambda b: ops.match_at(X, W, IDX, padding=(1, 2**30), backend=b), "padding"),
    (lambda b: ops.template_stats(X, CODE, IDX, (3, 3), padding=(2**15, 2**15), backend=b),
     "padding"),
])
def test_planes_beyond_int32_positions_are_refused(backend, call, words):
    with pytest.raises(ValueError, match=words) as info:
        call(backend)
    assert "int32" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Index arrays of every integer dtype: checked in their own dtype, the true values reported.

IDX_OPS = {
    "match_at": lambda b, idx, **kw: ops.match_at(X, W, idx, backend=b, **kw),
    "unpool": lambda b, idx, **kw: ops.unpool(CODE, idx, (6, 6), backend=b, **kw),
    "render": lambda b, idx, **kw: ops.render(CODE, idx, W, (8, 8), backend=b, **kw),
    "template_stats": lambda b, idx, **kw: ops.template_stats(X, CODE, idx, (3, 3), backend=b,
                                                              **kw),
}


def _wild(int_type, low, high):
    """IDX in int_type with one entry set to ``high`` and (signed types) one to ``low``."""
    idx = IDX.astype(int_type)
    idx[0, 0, 0, 0] = high
    idx[1, 3, 2, 2] = low
    return idx


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("op", list(IDX_OPS))
@pytest.mark.parametrize("int_type", INT_TYPES)
def test_out_of_range_positions_are_reported_as_they_are(backend, op, int_type):
    info = np.iinfo(int_type)
    low = info.min if info.min < 0 else 0
    idx = _wild(int_type, low, info.max)
    checks = [True] if IDX.dtype == int_type or info.max <= 2**31 - 1 and info.min >= -2**31 \
        else [True, False]  # types that int32 cannot hold are checked even when told not to
    for check in checks:
        with pytest.raises(ValueError, match=r"idx out of range.*found \[" + str(low) + ", "
                           + str(info.max) + r"\]"):
            IDX_OPS[op](backend, idx, check_idx=check)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("op", list(IDX_OPS))
@pytest.mark.parametrize("int_type", INT_TYPES)
def test_valid_positions_of_every_integer_dtype_give_the_int32_results(backend, op, int_type):
    want = IDX_OPS[op](backend, IDX)
    got = IDX_OPS[op](backend, IDX.astype(int_type))
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("op", list(IDX_OPS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, np.complex64, object,
                                   np.float16, "datetime64[s]"])
def test_non_integer_positions_are_type_errors(backend, op, dtype):
    with pytest.raises(TypeError, match="idx must hold integers"):
        IDX_OPS[op](backend, IDX.astype(dtype))


@pytest.mark.parametrize("int_type,value", [(np.uint32, 2**32 - 1), (np.uint16, 65535),
                                            (np.int64, 2**40), (np.int8, -128),
                                            (np.uint64, 2**63 - 1)])
def test_device_positions_are_reported_as_they_are(int_type, value):
    """The same report from a device backend (the CUDA simulator where there is no GPU)."""
    from numba import cuda

    idx = np.zeros((1, 1, 2, 2), int_type)
    idx[0, 0, 1, 1] = value
    found = rf"found \[{min(0, value)}, {max(0, value)}\]"
    with pytest.raises(ValueError, match=found):
        ops.unpool(cuda.to_device(np.ones((1, 1, 2, 2))), cuda.to_device(idx), (3, 3),
                   backend="numba-cuda")
