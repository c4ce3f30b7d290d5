"""Where the host kernels' large outputs come from: fresh arrays, or buffers reused by a loop.

Why
---
A training step makes the same allocations every time: the codes, positions, renders and
gradients of every layer, 1-7 MB each at batch 128 and ~35 MB in all on conv-small. Freed at
the end of the step, they bring the C heap back down past its trim threshold, so the memory
goes back to the operating system and the next step takes it again page by page: every page of
every fresh output costs a fault and a zero-fill, 15 % of a conv-small EG step on these
machines (measured: kernels 2-4 ms slower each in the step than alone, 0 faults alone, 100-640
per call in the step).

A :class:`StepBuffers` hands its buffers out in call order while one of its ``step()`` scopes is
active, and hands the same buffers out again, in the same order, in the next scope. Every
allocation of the kernels' outputs goes through :func:`empty` / :func:`zeros`, which take the
next buffer of the active scope, or make a fresh array when none is active (the default: only
loops that own their intermediates turn it on).

The contract of a scope: nothing it made is used after the next scope of the same
``StepBuffers`` begins (the next step overwrites it). Scopes are per thread (a context
variable), so a scope in one thread never hands a buffer to another.
"""

from __future__ import annotations

import contextlib
import contextvars
from math import prod

import numpy as np

__all__ = ["StepBuffers", "aligned_zeros", "empty", "zeros"]

#: allocations below this many bytes come from the heap's free lists (no page faults):
#: they are not worth a slot
MIN_BYTES = 1 << 16

#: every buffer starts on a 64-byte boundary (a cache line, an AVX-512 register): NumPy's
#: allocator gives 16 bytes, and the kernels' full-vector loads and stores at a whole number
#: of vectors from an output's start would then each touch two cache lines
ALIGN = 64

_ACTIVE = contextvars.ContextVar("fastdrmm_step_buffers", default=None)


def _aligned_bytes(nbytes):
    """``nbytes`` uninitialised bytes starting on an ``ALIGN``-byte boundary."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + nbytes]


class StepBuffers:
    """Buffers reused, in call order, by every ``step()`` scope of one loop.

    A slot keeps its buffer while what the step asks of it fits (the same shapes every step,
    or a smaller last batch); a larger request replaces it. Where a step's allocations depend
    on its data (a kernel chosen by the share of switches on, a sample redone), later slots
    can be replaced, and each slot keeps the largest size it has served: the memory held is
    then somewhat more than one step's. The buffers live as long as this object: drop it (or
    call :meth:`clear`) to give the memory back. One object serves one loop in one thread at
    a time (the slot counter is the object's).
    """

    def __init__(self):
        self._slots = []
        self._next = 0

    @contextlib.contextmanager
    def step(self):
        """Make this the active scope of the current thread; the slots restart from the first.

        Everything :func:`empty` hands out inside the scope is valid until the next scope of
        this object begins."""
        self._next = 0
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
        nbytes = prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES:
            return _fresh(shape, dtype)
        i = self._next
        self._next += 1
        if i == len(self._slots):
            self._slots.append(None)
        buf = self._slots[i]
        if buf is None or buf.nbytes < nbytes:
            # raw bytes, so one slot serves any dtype (each view starts at the buffer's
            # first byte, which is aligned for every dtype)
            buf = _aligned_bytes(nbytes)
            self._slots[i] = buf
        return buf[:nbytes].view(dtype).reshape(shape)

    @property
    def nbytes(self):
        """Bytes held by the slots."""
        return sum(b.nbytes for b in self._slots if b is not None)

    def clear(self):
        """Drop every buffer (the next step allocates afresh)."""
        self._slots = []
        self._next = 0


def active():
    """The StepBuffers whose scope is active in this thread, or None."""
    return _ACTIVE.get()


def empty(shape, dtype):
    """An uninitialised array: the next buffer of the active scope, else a fresh one; either
    way its data start on an ``ALIGN``-byte boundary."""
    buffers = _ACTIVE.get()
    if buffers is None:
        return _fresh(shape, dtype)
    return buffers.empty(shape, dtype)


def aligned_zeros(shape, dtype):
    """A fresh zero-filled array starting on an ``ALIGN``-byte boundary, never from a scope
    (the kernels' re-laid-out templates: small, read by full-vector loads)."""
    out = _fresh(shape, dtype)
    out.fill(0)
    return out


def _fresh(shape, dtype):
    """A new array of ``shape`` starting on an ``ALIGN``-byte boundary."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    return _aligned_bytes(prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


def zeros(shape, dtype):
    """A zero-filled array: the next buffer of the active scope, else a fresh one (aligned
    as :func:`empty`'s)."""
    out = empty(shape, dtype)
    out.fill(0)
    return out
