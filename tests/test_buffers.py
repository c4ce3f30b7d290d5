"""StepBuffers: the kernels' outputs reused from one training step to the next."""

import threading

import numpy as np
import pytest

from fastdrmm import DRMM, Layer
from fastdrmm._network import LossWeights, Network, eg_loss_and_grads
from fastdrmm.kernels import buffers
from fastdrmm.kernels.buffers import StepBuffers
from test_drmm import SMALL, small_data


@pytest.fixture
def every_size(monkeypatch):
    """Every allocation takes a slot, however small (the tests' arrays are)."""
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)


def test_fresh_arrays_outside_a_scope():
    a, b = buffers.empty((300, 300), np.float32), buffers.empty((300, 300), np.float32)
    assert not np.shares_memory(a, b)
    z = buffers.zeros((5, 7), np.int32)
    assert z.dtype == np.int32 and z.shape == (5, 7) and not z.any()
    assert buffers.active() is None


@pytest.mark.parametrize("shape", [1, 3, (5, 7), (300, 301)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32, np.float64])
def test_every_buffer_starts_on_a_cache_line(shape, dtype):
    """NumPy's allocator gives 16 bytes; the kernels' full-vector loads and stores want 64."""
    bufs = StepBuffers()
    made = [buffers.empty(shape, dtype), buffers.zeros(shape, dtype),
            buffers.aligned_zeros(shape, dtype)]
    for _ in range(2):
        with bufs.step():
            made += [buffers.empty(shape, dtype), buffers.zeros(shape, dtype),
                     bufs.empty(shape, dtype)]
    for a in made:
        assert a.ctypes.data % buffers.ALIGN == 0
        assert a.dtype == dtype and a.shape == np.empty(shape).shape and a.flags.c_contiguous
    for i in (1, 2, 4, 7):  # the zeros
        assert not made[i].any()


def test_a_step_hands_out_the_last_steps_buffers_in_order():
    bufs = StepBuffers()
    with bufs.step() as active:
        assert active is bufs and buffers.active() is bufs
        a = buffers.empty((128, 256), np.float32)
        b = buffers.empty((64, 256), np.int32)
        small = buffers.empty(10, np.float64)       # below MIN_BYTES: no slot
    assert buffers.active() is None
    assert not np.shares_memory(a, b)
    held = bufs.nbytes
    assert held == a.nbytes + b.nbytes
    with bufs.step():
        a2 = buffers.empty((128, 256), np.float32)
        b2 = buffers.empty((64, 256), np.int32)
        small2 = buffers.empty(10, np.float64)
    assert np.shares_memory(a, a2) and np.shares_memory(b, b2)
    assert not np.shares_memory(small, small2)
    assert bufs.nbytes == held
    assert a2.shape == (128, 256) and a2.dtype == np.float32 and a2.flags.c_contiguous
    assert b2.dtype == np.int32 and b2.flags.writeable


def test_slots_take_any_dtype_shrink_in_place_and_grow_when_needed():
    bufs = StepBuffers()
    with bufs.step():
        a = buffers.empty((100, 200), np.float64)
    with bufs.step():          # a smaller request, another dtype: the same memory
        b = buffers.empty((100, 200), np.int32)
    assert np.shares_memory(a, b) and b.dtype == np.int32 and b.shape == (100, 200)
    b[:] = 7
    assert (b == 7).all()
    with bufs.step():          # larger: a new buffer, the old one is not handed out again
        c = buffers.zeros((300, 200), np.float64)
    assert not np.shares_memory(a, c) and not c.any()
    assert bufs.nbytes == c.nbytes
    bufs.clear()
    assert bufs.nbytes == 0


def test_zeros_clears_a_reused_buffer():
    bufs = StepBuffers()
    with bufs.step():
        buffers.empty((200, 200), np.float32)[:] = np.nan
    with bufs.step():
        z = buffers.zeros((200, 200), np.float32)
    assert (z == 0).all()


def test_a_scope_belongs_to_its_thread():
    bufs = StepBuffers()
    seen = []
    with bufs.step():
        thread = threading.Thread(target=lambda: seen.append(buffers.active()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_a_scope_ends_on_error():
    bufs = StepBuffers()
    with pytest.raises(RuntimeError):
        with bufs.step():
            raise RuntimeError("boom")
    assert buffers.active() is None


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_eg_steps_with_buffers_are_bit_identical(backend, every_size, rng):
    """Two different batches in turn through one StepBuffers, every array of the steps in a
    slot: the same loss, terms and gradients, bit for bit, as without buffers (nothing a step
    reads was overwritten by the step itself or left over from the one before)."""
    X, y = small_data(rng, n=16, unlabeled=0.3)
    _assert_buffered_steps_are_fresh_steps(SMALL, backend, X, y, poison=False)


def _assert_buffered_steps_are_fresh_steps(layers, backend, X, y, poison):
    """Batches 0-7, 8-15, 0-7 in turn through one StepBuffers: loss, terms and gradients
    equal, bit for bit, to steps without buffers; with ``poison`` every slot is filled with
    NaN bit patterns (-1 in int32) between steps."""
    net = Network(layers, X.shape[1:], 3, backend=backend)
    p = DRMM(layers, 3)._init_params(net, X, y, 1)
    weights = LossWeights(nonnegativity=0.05)
    bufs = StepBuffers()
    for rows in (slice(0, 8), slice(8, 16), slice(0, 8)):
        want = eg_loss_and_grads(net, p, X[rows], y[rows], weights)
        got = eg_loss_and_grads(net, p, X[rows], y[rows], weights, buffers=bufs)
        assert got[0] == want[0] and got[1] == want[1]
        for name in want[2]:
            np.testing.assert_array_equal(got[2][name], want[2][name], err_msg=name)
        if poison:
            for slot in bufs._slots:
                slot.fill(0xFF)
    assert bufs.nbytes > 0


# Winograd-sized layers (>= 16 channels and templates, 3x3): the dense one and the pooled one
# take the Winograd matching, render and B, with K and C of 20 padded to whole vectors
WIDE = [Layer(20, 3, padding=1, pool=2), Layer(20, 3), Layer(20, 3, padding=1, pool=2)]


def test_poisoned_buffers_do_not_reach_a_winograd_step(every_size, rng):
    """Every slot filled with NaN bit patterns between steps: a kernel that relied on a fresh
    (zeroed) buffer, for its partial sums or the padding of its transformed templates, would
    carry NaN or garbage into the next step."""
    X = rng.random((16, 1, 20, 20)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    _assert_buffered_steps_are_fresh_steps(WIDE, "cpu", X, y, poison=True)


def test_fit_with_buffers_every_size_is_the_fit_without(every_size, monkeypatch, rng):
    """An EG fit reusing every intermediate equals one that allocates afresh."""
    X, y = small_data(rng)

    def fit():
        return DRMM(SMALL, 3, max_iter=2, batch_size=8, random_state=0,
                    validation_fraction=0).fit(X, y)

    reused = fit()
    monkeypatch.setattr(StepBuffers, "step", _no_scope)
    fresh = fit()
    for name, value in fresh.parameters_.items():
        np.testing.assert_array_equal(reused.parameters_[name], value, err_msg=name)


def _no_scope(self):
    import contextlib

    return contextlib.nullcontext(self)
