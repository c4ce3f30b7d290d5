"""Every host kernel against its accuracy contract (``kernels.contracts``), on ordinary and on
adversarial inputs: a huge input on a zero weight, a single input on a zero weight, a wide
dynamic range. The cpu backend's algorithms are forced in turn (``algorithm=``), so the
Winograd kernels are judged as well as the direct ones."""

from __future__ import annotations

import numpy as np
import pytest
from contract_checks import check_match, check_match_at, check_render, check_stats
from cpu_algorithms import force

from fastdrmm import ops
from fastdrmm._validation import match_geometry, units_geometry
from fastdrmm.kernels.cpu import matching, winograd


def _geometry(x, w, padding, pool, stride):
    return match_geometry(x.shape[2:], w.shape[2:], padding, pool, stride)


def _issue_input(big):
    x = np.ones((1, 16, 6, 6), np.float32)
    x[0, 0, 2, 2] = big
    w = np.ones((16, 16, 3, 3), np.float32)
    w[:, 0, 1, 1] = 0
    return x, w, np.zeros(16, np.float32)


@pytest.mark.parametrize("big", [1e8, 1e7])
def test_a_huge_input_on_a_zero_weight_is_matched_exactly(big):
    # z[0, 0, 1, 1]: 15 channels of 9 ones, and channel 0's 8 ones around big * 0 = 143; the
    # Winograd transforms paired big with the other taps' weights (240 for 1e8, 130 for 1e7)
    x, w, b = _issue_input(big)
    expected = 143.0
    for backend in ("cpu", "numpy"):
        h, _ = ops.match_switch_pool(x, w, b, pool=1, backend=backend)
        assert h[0, 0, 1, 1] == expected, backend
    h, idx = matching.match_switch_pool(x, w, b, _geometry(x, w, (0, 0), (1, 1), (1, 1)),
                                        0.0, algorithm="winograd")
    assert h[0, 0, 1, 1] == expected
    check_match(x, w, b, h, idx, 0, 1, 1, 0.0)


