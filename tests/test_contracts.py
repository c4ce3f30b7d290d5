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
    # He templates on standard-normal and on ReLU-sparse inputs: no tile is flagged, so the
    # Winograd results stay bit for bit what they were
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((32, 32, 3, 3)) * np.sqrt(2 / 288)).astype(np.float32)
    b = np.zeros(32, np.float32)
    for x in (rng.standard_normal((8, 32, 12, 12)),
              np.maximum(rng.standard_normal((8, 32, 12, 12)) - 0.5, 0)):
        assert not winograd.screen(x.astype(np.float32), w, b, (1, 1)).any()
