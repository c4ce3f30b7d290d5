"""The ops campaign: generated op cases on the host backends against the float64 reference
with the accuracy contract (``kernels.contracts``), with guard zones.

Each case draws a small geometry (N, C, K, H, W, kernel size, padding, pool, stride, leak), a
dtype, inputs with ties, zeros, wide dynamic range or NaN/inf, as contiguous or strided views,
and the cpu kernels' algorithm choices (direct / Winograd / the render and statistics paths).
Every input lives inside a larger buffer of sentinels, and every output the kernels allocate
(``buffers.empty``) is handed out inside one: after each op nothing outside an output was
written and no input buffer changed. The channel counts include 16 and 17 with 3x3
templates, so the Winograd kernels and their accuracy screen are reached.

Bounded: ``campaign(n)`` cases (``FASTDRMM_CAMPAIGN=long`` for more); two dtypes only, so the
kernels compile once per dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
from campaign import campaign
from contract_checks import check_match, check_match_at, check_render, check_stats
from hypothesis import given
from hypothesis import strategies as st

from cpu_algorithms import ALGORITHMS, force
from fastdrmm import ops
from fastdrmm._validation import match_geometry, units_geometry
from fastdrmm.kernels import buffers
from fastdrmm.kernels.contracts import DIRECT
from fastdrmm.kernels.cpu import matching
from scenarios import KINDS, values

GUARD_BYTES = 128           # a whole number of 64-byte lines: outputs stay aligned
SENTINEL = {np.dtype(np.float32): np.float32(-1.2345e-3), np.dtype(np.float64): -1.2345e-3,
            np.dtype(np.int32): np.int32(-123456789), np.dtype(np.int64): -123456789}


class GuardedOutputs:
    """``buffers.empty`` replaced: every output inside a buffer of sentinels, checked later."""

    def __init__(self):
        self.handed = []

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        shape = (shape,) if np.isscalar(shape) else tuple(int(s) for s in shape)
        size = int(np.prod(shape, dtype=np.int64))
        guard = GUARD_BYTES // dtype.itemsize
        parent = buffers.aligned_zeros(size + 2 * guard, dtype)
        parent[:] = SENTINEL.get(dtype, 0)
        self.handed.append((parent, guard, size))
        return parent[guard:guard + size].reshape(shape)

    def check(self):
        for parent, guard, size in self.handed:
            want = np.full(guard, SENTINEL.get(parent.dtype, 0), parent.dtype).view(np.uint8)
            assert np.array_equal(parent[:guard].view(np.uint8), want), "wrote before an output"
            tail = parent[guard + size:]
            assert np.array_equal(tail.view(np.uint8), want), "wrote past an output"
        self.handed.clear()


def guarded_input(a, strided):
    """``a`` as a view inside a buffer of sentinels: contiguous, or every other element of a
    twice-as-wide last axis (a non-contiguous view). Returns (view, parent, parent's copy)."""
    a = np.asarray(a)
    sentinel = SENTINEL[a.dtype]
    guard = GUARD_BYTES // a.itemsize
    if strided and a.ndim:
        wide = a.shape[:-1] + (2 * a.shape[-1],)
        parent = np.full(2 * guard + int(np.prod(wide)), sentinel, a.dtype)
        view = parent[guard:guard + int(np.prod(wide))].reshape(wide)[..., ::2]
    else:
        parent = np.full(2 * guard + a.size, sentinel, a.dtype)
        view = parent[guard:guard + a.size].reshape(a.shape)
    view[...] = a
    return view, parent, parent.copy()


def assert_untouched(inputs):
    for _, parent, before in inputs:
        assert np.array_equal(parent.view(np.uint8), before.view(np.uint8)), "an input changed"


@st.composite
def op_cases(draw):
    """One op case: geometry, dtype, data kinds (finite templates: every render algorithm
    takes them), layout, the cpu algorithms."""
    square = draw(st.booleans()) or draw(st.booleans())   # 3x3 three times in four
    kh, kw = (3, 3) if square else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    pad = draw(st.integers(0, max(kh, kw) - 1))
    h = draw(st.integers(max(1, kh - 2 * pad), 9))
    w = draw(st.integers(max(1, kw - 2 * pad), 9))
    ho, wo = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
    pool = (draw(st.integers(1, min(3, ho))), draw(st.integers(1, min(3, wo))))
    stride = (draw(st.integers(1, pool[0])), draw(st.integers(1, pool[1])))
    return dict(
        n=draw(st.integers(1, 3)), c=draw(st.sampled_from([1, 3, 16, 17])),
        k=draw(st.sampled_from([2, 5, 16])), h=h, w=w, kernel=(kh, kw), pad=pad, pool=pool,
        stride=stride, leak=draw(st.sampled_from([0.0, 0.1, 1.0])),
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        x_kind=draw(st.sampled_from(KINDS)), w_kind=draw(st.sampled_from(KINDS[:4])),
        code_kind=draw(st.sampled_from(("match", "sparse", "wide"))),
        switches=draw(st.sampled_from(("none", "mask", "values"))),
        strided=draw(st.booleans()),
        algorithm=draw(st.sampled_from(("auto", "direct", "winograd"))),
        render_algorithm=draw(st.sampled_from(("auto",) + ALGORITHMS["render"])),
        stats_algorithm=draw(st.sampled_from(("auto",) + ALGORITHMS["template_stats"])),
        seed=draw(st.integers(0, 2**32 - 1)))


def _check_op(outputs, inputs, fn):
    result = fn()
    outputs.check()
    assert_untouched(inputs)
    return result


@campaign(40)
@given(case=op_cases())
def test_campaign_ops_meet_the_contract_inside_guard_zones(case, monkeypatch):
    rng = np.random.default_rng(case["seed"])
    dtype = np.dtype(case["dtype"])
    n, c, k, (kh, kw) = case["n"], case["c"], case["k"], case["kernel"]
    pad, pool, stride, leak = case["pad"], case["pool"], case["stride"], case["leak"]
    x = values(rng, (n, c, case["h"], case["w"]), case["x_kind"], dtype)
    tw = values(rng, (k, c, kh, kw), case["w_kind"], dtype)
    b = values(rng, (k,), "normal" if case["w_kind"] != "wide" else "wide", dtype)
    outputs = GuardedOutputs()
    monkeypatch.setattr(buffers, "empty", outputs.empty)
    for op, name in (("render", case["render_algorithm"]),
                     ("template_stats", case["stats_algorithm"])):
        if name != "auto" and (name != "winograd" or (kh, kw) == (3, 3)):  # 3x3 only
            force(monkeypatch, op, name)
    ins = [guarded_input(a, case["strided"]) for a in (x, tw, b)]
    xv, wv, bv = (g[0] for g in ins)

    # matching: the ops (auto) on both host backends, and the drawn cpu algorithm
    geometry = dict(padding=pad, pool=pool, stride=stride, leak=leak)
    for backend in ("cpu", "numpy"):
        h, idx = _check_op(outputs, ins, lambda: ops.match_switch_pool(
            xv, wv, bv, backend=backend, **geometry))
        c_numpy = None if backend == "cpu" else DIRECT
        check_match(x, tw, b, h, idx, pad, pool, stride, leak, c=c_numpy)
    algorithm = case["algorithm"] if (kh, kw) == (3, 3) else "auto"
    h, idx = _check_op(outputs, ins, lambda: matching.match_switch_pool(
        x, tw, b, match_geometry(x.shape[2:], (kh, kw), pad, pool, stride), leak,
        algorithm=algorithm))
    check_match(x, tw, b, h, idx, pad, pool, stride, leak)

    # the code, positions and switches of the top-down ops
    code = h if case["code_kind"] == "match" else values(rng, h.shape, case["code_kind"], dtype)
    sw = {"none": None, "mask": (h > 0).astype(dtype),
          "values": values(rng, h.shape, "sparse", dtype)}[case["switches"]]
    more = [guarded_input(a, case["strided"]) for a in (code, idx) + (() if sw is None else (sw,))]
    codev, idxv = more[0][0], more[1][0]
    swv = None if sw is None else more[2][0]
    ins += more
    plane = (case["h"], case["w"])

    at_algorithm = {"direct": "units"}.get(algorithm, algorithm)
    for backend in ("cpu", "numpy"):
        out = _check_op(outputs, ins, lambda: ops.match_at(
            xv, wv, idxv, padding=pad, switches=swv, backend=backend))
        check_match_at(x, tw, idx, sw, out, pad, c=None if backend == "cpu" else DIRECT)
    out = _check_op(outputs, ins, lambda: matching.match_at(
        x, tw, idx, units_geometry(x.shape[2:], (kh, kw), pad, idx.shape[2:]), sw,
        algorithm=at_algorithm))
    check_match_at(x, tw, idx, sw, out, pad)

    for backend in ("cpu", "numpy"):
        r = _check_op(outputs, ins, lambda: ops.render(
            codev, idxv, wv, plane, padding=pad, switches=swv, backend=backend))
        check_render(code, idx, tw, plane, sw, r, pad, pool, stride,
                     c=None if backend == "cpu" else DIRECT)
        got = _check_op(outputs, ins, lambda: ops.template_stats(
            xv, codev, idxv, (kh, kw), padding=pad, switches=swv, backend=backend))
        check_stats(x, code, idx, (kh, kw), sw, got, pad, pool, stride, True)


@pytest.mark.parametrize("strided", [False, True])
def test_guard_zones_catch_a_write_past_an_output(strided):
    # the harness itself: a write one element past an output, or into an input, is seen
    outputs = GuardedOutputs()
    out = outputs.empty((2, 3), np.float32)
    out.reshape(-1)[:] = 1
    outputs.check()
    out = outputs.empty((2, 3), np.float32)
    flat = outputs.handed[-1][0]
    flat[GUARD_BYTES // 4 + 6] = 0
    with pytest.raises(AssertionError, match="past an output"):
        outputs.check()
    view, parent, before = guarded_input(np.ones((2, 3), np.float64), strided)
    parent[0] = 7
    with pytest.raises(AssertionError, match="input changed"):
        assert_untouched([(view, parent, before)])
