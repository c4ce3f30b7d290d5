"""The shared compiled helpers of the cpu kernels (IR helpers, micro-kernels, work split),
against their element-by-element definitions."""

import numpy as np
import pytest
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from fastdrmm.kernels.cpu._microkernels import (DOT_PIXELS, GATHER_BLOCKS, GPIX, PIX, conv_tile,
                                                copy_out, dot_tile, gather_dots, gemm_tile,
                                                pool_step)
from fastdrmm.kernels.cpu._partition import chunk_bounds, vector_empty, vector_zeros
from fastdrmm.kernels.cpu._vector import I64, VBYTES, counted_loop, lanes, vector_helpers


@njit
def _copy_out(src, sofs, place, pscale, ne, nval, vl, dst, dofs, dstride):
    copy_out(src, sofs, place, pscale, ne, nval, vl, dst, dofs, dstride)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
@pytest.mark.parametrize("vl", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("ne, nval", [(1, 1), (7, 5), (8, 8), (16, 8), (19, 13), (40, 33)])
def test_copy_out_is_the_element_by_element_transpose(dtype, vl, ne, nval, rng):
    """Whole vl x vl blocks by register transposes, the rest element by element: every
    destination element written once from its source, nothing else touched."""
    pscale = nval + 3                           # channel-last rows with slack
    place = rng.permutation(ne + 5)[:ne].astype(np.int64) * 2 + 1   # any, distinct pixels
    src = (rng.standard_normal((place.max() + 2) * pscale + 7) * 100).astype(dtype)
    dstride = ne + 4
    dofs = 3
    dst = np.full(dofs + nval * dstride + 2, -12345, dtype=dtype)
    want = dst.copy()
    sofs = 5
    for l in range(nval):
        for e in range(ne):
            want[dofs + l * dstride + e] = src[sofs + place[e] * pscale + l]
    _copy_out(src, sofs, place, pscale, ne, nval, vl, dst, dofs, dstride)
    np.testing.assert_array_equal(dst, want)


@njit
def _scratch(n, like, zeroed):
    """Many scratch arrays, as the kernels make them: their addresses, lengths and sums."""
    addresses = np.empty(40, dtype=np.int64)
    lengths = np.empty(40, dtype=np.int64)
    sums = np.empty(40, dtype=np.float64)
    for i in range(40):
        a = vector_zeros(n + i, like.dtype) if zeroed else vector_empty(n + i, like.dtype)
        if not zeroed:
            a[:] = 1
        addresses[i] = a.ctypes.data
        lengths[i] = a.shape[0]
        sums[i] = a.sum()
    return addresses, lengths, sums


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
@pytest.mark.parametrize("zeroed", [False, True])
def test_kernel_scratch_starts_on_a_vector_boundary(dtype, zeroed):
    """Numba aligns its arrays to 32 bytes only; the kernels' scratch must start on a whole
    vector (64 bytes with AVX-512), else every full-vector load may span two cache lines."""
    n = 37
    addresses, lengths, sums = _scratch(n, np.zeros(1, dtype), zeroed)
    assert (addresses % VBYTES == 0).all()
    np.testing.assert_array_equal(lengths, n + np.arange(40))
    np.testing.assert_array_equal(sums, 0 if zeroed else lengths)


@pytest.mark.parametrize("nitems, nchunks", [(0, 1), (1, 1), (7, 3), (10, 4), (5, 8), (1000, 7)])
def test_chunk_bounds_cut_the_items_into_near_equal_contiguous_chunks(nitems, nchunks):
    bounds = [chunk_bounds(c, nchunks, nitems) for c in range(nchunks)]
    assert bounds[0][0] == 0 and bounds[-1][1] == nitems
    assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


# -- VectorIR: one intrinsic written with the helper object ----------------------------------

@intrinsic(prefer_literal=True)
def _leaky_fma_rows(typingctx, y, yofs, alpha, x, xofs, nvec, leak):
    """y[yofs + i] = switch(fmuladd(alpha, x[xofs + i], y[yofs + i]), leak) for i < nvec * VL,
    written with every piece of the helper object (named arguments, vload/vstore, splat,
    fmuladd, switch, counted_loop)."""
    sig = types.void(y, yofs, alpha, x, xofs, nvec, leak)

    def codegen(context, builder, signature, args):
        k = vector_helpers(context, builder, y.dtype, signature, args)
        yofs_, xofs_, nvec_ = k.int64("yofs", "xofs", "nvec")
        yp, xp = k.data("y", "x")
        av = k.splat(k.arg("alpha", k.dtype))
        switch = k.switch(k.arg("leak", k.dtype))

        def body(i, _):
            at_y = builder.add(yofs_, builder.mul(i, I64(k.vl)))
            at_x = builder.add(xofs_, builder.mul(i, I64(k.vl)))
            k.vstore(switch(k.fmuladd(av, k.vload(xp, at_x), k.vload(yp, at_y))), yp, at_y)
            return []

        counted_loop(builder, "rows", I64(0), nvec_, 1, [], body)
        return context.get_dummy_value()

    return sig, codegen


@njit
def _run_leaky_fma_rows(y, yofs, alpha, x, xofs, nvec, leak):
    _leaky_fma_rows(y, yofs, alpha, x, xofs, nvec, leak)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_vector_helpers_build_a_working_intrinsic(dtype, leak, rng):
    vl = lanes(dtype)
    x = rng.standard_normal(3 * vl + 5).astype(dtype)
    x[5] = -np.inf
    y = rng.standard_normal(3 * vl + 4).astype(dtype)
    y[vl + 1] = np.nan
    alpha = dtype(1.5)
    want = y.copy()
    ax, y0 = alpha.astype(np.float64) * x[3:3 + 3 * vl], y[1:1 + 3 * vl].astype(np.float64)
    z = ax + y0
    switched = np.zeros_like(z) if leak == 0 else leak * z  # the ReLU: -inf -> 0
    want[1:1 + 3 * vl] = np.where((z > 0) | np.isnan(z), z, switched)
    _run_leaky_fma_rows(y, 1, alpha, x, 3, 3, leak)
    # fmuladd may or may not fuse: within a few roundings of the terms' size
    with np.errstate(invalid="ignore"):
        slack = 4 * np.finfo(dtype).eps * (np.abs(ax) + np.abs(y0))
        body = y[1:1 + 3 * vl]
        close = (np.abs(body - want[1:1 + 3 * vl]) <= slack) | (body == want[1:1 + 3 * vl])
    assert (close | (np.isnan(body) & np.isnan(want[1:1 + 3 * vl]))).all()
    assert y[0] == want[0] and (y[1 + 3 * vl:] == want[1 + 3 * vl:]).all()
    assert (body[np.isneginf(x[3:3 + 3 * vl])] == (0 if leak == 0 else -np.inf)).all()


# -- run-time tile shapes: one ladder per intrinsic, generated from the tables ----------------

@njit
def _conv_tiles(nv, literal, w, x, xb, off, bias, z, zstride):
    ntaps = off.shape[0]
    if literal:  # the hand-written ladder that the run-time form replaces
        if nv == 4:
            conv_tile(w, 0, x, xb, off, ntaps, bias, 0, z, 0, zstride, 0.0, 4, PIX[4])
        elif nv == 3:
            conv_tile(w, 0, x, xb, off, ntaps, bias, 0, z, 0, zstride, 0.0, 3, PIX[3])
        elif nv == 2:
            conv_tile(w, 0, x, xb, off, ntaps, bias, 0, z, 0, zstride, 0.0, 2, PIX[2])
        else:
            conv_tile(w, 0, x, xb, off, ntaps, bias, 0, z, 0, zstride, 0.0, 1, PIX[1])
    else:
        conv_tile(w, 0, x, xb, off, ntaps, bias, 0, z, 0, zstride, 0.0, nv, PIX)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nv", [1, 2, 3, 4])
def test_conv_tile_on_a_run_time_nv_is_the_literal_tile(dtype, nv, rng):
    """conv_tile(..., nv, PIX) with a run-time nv runs the tile of PIX[nv] pixels, exactly as
    the literal call does, and both match the definition."""
    vl = lanes(dtype)
    npx, ntaps, width = PIX[nv], 7, nv * vl
    w = rng.standard_normal(ntaps * width).astype(dtype)
    x = rng.standard_normal(200).astype(dtype)
    xb = rng.integers(0, 100, npx).astype(np.int64)
    off = rng.integers(0, 90, ntaps).astype(np.int64)
    bias = rng.standard_normal(width).astype(dtype)
    outs = []
    for literal in (True, False):
        z = np.full(npx * width, -7.0, dtype=dtype)
        _conv_tiles(nv, literal, w, x, xb, off, bias, z, width)
        outs.append(z)
    np.testing.assert_array_equal(outs[0], outs[1])
    acc = bias[None, :].astype(np.float64) + np.stack(
        [x[xb[p] + off].astype(np.float64) @ w.reshape(ntaps, width) for p in range(npx)])
    want = np.maximum(acc, 0).reshape(-1)
    np.testing.assert_allclose(outs[1], want, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-5)


@njit
def _pool_steps(nv, first, z, best, barg, flat):
    pool_step(z, 0, best, barg, 0, flat, nv, first)


@pytest.mark.parametrize("nv", [1, 3, 4])
def test_pool_step_on_run_time_shape_and_first(nv, rng):
    vl = lanes(np.float64)
    n = nv * vl
    best = np.full(4 * vl, -1.0)
    barg = np.full(4 * vl, -1, dtype=np.int32)
    a = rng.standard_normal(n)
    b = rng.standard_normal(n)
    a[0], b[1] = np.nan, np.nan
    _pool_steps(nv, True, a, best, barg, 3)
    _pool_steps(nv, False, b, best, barg, 5)
    take = ~np.isnan(a) & ((b > a) | np.isnan(b))
    np.testing.assert_array_equal(best[:n], np.where(take, b, a))
    np.testing.assert_array_equal(barg[:n], np.where(take, 5, 3))
    assert (best[n:] == -1).all() and (barg[n:] == -1).all()


@njit
def _gather(nv, nl, acc, u, qoff, qval, shift, sstep):
    gather_dots(acc, 0, acc.shape[0] // 4, u, qoff, qval, 0, qoff.shape[0], shift, sstep, nv, nl)


@njit
def _gemm(nv, acc, aofs, a, abase, aoff, b, boff):
    gemm_tile(acc, aofs, a, abase, aoff, b, boff, 0, aoff.shape[0], nv, GPIX)


@njit
def _dots(npx, out, w, x, bases, woff, xoff):
    dot_tile(out, w, 0, x, bases, woff, xoff, woff.shape[0], npx)


@pytest.mark.parametrize("shape", list(zip(GATHER_BLOCKS, GATHER_BLOCKS[::-1])))
def test_gather_dots_on_run_time_blocks(shape, rng):
    nv, nl = shape
    vl = lanes(np.float64)
    astep, count = 4 * vl, 5
    u = rng.standard_normal(300)
    qoff = rng.integers(0, 100, count).astype(np.int64)
    qval = rng.standard_normal(count)
    acc = rng.standard_normal(4 * astep)
    want = acc.copy()
    for m in range(nl):
        for t in range(count):
            start = qoff[t] + 7 + m * 3
            want[m * astep:m * astep + nv * vl] += qval[t] * u[start:start + nv * vl]
    _gather(nv, nl, acc, u, qoff, qval, 7, 3)
    np.testing.assert_allclose(acc, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nv", [1, 2, 4])
def test_gemm_tile_on_a_run_time_nv(nv, rng):
    vl = lanes(np.float64)
    npx, steps, width = GPIX[nv], 6, nv * vl
    a = rng.standard_normal(100)
    abase = rng.integers(0, 50, npx).astype(np.int64)
    aoff = rng.integers(0, 40, steps).astype(np.int64)
    b = rng.standard_normal(steps * width)
    boff = np.arange(steps, dtype=np.int64) * width
    aofs = np.arange(npx, dtype=np.int64) * width
    acc = rng.standard_normal(npx * width)
    want = acc.reshape(npx, width) + np.stack(
        [a[abase[p] + aoff] @ b.reshape(steps, width) for p in range(npx)])
    _gemm(nv, acc, aofs, a, abase, aoff, b, boff)
    np.testing.assert_allclose(acc, want.reshape(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("npx", DOT_PIXELS)
def test_dot_tile_on_a_run_time_pixel_count(npx, rng):
    vl = lanes(np.float64)
    steps = 4
    w = rng.standard_normal(steps * vl)
    x = rng.standard_normal(200)
    bases = rng.integers(0, 100, npx).astype(np.int64)
    woff = np.arange(steps, dtype=np.int64) * vl
    xoff = rng.integers(0, 60, steps).astype(np.int64)
    out = np.full(8, -3.0)
    _dots(npx, out, w, x, bases, woff, xoff)
    want = [sum(w[woff[t]:woff[t] + vl] @ x[bases[p] + xoff[t]:bases[p] + xoff[t] + vl]
                for t in range(steps)) for p in range(npx)]
    np.testing.assert_allclose(out[:npx], want, rtol=1e-12, atol=1e-12)
    assert (out[npx:] == -3).all()


# -- a shape that is neither a constant nor dispatchable: a TypingError that says so ----------

@njit
def _conv_tile_runtime_p(nv, npx, w, x, xb, off, bias, z):
    conv_tile(w, 0, x, xb, off, 1, bias, 0, z, 0, 1, 0.0, nv, npx)


@njit
def _pool_step_float_nv(z, best, barg):
    pool_step(z, 0, best, barg, 0, 0, 1.5, 1)


def test_a_missing_literal_is_a_typing_error_that_names_it():
    f = np.zeros(64)
    i = np.zeros(4, dtype=np.int64)
    with pytest.raises(TypingError, match=r"conv_tile: argument (NV|P) must be a compile-time "
                                          r"integer constant \(it sets how many"):
        _conv_tile_runtime_p(2, 6, f, f, i, i, f, f)
    with pytest.raises(TypingError, match=r"pool_step: argument NV must be an integer \(it "
                                          r"sets how many vectors.*dispatched over \(4, 3, 2, "
                                          r"1\); got float64"):
        _pool_step_float_nv(f, f, np.zeros(64, dtype=np.int32))
