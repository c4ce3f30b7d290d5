"""One-pass element-wise kernels for the training step's glue (Numba CPU, parallel).

Each replaces a chain of NumPy expressions that made a temporary per operation and ran on one
core (measured on the conv-small EG step at batch 128: about 25 ms of a 145 ms step went to
such chains). Reductions are cut into a fixed number of chunks, summed in chunk order, so
their bits do not depend on the thread count. NaN propagates as in the NumPy expressions they
replace (``np.minimum(v, 0)`` is NaN for a NaN ``v``; ``v > 0`` is False).
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import buffers
from ._partition import PARALLEL, chunk_bounds
from ._vector import I1, I64, counted_loop, vector_helpers

__all__ = ["sum_squares", "negative_sum_squares", "index_range", "step_mask",
           "mask_add_negative", "count_nonzero", "adam_update"]

_CHUNKS = 16  # fixed, so the sums are the same bits for any number of threads
_UNROLL = 8  # independent float64 accumulators: the adds do not wait on each other


@njit(inline="always")
def _negative(v, zero):
    """min(v, 0) (``zero`` of v's type), NaN for NaN."""
    return zero if v >= 0 else v


@intrinsic
def _square_lanes(typingctx, part, body, negative_only, acc):
    """``acc[j] = sum over i < body, i % 8 == j of v_i**2`` in float64, with v_i =
    float64(part[i]) (``min(v_i, 0)``, NaN kept, with ``negative_only``): eight accumulators
    as one <8 x double> vector, so each lane adds in index order exactly as a scalar
    accumulator would (a multiply then an add, no fusing). Numba leaves the SLP vectoriser
    off, so the same eight scalar accumulators written in Python ran at ~1 element a cycle.
    ``body`` must be a multiple of 8; no bounds checks."""
    sig = types.void(part, body, negative_only, acc)

    def codegen(context, builder, signature, args):
        # eight float64 lanes whatever the input's dtype
        k = vector_helpers(context, builder, types.float64, signature, args, vl=8)
        dt = part.dtype
        elt = context.get_data_type(dt)  # as stored: a bool is a byte
        f64, vty = k.elt, k.vty
        vin = ir.VectorType(elt, 8)
        size = context.get_abi_sizeof(elt)
        body_ = k.int64("body")
        neg_ = k.arg("negative_only", types.boolean)
        neg_ = builder.trunc(neg_, I1) if neg_.type != I1 else neg_
        pp, acc_ = k.data("part", "acc")
        ap = builder.bitcast(acc_, vty.as_pointer())
        zero = k.zero
        negv = k.splat(neg_)
        def step(i, carried):
            v = builder.load(builder.bitcast(builder.gep(pp, [i], inbounds=True),
                                             vin.as_pointer()), align=size)
            # to float64 as np.float64(element) does
            if isinstance(dt, types.Float):
                v = builder.fpext(v, vty) if elt != f64 else v
            elif isinstance(dt, types.Integer) and dt.signed:
                v = builder.sitofp(v, vty)
            else:  # unsigned integers and bools (0 or 1)
                v = builder.uitofp(v, vty)
            # min(v, 0) as _negative: 0 where v >= 0, v otherwise (NaN too)
            drop = builder.and_(negv, builder.fcmp_ordered(">=", v, zero))
            v = builder.select(drop, zero, v)
            return [builder.fadd(carried[0], builder.fmul(v, v))]

        (s,), _ = counted_loop(builder, "squares", I64(0), body_, 8, [zero], step)
        builder.store(s, ap, align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _chunk_sum_squares(part, negative_only):
    """sum(part**2) (of min(part, 0) with ``negative_only``) in float64, by 8 independent
    accumulators (element i in accumulator i % 8, the tail in the first), added pairwise at
    the end: the one order every sum of squares here uses."""
    body = part.shape[0] // _UNROLL * _UNROLL
    acc = np.empty(_UNROLL, dtype=np.float64)
    _square_lanes(part, body, negative_only, acc)
    s0 = acc[0]
    for i in range(body, part.shape[0]):
        v = np.float64(part[i])
        if negative_only:
            v = _negative(v, 0.0)
        s0 += v * v
    return ((s0 + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


@njit(parallel=PARALLEL, cache=True)
def _sum_squares(flat, negative_only, out):
    nchunks = out.shape[0]
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, flat.shape[0])
        # indices from 0: no wrap-around test, the loop vectorises
        out[ch] = _chunk_sum_squares(flat[lo:hi], negative_only)


def _reduce(flat, negative_only):
    out = np.empty(_CHUNKS, dtype=np.float64)
    _sum_squares(flat, negative_only, out)
    total = 0.0
    for part in out:  # chunk order
        total += part
    return float(total)


def sum_squares(a):
    """sum(a**2) accumulated in float64."""
    return _reduce(np.ascontiguousarray(a).reshape(-1), False)


def negative_sum_squares(a):
    """sum(min(a, 0)**2) accumulated in float64 (no temporary)."""
    return _reduce(np.ascontiguousarray(a).reshape(-1), True)


@njit(parallel=PARALLEL, cache=True)
def _index_range(flat, lows, highs):
    nchunks = lows.shape[0]
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, flat.shape[0])
        part = flat[lo:hi]
        low, high = part[0], part[0]
        for i in range(1, part.shape[0]):
            v = part[i]
            low = min(low, v)
            high = max(high, v)
        lows[ch] = low
        highs[ch] = high


def index_range(idx):
    """(min, max) of a non-empty integer array in one pass."""
    flat = np.ascontiguousarray(idx).reshape(-1)
    nchunks = max(1, min(_CHUNKS, flat.shape[0]))
    lows = np.empty(nchunks, dtype=np.int64)
    highs = np.empty(nchunks, dtype=np.int64)
    _index_range(flat, lows, highs)
    return int(lows.min()), int(highs.max())


@njit(parallel=PARALLEL, cache=True)
def _step_mask(flat, low, out):
    nchunks = _CHUNKS
    one = out.dtype.type(1)
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, flat.shape[0])
        src, dst = flat[lo:hi], out[lo:hi]
        for i in range(src.shape[0]):
            dst[i] = one if src[i] > 0 else low


def step_mask(h, low, dtype):
    """An array of ``dtype`` and h's shape: 1 where h > 0, else ``low`` (0: the switches;
    the leak: the slope of a leaky switch)."""
    h = np.ascontiguousarray(h)
    out = buffers.empty(h.shape, dtype)
    _step_mask(h.reshape(-1), out.dtype.type(low), out.reshape(-1))
    return out


@njit(parallel=PARALLEL, cache=True)
def _mask_add_negative(g, mask, use_mask, code, use_code, weight, sums, want_sums):
    nchunks = _CHUNKS
    w = g.dtype.type(weight)
    zero = code.dtype.type(0)
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, g.shape[0])
        gp = g[lo:hi]
        if want_sums:
            # the chunks and order of negative_sum_squares, so the same bits; the chunk of
            # code is then in cache for the update below
            sums[ch] = _chunk_sum_squares(code[lo:hi], True)
        if use_mask and use_code:
            mp, cp = mask[lo:hi], code[lo:hi]
            for i in range(gp.shape[0]):
                gp[i] = gp[i] * mp[i] + w * _negative(cp[i], zero)
        elif use_mask:
            mp = mask[lo:hi]
            for i in range(gp.shape[0]):
                gp[i] = gp[i] * mp[i]
        elif use_code:
            cp = code[lo:hi]
            for i in range(gp.shape[0]):
                gp[i] = gp[i] + w * _negative(cp[i], zero)


