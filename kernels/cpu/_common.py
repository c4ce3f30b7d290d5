"""Shared pieces of the Numba CPU backend: SIMD micro-kernels and the work split.

The hot loops are Numba intrinsics that emit LLVM vector IR directly:

* ``conv_tile`` -- the register-blocked matching kernel: ``NV`` vectors of output channels
  times ``P`` output pixels of accumulators stay in registers for the whole reduction over
  the taps, then bias + switch are applied on the way out;
* ``pool_step`` -- one max-pooling candidate for ``NV`` vectors of channels (compare, select
  value and index; the NaN rule of the reference);
* ``gather_dots`` -- sparse-times-dense accumulation (a list of scalars times shifted rows of
  a dense buffer) for ``NL`` shifts x ``NV`` vectors, accumulators in registers;
* ``axpy`` -- ``y += alpha * x`` in full vectors plus a scalar tail.

They are intrinsics because Numba's loop vectoriser only widens innermost loops (so
accumulators would go through memory on every tap), targets 256-bit vectors on AVX-512
machines, and emits runtime alias checks; explicit vector IR keeps accumulators in
registers and uses the host's full vector width. The width is chosen once from the host
CPU's features (Numba's on-disk cache is keyed by CPU name and features, so a cache built
on another CPU is not reused). Caution for developers: Numba's cache is invalidated by
changes to the file that defines a cached function only, not by changes here; clear
``__pycache__`` after editing this module.

Everything is deterministic: every accumulator adds its terms in a fixed order with
``llvm.fmuladd`` (fused where the CPU has FMA), and the work split (``chunk_bounds``)
depends only on the problem size and the number of chunks.
"""

from __future__ import annotations

import llvmlite.binding as _llb
import llvmlite.ir as ir
import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array


def _has_avx512():
    """Whether Numba's compilation target has AVX-512F (honours NUMBA_CPU_NAME/FEATURES)."""
    if numba.config.CPU_FEATURES:
        return "+avx512f" in numba.config.CPU_FEATURES.split(",")
    if numba.config.CPU_NAME:
        return False  # a named (e.g. generic) target: assume no AVX-512
    return bool(_llb.get_host_cpu_features().get("avx512f", False))


# Bytes per SIMD register used by the micro-kernels: 64 on AVX-512 targets, else 32 (LLVM
# splits the vectors on narrower machines, which stays correct).
VBYTES = 64 if _has_avx512() else 32

# Register tiles of the micro-kernel: pixels per tile for NV = 1..4 vectors of channels.
# AVX-512 has 32 vector registers: NV*P accumulators + NV weights + a broadcast <= 32.
# AVX2 has 16, so blocks stop at 3 vectors and the tiles are smaller.
# gather_dots keeps NL x NV <= 16 (AVX-512) or 8 (16 registers) accumulators.
if VBYTES == 64:
    NV_MAX = 4
    PIX1, PIX2, PIX3, PIX4 = 16, 12, 8, 6
    NL_MAX = 4
else:
    NV_MAX = 3
    PIX1, PIX2, PIX3, PIX4 = 8, 6, 4, 3
    NL_MAX = 2
PIX = (0, PIX1, PIX2, PIX3, PIX4)
PIX_MAX = max(PIX)
# gemm_tile's tiles (NV = 1..4): smaller for NV <= 2, because LLVM hoists every broadcast of a
# step before the FMAs, and NV*P accumulators + P broadcasts + NV operands must fit in the
# registers (NV=2, P=12 spills and runs at ~60% of NV=2, P=8; measured on AVX-512).
if VBYTES == 64:
    GPIX = (0, 8, 8, 8, 6)
else:
    GPIX = (0, 6, 4, 3, 3)


# Parallel loops are explicit ``prange`` loops over chunks; Numba's automatic conversion of
# array expressions into parallel loops is switched off (nothing to gain inside a chunk, and
# it costs compile time).
PARALLEL = {"prange": True, "comprehension": False, "numpy": False, "reduction": False,
            "setitem": False, "stencil": False, "fusion": False, "inplace_binop": False}


def lanes(dtype):
    """Elements per SIMD vector for this dtype."""
    return VBYTES // np.dtype(dtype).itemsize


def num_chunks(work):
    """How many parallel chunks to cut ``work`` independent items into."""
    return max(1, min(int(work), numba.get_num_threads()))