def _neighbour_pays_case(seed):
    """Channel 0: a few large inputs on weights that are half zeros; channels 1..15: large
    inputs with strong weights only on the rows and columns 3 and 7, so that they are zero on
    some outputs' fields of a tile and not on the others'."""
    rng = np.random.default_rng(seed)
    x = np.zeros((2, 16, 8, 8), np.float32)
    for n in range(2):
        for _ in range(3):
            big = rng.choice([-1, 1]) * 10.0 ** rng.uniform(0, 8)
            x[n, 0, rng.integers(8), rng.integers(8)] = big
        for c in range(1, 16):
            for _ in range(2):
                r, q = int(rng.choice([3, 7])), int(rng.integers(8))
                if rng.random() < 0.5:
                    r, q = q, r
                x[n, c, r, q] = 10.0 ** rng.uniform(0, 8)
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    w[:, 0][rng.random((8, 3, 3)) < 0.5] = 0
    return x, w, np.zeros(8, np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_a_channel_zero_on_one_output_does_not_certify_it(seed):
    # the screen's check must hold for each output of a tile: a channel that is zero on one
    # output's field adds nothing to that output's room, so its large neighbours must not pay
    # for channel 0's large input on a zero weight (a per-tile rule that left all-zero fields
    # out passed such tiles and returned ~1e-4 where the exact z is 0)
    x, w, b = _neighbour_pays_case(seed)
    h, idx = matching.match_switch_pool(x, w, b, _geometry(x, w, (0, 0), (1, 1), (1, 1)),
                                        np.float32(1.0), algorithm="winograd")
    check_match(x, w, b, h, idx, 0, 1, 1, 1.0)


def _one_hot_case(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((3, 16, 8, 8), dtype)
    for n in range(3):
        x[n, rng.integers(16), rng.integers(8), rng.integers(8)] = rng.standard_normal()
    w = rng.standard_normal((16, 16, 3, 3)).astype(dtype)
    w[:, :, 1, 1] = 0
    w[:, :, 0, 2] = 0
    return x, w, np.zeros(16, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_single_input_on_a_zero_weight_gives_an_exact_zero(dtype):
    # one non-zero input per sample, on taps whose weights are 0: the exact z is 0 or a single
    # product, which the contract bounds by a few ulps; Winograd's rounded transforms did not
    # cancel (|err| ~ u * sum |w|)
    x, w, b = _one_hot_case(dtype)
    h, idx = matching.match_switch_pool(x, w, b, _geometry(x, w, (1, 1), (1, 1), (1, 1)),
                                        1.0, algorithm="winograd")
    check_match(x, w, b, h, idx, 1, 1, 1, 1.0)


def _inputs(kind, shape, rng, dtype):
    x = rng.standard_normal(shape)
    if kind == "sparse":
        x = np.maximum(x - 1.0, 0)
    elif kind == "wide":
        x = x * np.exp2(rng.integers(-30, 30, size=shape))
    return x.astype(dtype)


def _templates(kind, shape, rng, dtype):
    w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    if kind == "wide":
        w = w * np.exp2(rng.integers(-20, 20, size=shape))
        w[rng.random(shape) < 0.2] = 0
    return w.astype(dtype)


KINDS = ["normal", "sparse", "wide"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algorithm", ["direct", "winograd"])
def test_matching_meets_its_contract(algorithm, kind, dtype):
    rng = np.random.default_rng([1, KINDS.index(kind)])
    x = _inputs(kind, (3, 16, 9, 9), rng, dtype)
    w = _templates(kind, (16, 16, 3, 3), rng, dtype)
    b = (0.1 * rng.standard_normal(16)).astype(dtype)
    for pool, stride, leak in (((2, 2), (2, 2), 0.0), ((1, 1), (1, 1), 0.25)):
        h, idx = matching.match_switch_pool(x, w, b, _geometry(x, w, (1, 1), pool, stride), leak,
                                            algorithm=algorithm)
        check_match(x, w, b, h, idx, 1, pool, stride, leak)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algorithm", ["units", "winograd"])
def test_match_at_meets_its_contract(algorithm, kind, dtype):
    rng = np.random.default_rng([2, KINDS.index(kind)])
    x = _inputs(kind, (3, 16, 8, 8), rng, dtype)
    w = _templates(kind, (16, 16, 3, 3), rng, dtype)
    _, idx = ops.match_switch_pool(x, w, np.zeros(16, dtype), padding=1, pool=2,
                                   backend="numpy")
    sw = (rng.random(idx.shape) < 0.7).astype(dtype)
    for switches in (None, sw):
        geometry = units_geometry(x.shape[2:], w.shape[2:], (1, 1), idx.shape[2:])
        out = matching.match_at(x, w, idx, geometry, switches, algorithm=algorithm)
        check_match_at(x, w, idx, switches, out, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algorithm", ["auto", "winograd"])
def test_render_and_stats_meet_their_contracts(algorithm, kind, dtype, monkeypatch):
    if algorithm != "auto":
        force(monkeypatch, "render", algorithm)
        force(monkeypatch, "template_stats", algorithm)
    rng = np.random.default_rng([3, KINDS.index(kind)])
    x = _inputs(kind, (3, 16, 8, 8), rng, dtype)
    w = _templates(kind, (16, 16, 3, 3), rng, dtype)
    code, idx = ops.match_switch_pool(x, w, np.zeros(16, dtype), padding=1, pool=1,
                                      leak=0.1, backend="numpy")
    code = _inputs(kind, code.shape, rng, dtype)
    sw = (code > 0).astype(dtype)
    r = ops.render(code, idx, np.ascontiguousarray(w), (8, 8), padding=1, switches=sw,
                   backend="cpu")
    check_render(code, idx, w, (8, 8), sw, r, 1, 1, 1)
    got = ops.template_stats(x, code, idx, 3, padding=1, switches=sw, backend="cpu")
    check_stats(x, code, idx, 3, sw, got, 1, 1, 1, True)


def test_the_screen_passes_ordinary_inputs():
    # He templates on standard-normal and on ReLU-sparse inputs: no output is flagged, so the
    # Winograd results stay bit for bit the kernel's
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((32, 32, 3, 3)) * np.sqrt(2 / 288)).astype(np.float32)
    b = np.zeros(32, np.float32)
    for x in (rng.standard_normal((8, 32, 12, 12)),
              np.maximum(rng.standard_normal((8, 32, 12, 12)) - 0.5, 0)):
        assert winograd.screen(x.astype(np.float32), w, b, (1, 1), (12, 12)) is None


def test_the_screen_is_per_output_not_per_tile():
    # an input only on the even rows and columns of a strong channel: the odd outputs of each
    # 2x2 tile see an empty field next to a full one; a per-tile screen flagged them
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)
    w[:, 1:] = np.where(np.abs(w[:, 1:]) < 0.05, 0.05, w[:, 1:])   # strong channels 1..15
    w[:, 0, 1, 1] = 0                                             # channel 0: weak
    x = np.zeros((2, 16, 10, 10), np.float32)
    x[:, 1:, ::4, ::4] = rng.random((2, 15, 3, 3)) * 10
    x[:, 0, 5, 5] = 1e6       # on the zero weight of the outputs centred there
    flags = winograd.screen(x, w, np.zeros(16, np.float32), (1, 1), (10, 10))
    assert flags is not None
    assert flags[:, :, 5, 5].all()
    assert flags.mean() < 0.2


def test_outputs_the_screen_flags_are_recomputed_exactly():
    # integer inputs and templates, a huge input on a zero weight: the flagged outputs come
    # from the classical sum, exact on these integers
    rng = np.random.default_rng(5)
    x = rng.integers(-3, 4, (3, 16, 9, 9)).astype(np.float32)
    w = rng.integers(-2, 3, (16, 16, 3, 3)).astype(np.float32)
    w[:, 3, 1, 1] = 0
    x[:, 3, 2::3, 2::3] = 2.0 ** 40
    b = np.zeros(16, np.float32)
    assert winograd.screen(x, w, b, (1, 1), (9, 9)) is not None
    for pool, leak in ((1, 0.0), (2, 0.0), (2, 0.5), (2, -0.5), (3, 0.0)):
        geometry = _geometry(x, w, (1, 1), (pool, pool), (pool, pool))
        h, idx = matching.match_switch_pool(x, w, b, geometry, leak, algorithm="winograd")
        ref_h, ref_idx = matching.match_switch_pool(x, w, b, geometry, leak,
                                                    algorithm="direct")
        np.testing.assert_array_equal(h, ref_h)
        np.testing.assert_array_equal(idx, ref_idx)


def test_flagged_units_and_rendered_pixels_are_recomputed_exactly(monkeypatch):
    # the same integers through match_at and render: a huge input (a huge code) on a zero
    # weight flags outputs of both; what they return is the classical sum's, exact here
    rng = np.random.default_rng(7)
    x = rng.integers(-3, 4, (2, 16, 8, 8)).astype(np.float32)
    w = rng.integers(-2, 3, (16, 16, 3, 3)).astype(np.float32)
    w[:, 3, 1, 1] = 0
    w[3, :, 1, 1] = 0
    x[:, 3, 1::3, 1::3] = 2.0 ** 40
    zero = np.zeros(16, np.float32)
    assert winograd.screen(x, w, zero, (1, 1), (8, 8)) is not None
    idx = rng.integers(0, 64, (2, 16, 4, 4)).astype(np.int32)
    sw = (rng.random((2, 16, 4, 4)) < 0.7).astype(np.float32)
    units = units_geometry((8, 8), (3, 3), (1, 1), idx.shape[2:])
    got = matching.match_at(x, w, idx, units, sw, algorithm="winograd")
    want = matching.match_at(x, w, idx, units, sw, algorithm="units")
    np.testing.assert_array_equal(got, want)
    code = rng.integers(0, 4, (2, 16, 8, 8)).astype(np.float32)
    code[:, 3, 2::3, 2::3] = 2.0 ** 40
    cidx = np.broadcast_to(np.arange(64, dtype=np.int32).reshape(8, 8), code.shape).copy()
    out = {}
    for algorithm in ("winograd", "gemm"):
        force(monkeypatch, "render", algorithm)
        out[algorithm] = ops.render(code, cidx, w, (8, 8), padding=1, backend="cpu")
        monkeypatch.undo()
    np.testing.assert_array_equal(out["winograd"], out["gemm"])