def mask_add_negative(g, mask, code, weight, code_sum=False):
    """In place: ``g = g * mask + weight * min(code, 0)`` (``mask`` None: no factor; weight
    0: no term, so a non-finite code does not reach g through 0 * inf). Returns g, or with
    ``code_sum`` ``(g, negative_sum_squares(code))`` from the same pass over code (the
    same bits where code has g's dtype; otherwise of code cast to g's dtype).

    ``g`` must be C-contiguous; ``mask`` and ``code`` are read with g's shape."""
    if not g.flags.c_contiguous:
        raise ValueError("g must be C-contiguous")
    flat = g.reshape(-1)
    placeholder = np.zeros(1, dtype=g.dtype)
    use_mask, use_code = mask is not None, bool(weight)
    if code_sum and code is None:
        raise ValueError("code_sum needs code")
    mask = np.ascontiguousarray(mask, dtype=g.dtype).reshape(-1) if use_mask else placeholder
    read_code = use_code or code_sum
    code = np.ascontiguousarray(code, dtype=g.dtype).reshape(-1) if read_code else placeholder
    if (use_mask and mask.shape[0] != flat.shape[0]) or (read_code and
                                                        code.shape[0] != flat.shape[0]):
        raise ValueError("mask and code must have g's size")
    sums = np.empty(_CHUNKS if code_sum else 1, dtype=np.float64)
    _mask_add_negative(flat, mask, use_mask, code, use_code, float(weight), sums,
                       bool(code_sum))
    if not code_sum:
        return g
    total = 0.0
    for part in sums:  # chunk order, as _reduce
        total += part
    return g, float(total)