@njit(cache=True)
def chunk_bounds(chunk, nchunks, nitems):
    """Items [lo, hi) of one chunk out of ``nchunks`` near-equal contiguous chunks."""
    return chunk * nitems // nchunks, (chunk + 1) * nitems // nchunks


@njit(inline="always")
def vector_empty(n, dtype):
    """An uninitialised 1-D scratch array of ``n`` elements whose first element starts a
    SIMD register's worth of bytes (``VBYTES``): a vector at a whole number of vectors from
    it never straddles two cache lines. Numba aligns its arrays to 32 bytes only, so with
    64-byte vectors half of the processes got every such load split in two (the sparse B
    kernel: 3.7 ms aligned, 5.4 ms not, depending on the process)."""
    raw = np.empty(n + VBYTES, dtype=dtype)
    skip = (VBYTES - raw.ctypes.data % VBYTES) % VBYTES // raw.itemsize
    return raw[skip:skip + n]


@njit(inline="always")
def vector_zeros(n, dtype):
    """``vector_empty`` filled with zeros."""
    out = vector_empty(n, dtype)
    out[:] = 0
    return out


@njit(cache=True)
def place_table(ho, wo, row_stride, col_stride, origin):
    """``place[i*wo + j] = origin + i*row_stride + j*col_stride``: the buffer offset of each
    plane position, so a flat argmax f needs no division (64-bit idiv per unit was a
    measurable share of the unit loops)."""
    place = np.empty(ho * wo, dtype=np.int64)
    for i in range(ho):
        for j in range(wo):
            place[i * wo + j] = origin + i * row_stride + j * col_stride
    return place


def _data(context, builder, aryty, ary):
    return make_array(aryty)(context, builder, ary).data


def vector_helpers(context, builder, dt):
    """(IR) (vty, vload(ptr, index), vstore(val, ptr, index), splat(scalar)) for dtype
    ``dt``: the vector type of VBYTES and full-vector loads and stores at element offsets."""
    elt = context.get_value_type(dt)
    size = context.get_abi_sizeof(elt)
    vl = VBYTES // size
    vty = ir.VectorType(elt, vl)
    i32 = ir.IntType(32)

    def vptr(ptr, index):
        return builder.bitcast(builder.gep(ptr, [index], inbounds=True), vty.as_pointer())

    def vload(ptr, index):
        return builder.load(vptr(ptr, index), align=size)

    def vstore(val, ptr, index):
        builder.store(val, vptr(ptr, index), align=size)

    undef = ir.Constant(vty, ir.Undefined)
    mask0 = ir.Constant(ir.VectorType(i32, vl), [0] * vl)

    def splat(scalar):
        return builder.shuffle_vector(builder.insert_element(undef, scalar, i32(0)), undef, mask0)

    return vty, vload, vstore, splat


def counted_loop(builder, name, start, stop, step, init, body):
    """(IR) ``for t in range(start, stop, step)`` over i64 (``step`` a positive int) with
    loop-carried values: ``body(t, values)`` emits one iteration at the builder and returns
    the next values (the types of ``init``). Leaves the builder after the loop and returns
    (the values after the loop, the final t)."""
    i64 = ir.IntType(64)
    entry = builder.block
    head = builder.append_basic_block(name + ".head")
    blk = builder.append_basic_block(name + ".body")
    done = builder.append_basic_block(name + ".done")
    builder.branch(head)
    builder.position_at_end(head)
    t = builder.phi(i64)
    t.add_incoming(start, entry)
    carried = []
    for val in init:
        phi = builder.phi(val.type)
        phi.add_incoming(val, entry)
        carried.append(phi)
    builder.cbranch(builder.icmp_signed("<", t, stop), blk, done)
    builder.position_at_end(blk)
    new = body(t, carried)
    latch = builder.block  # the body may have added blocks
    t.add_incoming(builder.add(t, i64(step)), latch)
    for phi, val in zip(carried, new):
        phi.add_incoming(val, latch)
    builder.branch(head)
    builder.position_at_end(done)
    return carried, t


@intrinsic(prefer_literal=True)
def conv_tile(typingctx, w, wofs, x, xb, off, ntaps, bias, bofs, z, zofs, zstride, leak, NV, P):
    """Register-blocked matching of ``P`` pixels against ``NV`` vectors of templates.

    For pixel p < P and channel lane l < NV*VL (VL lanes per vector)::

        acc = bias[bofs + l]
        for t in range(ntaps):                    # fixed order
            acc = fmuladd(w[wofs + t*NV*VL + l], x[xb[p] + off[t]], acc)
        z[zofs + p*zstride + l] = acc if (acc > 0 or acc is NaN) else (0 if leak == 0 else leak*acc)

    ``w``, ``x``, ``bias`` and ``z`` are 1-d arrays of one float dtype; ``xb`` and ``off`` are
    1-d int64 arrays; ``NV`` and ``P`` are compile-time constants. No bounds checks: the
    caller guarantees every address is in range.
    """
    if not isinstance(NV, types.IntegerLiteral) or not isinstance(P, types.IntegerLiteral):
        return None
    nv, npx = NV.literal_value, P.literal_value
    dt = w.dtype
    sig = types.void(w, wofs, x, xb, off, ntaps, bias, bofs, z, zofs, zstride, leak, NV, P)

    def codegen(context, builder, signature, args):
        (w_, wofs_, x_, xb_, off_, ntaps_, b_, bofs_, z_, zofs_, zstr_, leak_, _, _) = args
        aty = signature.args
        elt = context.get_value_type(dt)
        size = context.get_abi_sizeof(elt)
        vl = VBYTES // size
        vty = ir.VectorType(elt, vl)
        i32, i64 = ir.IntType(32), ir.IntType(64)

        def as_i64(val, ty):
            return context.cast(builder, val, ty, types.int64)

        wofs_, ntaps_ = as_i64(wofs_, aty[1]), as_i64(ntaps_, aty[5])
        bofs_, zofs_, zstr_ = as_i64(bofs_, aty[7]), as_i64(zofs_, aty[9]), as_i64(zstr_, aty[10])
        leak_ = context.cast(builder, leak_, aty[11], dt)
        wp = _data(context, builder, aty[0], w_)
        xp = _data(context, builder, aty[2], x_)
        xbp = _data(context, builder, aty[3], xb_)
        offp = _data(context, builder, aty[4], off_)
        bp = _data(context, builder, aty[6], b_)
        zp = _data(context, builder, aty[8], z_)
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty, vty]),
            "llvm.fmuladd.v%df%d" % (vl, 8 * size))

        def vload(ptr, index):
            addr = builder.gep(ptr, [index], inbounds=True)
            return builder.load(builder.bitcast(addr, vty.as_pointer()), align=size)

        def vstore(val, ptr, index):
            addr = builder.gep(ptr, [index], inbounds=True)
            builder.store(val, builder.bitcast(addr, vty.as_pointer()), align=size)

        mask0 = ir.Constant(ir.VectorType(i32, vl), [0] * vl)
        undef = ir.Constant(vty, ir.Undefined)

        def splat(scalar):
            one = builder.insert_element(undef, scalar, i32(0))
            return builder.shuffle_vector(one, undef, mask0)

        bases = [builder.load(builder.gep(xbp, [i64(p)], inbounds=True)) for p in range(npx)]
        init = [vload(bp, builder.add(bofs_, i64(v * vl))) for v in range(nv)]

        def step(t, accs):
            o = builder.load(builder.gep(offp, [t], inbounds=True))
            wbase = builder.add(wofs_, builder.mul(t, i64(nv * vl)))
            wv = [vload(wp, builder.add(wbase, i64(v * vl))) for v in range(nv)]
            updated = []
            for p in range(npx):
                xs = splat(builder.load(builder.gep(xp, [builder.add(bases[p], o)],
                                                    inbounds=True)))
                for v in range(nv):
                    updated.append(builder.call(fmuladd, [wv[v], xs, accs[p * nv + v]]))
            return updated

        accs, _ = counted_loop(builder, "tile", i64(0), ntaps_, 1, init * npx, step)
        leakv = splat(leak_)
        zero = ir.Constant(vty, [0.0] * vl)
        # The switch: y = z where z > 0 or z is NaN, else leak*z; the plain ReLU (leak == 0)
        # gives exactly 0 there (so -inf -> 0, not 0*(-inf) = NaN).
        leak_zero = builder.fcmp_ordered("==", leak_, ir.Constant(elt, 0.0))
        for p in range(npx):
            row = builder.add(zofs_, builder.mul(i64(p), zstr_))
            for v in range(nv):
                acc = accs[p * nv + v]
                keep = builder.or_(builder.fcmp_ordered(">", acc, zero),
                                   builder.fcmp_unordered("uno", acc, acc))
                other = builder.select(leak_zero, zero, builder.fmul(acc, leakv))
                vstore(builder.select(keep, acc, other), zp, builder.add(row, i64(v * vl)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def pool_step(typingctx, z, zofs, best, barg, bofs, flat, NV, FIRST):
    """One pooling candidate for ``NV`` vectors of channels (lane l < NV*VL)::

        v = z[zofs + l]; cb = best[bofs + l]
        FIRST:  best[bofs + l] = v;  barg[bofs + l] = flat
        else:   take = (cb == cb) and (v > cb or v != v)     # the first NaN wins and sticks
                if take: best[bofs + l] = v;  barg[bofs + l] = flat

    ``z`` and ``best`` share a float dtype, ``barg`` is int32, ``NV`` and ``FIRST`` are
    compile-time constants. No bounds checks.
    """
    if not isinstance(NV, types.IntegerLiteral) or not isinstance(FIRST, types.IntegerLiteral):
        return None
    nv, first = NV.literal_value, bool(FIRST.literal_value)
    dt = z.dtype
    sig = types.void(z, zofs, best, barg, bofs, flat, NV, FIRST)

    def codegen(context, builder, signature, args):
        z_, zofs_, best_, barg_, bofs_, flat_, _, _ = args
        aty = signature.args
        elt = context.get_value_type(dt)
        size = context.get_abi_sizeof(elt)
        vl = VBYTES // size
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vty, ity = ir.VectorType(elt, vl), ir.VectorType(i32, vl)
        zofs_ = context.cast(builder, zofs_, aty[1], types.int64)
        bofs_ = context.cast(builder, bofs_, aty[4], types.int64)
        flat_ = context.cast(builder, flat_, aty[5], types.int32)
        zp = _data(context, builder, aty[0], z_)
        bp = _data(context, builder, aty[2], best_)
        ap = _data(context, builder, aty[3], barg_)
        undef = ir.Constant(ity, ir.Undefined)
        flatv = builder.shuffle_vector(builder.insert_element(undef, flat_, i32(0)), undef,
                                       ir.Constant(ity, [0] * vl))

        def addr(ptr, index, ty, align):
            return builder.bitcast(builder.gep(ptr, [index], inbounds=True), ty.as_pointer()), align

        for v in range(nv):
            zv_p, za = addr(zp, builder.add(zofs_, i64(v * vl)), vty, size)
            b_p, ba = addr(bp, builder.add(bofs_, i64(v * vl)), vty, size)
            a_p, aa = addr(ap, builder.add(bofs_, i64(v * vl)), ity, 4)
            val = builder.load(zv_p, align=za)
            if first:
                builder.store(val, b_p, align=ba)
                builder.store(flatv, a_p, align=aa)
                continue
            cur = builder.load(b_p, align=ba)
            arg = builder.load(a_p, align=aa)
            take = builder.and_(builder.fcmp_ordered("ord", cur, cur),
                                builder.or_(builder.fcmp_ordered(">", val, cur),
                                            builder.fcmp_unordered("uno", val, val)))
            builder.store(builder.select(take, val, cur), b_p, align=ba)
            builder.store(builder.select(take, flatv, arg), a_p, align=aa)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def axpy(typingctx, y, yofs, alpha, x, xofs, n):
    """``y[yofs + i] = fmuladd(alpha, x[xofs + i], y[yofs + i])`` for i < n, in full SIMD
    vectors then a scalar tail. Every element is updated independently (no reduction), so
    the result does not depend on the split. ``x`` and ``y`` must not overlap; no bounds
    checks."""
    dt = y.dtype
    sig = types.void(y, yofs, alpha, x, xofs, n)

    def codegen(context, builder, signature, args):
        y_, yofs_, alpha_, x_, xofs_, n_ = args
        aty = signature.args
        elt = context.get_value_type(dt)
        size = context.get_abi_sizeof(elt)
        vl = VBYTES // size
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vty = ir.VectorType(elt, vl)
        yofs_ = context.cast(builder, yofs_, aty[1], types.int64)
        xofs_ = context.cast(builder, xofs_, aty[4], types.int64)
        n_ = context.cast(builder, n_, aty[5], types.int64)
        alpha_ = context.cast(builder, alpha_, aty[2], dt)
        yp = builder.gep(_data(context, builder, aty[0], y_), [yofs_], inbounds=True)
        xp = builder.gep(_data(context, builder, aty[3], x_), [xofs_], inbounds=True)
        bits = 8 * size
        fv = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                            "llvm.fmuladd.v%df%d" % (vl, bits))
        fs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(elt, [elt] * 3),
                                            "llvm.fmuladd.f%d" % bits)
        undef = ir.Constant(vty, ir.Undefined)
        av = builder.shuffle_vector(builder.insert_element(undef, alpha_, i32(0)), undef,
                                    ir.Constant(ir.VectorType(i32, vl), [0] * vl))
        nvec_end = builder.mul(builder.sdiv(n_, i64(vl)), i64(vl))

        def vbody(i, _):
            pyv = builder.bitcast(builder.gep(yp, [i], inbounds=True), vty.as_pointer())
            pxv = builder.bitcast(builder.gep(xp, [i], inbounds=True), vty.as_pointer())
            res = builder.call(fv, [av, builder.load(pxv, align=size),
                                    builder.load(pyv, align=size)])
            builder.store(res, pyv, align=size)
            return []

        def sbody(i, _):
            py_ = builder.gep(yp, [i], inbounds=True)
            px_ = builder.gep(xp, [i], inbounds=True)
            builder.store(builder.call(fs, [alpha_, builder.load(px_), builder.load(py_)]), py_)
            return []

        _, iv = counted_loop(builder, "axpy", i64(0), nvec_end, vl, [], vbody)
        counted_loop(builder, "axpy", iv, n_, 1, [], sbody)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def gather_dots(typingctx, acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, NV, NL):
    """Sparse-times-dense accumulation, ``NL`` shifts x ``NV`` vectors in registers::

        for m < NL, lane l < NV*VL:
            s = 0
            for t in range(start, start + count):               # fixed order
                s = fmuladd(qval[t], u[qoff[t] + shift + m*sstep + l], s)
            acc[aofs + m*astep + l] += s

    ``acc``, ``u`` and ``qval`` share a float dtype; ``qoff`` is int64; ``NV`` and ``NL`` are
    compile-time constants. No bounds checks.
    """
    if not isinstance(NV, types.IntegerLiteral) or not isinstance(NL, types.IntegerLiteral):
        return None
    nv, nl = NV.literal_value, NL.literal_value
    dt = u.dtype
    sig = types.void(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, NV, NL)

    def codegen(context, builder, signature, args):
        acc_, aofs_, astep_, u_, qoff_, qval_, start_, count_, shift_, sstep_, _, _ = args
        aty = signature.args
        elt = context.get_value_type(dt)
        size = context.get_abi_sizeof(elt)
        vl = VBYTES // size
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vty = ir.VectorType(elt, vl)
        aofs_ = context.cast(builder, aofs_, aty[1], types.int64)
        astep_ = context.cast(builder, astep_, aty[2], types.int64)
        start_ = context.cast(builder, start_, aty[6], types.int64)
        count_ = context.cast(builder, count_, aty[7], types.int64)
        shift_ = context.cast(builder, shift_, aty[8], types.int64)
        sstep_ = context.cast(builder, sstep_, aty[9], types.int64)
        end = builder.add(start_, count_)
        ap = _data(context, builder, aty[0], acc_)
        up = _data(context, builder, aty[3], u_)
        op = _data(context, builder, aty[4], qoff_)
        vp = _data(context, builder, aty[5], qval_)
        fv = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                            "llvm.fmuladd.v%df%d" % (vl, 8 * size))
        undef = ir.Constant(vty, ir.Undefined)
        mask0 = ir.Constant(ir.VectorType(i32, vl), [0] * vl)
        zero = ir.Constant(vty, [0.0] * vl)

        def vptr(ptr, index):
            return builder.bitcast(builder.gep(ptr, [index], inbounds=True), vty.as_pointer())

        shifts = [builder.add(shift_, builder.mul(sstep_, i64(m))) for m in range(nl)]
        def step(t, accs):
            base = builder.load(builder.gep(op, [t], inbounds=True))
            s = builder.load(builder.gep(vp, [t], inbounds=True))
            sv = builder.shuffle_vector(builder.insert_element(undef, s, i32(0)), undef, mask0)
            new = []
            for m in range(nl):
                row = builder.add(base, shifts[m])
                for v in range(nv):
                    val = builder.load(vptr(up, builder.add(row, i64(v * vl))), align=size)
                    new.append(builder.call(fv, [sv, val, accs[m * nv + v]]))
            return new

        accs, _ = counted_loop(builder, "gd", start_, end, 1, [zero] * (nl * nv), step)
        for m in range(nl):
            row = builder.add(aofs_, builder.mul(astep_, i64(m)))
            for v in range(nv):
                ptr = vptr(ap, builder.add(row, i64(v * vl)))
                builder.store(builder.fadd(builder.load(ptr, align=size), accs[m * nv + v]), ptr,
                              align=size)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def gemm_tile(typingctx, acc, aofs, a, abase, aoff, b, boff, t0, t1, NV, P):
    """Register-blocked ``acc += A^T B`` over a list of reduction steps, accumulating into
    memory. For p < P and lane l < NV*VL::

        s = acc[aofs[p] + l]
        for t in range(t0, t1):                   # fixed order
            s = fmuladd(b[boff[t] + l], a[abase[p] + aoff[t]], s)
        acc[aofs[p] + l] = s

    ``acc``, ``a`` and ``b`` share a float dtype; ``aofs``, ``abase``, ``aoff`` and ``boff``
    are 1-d int64 arrays; ``NV`` and ``P`` are compile-time constants. Two tiles p, p' may
    share an ``aofs`` only if what they write there is never read (scratch). No bounds checks.
    """
    if not isinstance(NV, types.IntegerLiteral) or not isinstance(P, types.IntegerLiteral):
        return None
    nv, npx = NV.literal_value, P.literal_value
    dt = acc.dtype
    sig = types.void(acc, aofs, a, abase, aoff, b, boff, t0, t1, NV, P)

    def codegen(context, builder, signature, args):
        acc_, aofs_, a_, abase_, aoff_, b_, boff_, t0_, t1_, _, _ = args
        aty = signature.args
        elt = context.get_value_type(dt)
        size = context.get_abi_sizeof(elt)
        vl = VBYTES // size
        vty = ir.VectorType(elt, vl)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        t0_ = context.cast(builder, t0_, aty[7], types.int64)
        t1_ = context.cast(builder, t1_, aty[8], types.int64)
        cp = _data(context, builder, aty[0], acc_)
        cop = _data(context, builder, aty[1], aofs_)
        ap = _data(context, builder, aty[2], a_)
        abp = _data(context, builder, aty[3], abase_)
        aop = _data(context, builder, aty[4], aoff_)
        bp = _data(context, builder, aty[5], b_)
        bop = _data(context, builder, aty[6], boff_)
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty, vty]),
            "llvm.fmuladd.v%df%d" % (vl, 8 * size))

        def vptr(ptr, index):
            return builder.bitcast(builder.gep(ptr, [index], inbounds=True), vty.as_pointer())

        mask0 = ir.Constant(ir.VectorType(i32, vl), [0] * vl)
        undef = ir.Constant(vty, ir.Undefined)

        def splat(scalar):
            one = builder.insert_element(undef, scalar, i32(0))
            return builder.shuffle_vector(one, undef, mask0)

        bases = [builder.gep(ap, [builder.load(builder.gep(abp, [i64(p)], inbounds=True))],
                             inbounds=True) for p in range(npx)]
        couts = [builder.load(builder.gep(cop, [i64(p)], inbounds=True)) for p in range(npx)]
        init = [builder.load(vptr(cp, builder.add(couts[p], i64(v * vl))), align=size)
                for p in range(npx) for v in range(nv)]

        def step(t, accs):
            oa = builder.load(builder.gep(aop, [t], inbounds=True))
            ob = builder.load(builder.gep(bop, [t], inbounds=True))
            bv = [builder.load(vptr(bp, builder.add(ob, i64(v * vl))), align=size)
                  for v in range(nv)]
            updated = []
            for p in range(npx):
                xs = splat(builder.load(builder.gep(bases[p], [oa], inbounds=True)))
                for v in range(nv):
                    updated.append(builder.call(fmuladd, [bv[v], xs, accs[p * nv + v]]))
            return updated

        accs, _ = counted_loop(builder, "gemm", t0_, t1_, 1, init, step)
        for p in range(npx):
            for v in range(nv):
                builder.store(accs[p * nv + v], vptr(cp, builder.add(couts[p], i64(v * vl))),
                              align=size)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def dot_tile(typingctx, out, w, wofs, x, bases, woff, xoff, nsteps, P):
    """``P`` dot products of one vector of weights with ``P`` vectors of data, in registers::

        for p < P:
            s = 0 (VL lanes)
            for t in range(nsteps):                   # fixed order
                s = fmuladd(w[wofs + woff[t] + l], x[bases[p] + xoff[t] + l], s)
            out[p] = the lanes of s added pairwise (a fixed tree)

    Each weight vector is loaded once for ``P`` FMAs. ``out``, ``w`` and ``x`` share a float
    dtype; ``bases``, ``woff`` and ``xoff`` are 1-d int64 arrays; ``P`` is a compile-time
    constant. No bounds checks.
    """
    if not isinstance(P, types.IntegerLiteral):
        return None
    npx = P.literal_value
    dt = x.dtype
    sig = types.void(out, w, wofs, x, bases, woff, xoff, nsteps, P)

    def codegen(context, builder, signature, args):
        out_, w_, wofs_, x_, bases_, woff_, xoff_, nsteps_, _ = args
        aty = signature.args
        elt = context.get_value_type(dt)
        size = context.get_abi_sizeof(elt)
        vl = VBYTES // size
        vty = ir.VectorType(elt, vl)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        wofs_ = context.cast(builder, wofs_, aty[2], types.int64)
        nsteps_ = context.cast(builder, nsteps_, aty[7], types.int64)
        op = _data(context, builder, aty[0], out_)
        wp = builder.gep(_data(context, builder, aty[1], w_), [wofs_], inbounds=True)
        xp = _data(context, builder, aty[3], x_)
        bp = _data(context, builder, aty[4], bases_)
        wop = _data(context, builder, aty[5], woff_)
        xop = _data(context, builder, aty[6], xoff_)
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty, vty, vty]),
            "llvm.fmuladd.v%df%d" % (vl, 8 * size))

        def vload(ptr, index):
            vp = builder.bitcast(builder.gep(ptr, [index], inbounds=True), vty.as_pointer())
            return builder.load(vp, align=size)

        starts = [builder.gep(xp, [builder.load(builder.gep(bp, [i64(p)], inbounds=True))],
                              inbounds=True) for p in range(npx)]
        zero = ir.Constant(vty, [0.0] * vl)
        def step(t, accs):
            wv = vload(wp, builder.load(builder.gep(wop, [t], inbounds=True)))
            ox = builder.load(builder.gep(xop, [t], inbounds=True))
            return [builder.call(fmuladd, [wv, vload(starts[p], ox), accs[p]])
                    for p in range(npx)]

        accs, _ = counted_loop(builder, "dot", i64(0), nsteps_, 1, [zero] * npx, step)
        undef = ir.Constant(vty, ir.Undefined)
        for p in range(npx):
            s, width = accs[p], vl
            while width > 1:  # add the upper half of the lanes onto the lower half
                width //= 2
                upper = builder.shuffle_vector(
                    s, undef, ir.Constant(ir.VectorType(i32, vl),
                                          [width + l if l < width else l for l in range(vl)]))
                s = builder.fadd(s, upper)
            builder.store(builder.extract_element(s, i32(0)),
                          builder.gep(op, [i64(p)], inbounds=True))
        return context.get_dummy_value()

    return sig, codegen