@njit(parallel=PARALLEL, cache=True)
def _count_nonzero(flat, out):
    nchunks = out.shape[0]
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, flat.shape[0])
        part = flat[lo:hi]
        count = 0
        for i in range(part.shape[0]):
            count += part[i] != 0   # NaN counts, -0.0 does not: as np.count_nonzero
        out[ch] = count


def count_nonzero(a):
    """``np.count_nonzero(a)`` on both cores (NumPy's is one pass on one: ~0.4 ms for a
    conv-small code at batch 128, where the kernels choose a path by it)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    if flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    out = np.empty(_CHUNKS, dtype=np.int64)
    _count_nonzero(flat, out)
    return int(out.sum())


@njit(parallel=PARALLEL, cache=True)
def _adam_update(param, grad, m, v, new, use_decay, decay, beta1, beta2, step, denom_scale, eps,
                 avg, avg_decay, avg_rest, use_avg):
    """One Adam update of one parameter array (flat), written into ``new``: the NumPy
    expressions of :meth:`fastdrmm._optim.Adam.step` element by element, in their order and
    precisions, so the bits are the same (``decay`` and ``avg_rest`` are in the parameter's
    dtype, as NumPy's scalar promotion makes them there). Two divisions and a square root
    per element (~14 cycles scalar): on both cores."""
    nchunks = _CHUNKS
    for ch in prange(nchunks):
        lo, hi = chunk_bounds(ch, nchunks, param.shape[0])
        for i in range(lo, hi):
            g = np.float64(grad[i])
            if use_decay:
                g = g + np.float64(decay * param[i])
            mi = m[i] * beta1
            mi = mi + (1 - beta1) * g
            vi = v[i] * beta2
            vi = vi + (1 - beta2) * g * g
            m[i] = mi
            v[i] = vi
            new[i] = np.float64(param[i]) - step * mi / (np.sqrt(vi / denom_scale) + eps)
            if use_avg:
                avg[i] = avg[i] * avg_decay + np.float64(avg_rest * new[i])


def adam_update(param, grad, m, v, beta1, beta2, step, denom_scale, eps, weight_decay=0.0,
                average=None, average_decay=0.0):
    """The Adam update of one parameter: ``m`` and ``v`` (float64, param's shape) in place,
    returns the new parameter (a fresh array of param's dtype); with ``average``, also
    ``average = average_decay * average + (1 - average_decay) * new`` in place.

    ``step`` is lr / (1 - beta1^t), ``denom_scale`` 1 - beta2^t."""
    shape, dtype = param.shape, param.dtype
    flat = np.ascontiguousarray(param).reshape(-1)
    new = np.empty(shape, dtype)
    use_avg = average is not None
    _adam_update(flat, np.ascontiguousarray(grad).reshape(-1), m.reshape(-1), v.reshape(-1),
                 new.reshape(-1), bool(weight_decay), dtype.type(weight_decay), float(beta1),
                 float(beta2), float(step), float(denom_scale), float(eps),
                 average.reshape(-1) if use_avg else np.zeros(1), float(average_decay),
                 dtype.type(1 - average_decay), use_avg)
    return new