def transpose_block(builder, rows, vl):
    """(IR) The VL x VL transpose of VL vectors: log2(VL) stages of block swaps."""
    ity = ir.VectorType(ir.IntType(32), vl)
    width = 1
    while width < vl:  # swap the off-diagonal width x width blocks
        new = list(rows)
        for i in range(vl):
            if (i // width) % 2 == 0:
                j = i + width
                low = [l if (l // width) % 2 == 0 else vl + l - width for l in range(vl)]
                high = [l + width if (l // width) % 2 == 0 else vl + l for l in range(vl)]
                new[i] = builder.shuffle_vector(rows[i], rows[j], ir.Constant(ity, low))
                new[j] = builder.shuffle_vector(rows[i], rows[j], ir.Constant(ity, high))
        rows, width = new, 2 * width
    return rows


@intrinsic(prefer_literal=True)
def transpose_out(typingctx, src, sofs, place, pofs, pscale, dst, dofs, dstride, VL):
    """One VL x VL block from a channel-last buffer to channel-first rows::

        for position q < VL, channel i < VL:
            dst[dofs + i*dstride + q] = src[sofs + place[pofs + q]*pscale + i]

    (VL vectors loaded, one per position, transposed in registers by log2(VL) stages of
    block swaps, VL vectors stored, one per channel.) ``src`` and ``dst`` share a dtype
    (float, or int32 for positions), ``place`` is int64; ``VL`` (a power of two) is a
    compile-time constant. No bounds checks.
    """
    if not isinstance(VL, types.IntegerLiteral) or src.dtype != dst.dtype:
        return None
    vl = VL.literal_value
    sig = types.void(src, sofs, place, pofs, pscale, dst, dofs, dstride, VL)

    def codegen(context, builder, signature, args):
        src_, sofs_, place_, pofs_, pscale_, dst_, dofs_, dstride_, _ = args
        aty = signature.args
        elt = context.get_value_type(src.dtype)
        size = context.get_abi_sizeof(elt)
        vty = ir.VectorType(elt, vl)
        i64 = ir.IntType(64)
        sofs_, pofs_, pscale_, dofs_, dstride_ = (
            context.cast(builder, a, t, types.int64) for a, t in
            ((sofs_, aty[1]), (pofs_, aty[3]), (pscale_, aty[4]), (dofs_, aty[6]),
             (dstride_, aty[7])))
        sp = _data(context, builder, aty[0], src_)
        pp = _data(context, builder, aty[2], place_)
        dp = _data(context, builder, aty[5], dst_)

        def vptr(ptr, index):
            return builder.bitcast(builder.gep(ptr, [index], inbounds=True), vty.as_pointer())

        rows = []
        for q in range(vl):
            where = builder.load(builder.gep(pp, [builder.add(pofs_, i64(q))], inbounds=True))
            at = builder.add(sofs_, builder.mul(where, pscale_))
            rows.append(builder.load(vptr(sp, at), align=size))
        rows = transpose_block(builder, rows, vl)
        for i in range(vl):
            at = builder.add(dofs_, builder.mul(dstride_, i64(i)))
            builder.store(rows[i], vptr(dp, at), align=size)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def copy_out(src, sofs, place, pscale, ne, nval, vl, dst, dofs, dstride):
    """``dst[dofs + l*dstride + e] = src[sofs + place[e]*pscale + l]`` for e < ne, l < nval:
    a block's channel-last results (``vl`` lanes a vector) into channel-first rows, by
    register transposes where whole vl x vl blocks fit, element by element at the edges
    (~4x fewer instructions than copying element by element; faster from the Winograd row
    buffer, slower from the direct kernel's pooled rows: see benchmarks/NOTES.md)."""
    # the lanes of float32 and float64 vectors (AVX2: 8, 4; AVX-512: 16, 8); any other
    # width is copied element by element
    blocked = vl == 4 or vl == 8 or vl == 16
    lv = nval - nval % vl if blocked else 0
    ev = ne - ne % vl if blocked else 0
    for l0 in range(0, lv, vl):
        for e0 in range(0, ev, vl):
            if vl == 16:
                transpose_out(src, sofs + l0, place, e0, pscale, dst,
                              dofs + l0 * dstride + e0, dstride, 16)
            elif vl == 8:
                transpose_out(src, sofs + l0, place, e0, pscale, dst,
                              dofs + l0 * dstride + e0, dstride, 8)
            elif vl == 4:
                transpose_out(src, sofs + l0, place, e0, pscale, dst,
                              dofs + l0 * dstride + e0, dstride, 4)
    for l in range(nval):
        e_lo = ev if l < lv else 0
        row = dofs + l * dstride
        for e in range(e_lo, ne):
            dst[row + e] = src[sofs + place[e] * pscale + l]
