"""The SIMD micro-kernels of the Numba CPU backend and their register-tile sizes.

The hot loops are Numba intrinsics that emit LLVM vector IR directly (their shared IR idioms
are in ``_vector``):

* ``conv_tile`` -- the register-blocked matching kernel: ``NV`` vectors of output channels
  times ``P`` output pixels of accumulators stay in registers for the whole reduction over
  the taps, then bias + switch are applied on the way out;
* ``gemm_tile`` -- the same register tile accumulating ``A^T B`` into memory;
* ``dot_tile`` -- ``P`` dot products of one weight vector with ``P`` data vectors;
* ``pool_step`` -- one max-pooling candidate for ``NV`` vectors of channels (compare, select
  value and index; the NaN rule of the reference);
* ``gather_dots`` -- sparse-times-dense accumulation (a list of scalars times shifted rows of
  a dense buffer) for ``NL`` shifts x ``NV`` vectors, accumulators in registers;
* ``axpy`` -- ``y += alpha * x`` in full vectors plus a scalar tail;
* ``transpose_out`` / ``copy_out`` -- channel-last results into channel-first rows.

They are intrinsics because Numba's loop vectoriser only widens innermost loops (so
accumulators would go through memory on every tap), targets 256-bit vectors on AVX-512
machines, and emits runtime alias checks; explicit vector IR keeps accumulators in registers
and uses the host's full vector width.

A tile's shape (``NV``, ``P``, ``NL``, ``FIRST``, ``VL``) fixes how many accumulators the
code holds, so it is a compile-time constant: pass a literal, or pass the shape at run time
and (for ``NV`` with ``P``) the table of sizes (``PIX``, ``GPIX``); the intrinsic then emits
one tile per size under a ladder on the run-time value, as a hand-written
``if nv == 4: ... elif ...`` would.

Everything is deterministic: every accumulator adds its terms in a fixed order with
``llvm.fmuladd`` (fused where the CPU has FMA). Caution: Numba's cache of a kernel is
invalidated by changes to the kernel's own file only; clear ``__pycache__`` after editing
this module.
"""

from __future__ import annotations

from typing import NamedTuple

import llvmlite.ir as ir
from numba import njit, types
from numba.core import errors
from numba.extending import intrinsic

from ._vector import (I32, I64, VBYTES, counted_loop, literal_int, literal_ints,
                      transpose_block, vector_helpers)

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

# The shapes a run-time argument dispatches over, largest first (the last takes any other).
GATHER_BLOCKS = (4, 2, 1)       # gather_dots' NV and NL (powers of two: see _pow2_block)
DOT_PIXELS = (8, 4, 2, 1)       # dot_tile's P
BLOCK_LANES = (16, 8, 4)        # transpose_out's VL: float32/float64 lanes; no other width

_WHY_NV = "it sets how many vectors of accumulators the tile holds in registers"
_WHY_P = "it sets how many pixels of accumulators the tile holds in registers"


class Shape(NamedTuple):
    """How an intrinsic's shape argument ``name`` is chosen: one compile-time case, or a
    ladder over ``cases`` on its run-time value (``truth``: as a flag, any true value being
    case 1; ``default``: the last case takes every other value)."""
    name: str
    runtime: bool
    cases: tuple
    truth: bool = False
    default: bool = True


def _choice(intrinsic_name, name, ty, why, cases=None, truth=False, default=True):
    """The ``Shape`` of argument ``name`` of type ``ty``: a compile-time integer (or boolean)
    is its one case; a run-time integer or boolean dispatches over ``cases`` where the
    intrinsic has them; anything else is a TypingError saying so."""
    if cases is None or isinstance(ty, types.Literal):
        return Shape(name, False, (literal_int(intrinsic_name, name, ty, why),))
    if isinstance(ty, (types.Integer, types.Boolean)):
        return Shape(name, True, tuple(cases), truth, default)
    raise errors.TypingError(
        f"{intrinsic_name}: argument {name} must be an integer ({why}): a compile-time "
        f"constant, or a run-time value dispatched over {tuple(cases)}; got {ty}")


def _tile_shapes(intrinsic_name, NV, P):
    """``(the Shape of NV, {nv: pixels})`` of a register tile: ``NV`` and ``P`` compile-time
    integers, or ``P`` a table of pixels by NV (``PIX``, ``GPIX``) with ``NV`` a compile-time
    or a run-time integer (then NV = len(P) - 1 .. 1)."""
    if isinstance(P, types.BaseTuple):
        table = literal_ints(intrinsic_name, "P", P, "the pixels of a tile by NV")
        nv = _choice(intrinsic_name, "NV", NV, _WHY_NV, range(len(table) - 1, 0, -1))
        if not all(0 < case < len(table) for case in nv.cases):
            raise errors.TypingError(f"{intrinsic_name}: NV={nv.cases[0]} is not in the "
                                     f"table of tile sizes P={table}")
        return nv, {case: table[case] for case in nv.cases}
    nv = literal_int(intrinsic_name, "NV", NV, _WHY_NV + ", or pass P as a table such as PIX")
    npx = literal_int(intrinsic_name, "P", P, _WHY_P + ", or a table of them by NV such as PIX")
    return Shape("NV", False, (nv,)), {nv: npx}


def _codegen(dtype, shapes, emit):
    """The code generator of a micro-kernel on vectors of ``dtype``: ``emit(k, *cases)``
    with ``k`` the ``VectorIR`` (the arguments by name), once per combination of the
    ``shapes``' cases, under ladders on the run-time ones (outermost first)."""

    def codegen(context, builder, signature, args):
        k = vector_helpers(context, builder, dtype, signature, args)
        choices = [(_value(k, shape) if shape.runtime else None, shape.cases, shape.default)
                   for shape in shapes]
        k.dispatch(choices, lambda *cases: emit(k, *cases))
        return context.get_dummy_value()

    return codegen


def _value(k, shape):
    """The run-time value a ladder tests, as an i64 (a flag: 1 for any true value)."""
    if shape.truth:
        return k.builder.zext(k.arg(shape.name, types.boolean), I64)
    return k.int64(shape.name)


@intrinsic(prefer_literal=True)
def conv_tile(typingctx, w, wofs, x, xb, off, ntaps, bias, bofs, z, zofs, zstride, leak, NV, P):
    """Register-blocked matching of ``P`` pixels against ``NV`` vectors of templates.

    For pixel p < P and channel lane l < NV*VL (VL lanes per vector)::

        acc = bias[bofs + l]
        for t in range(ntaps):                    # fixed order
            acc = fmuladd(w[wofs + t*NV*VL + l], x[xb[p] + off[t]], acc)
        z[zofs + p*zstride + l] = acc if (acc > 0 or acc is NaN) else (0 if leak == 0 else leak*acc)

    ``w``, ``x``, ``bias`` and ``z`` are 1-d arrays of one float dtype; ``xb`` and ``off`` are
    1-d int64 arrays; ``NV`` and ``P`` are compile-time constants, or ``P`` is the table of
    pixels by NV (``PIX`` or ``GPIX``) and ``NV`` may be a run-time value. No bounds checks:
    the caller guarantees every address is in range.
    """
    nv, pixels = _tile_shapes("conv_tile", NV, P)
    sig = types.void(w, wofs, x, xb, off, ntaps, bias, bofs, z, zofs, zstride, leak, NV, P)
    return sig, _codegen(w.dtype, [nv], lambda k, nv: _conv_tile(k, nv, pixels[nv]))


def _conv_tile(k, nv, npx):
    builder, vl = k.builder, k.vl
    wofs, ntaps, bofs, zofs, zstride = k.int64("wofs", "ntaps", "bofs", "zofs", "zstride")
    leak = k.arg("leak", k.dtype)
    wp, xp, xbp, offp, bp, zp = k.data("w", "x", "xb", "off", "bias", "z")
    bases = [k.load(xbp, I64(p)) for p in range(npx)]
    init = [k.vload(bp, builder.add(bofs, I64(v * vl))) for v in range(nv)]

    def step(t, accs):
        o = k.load(offp, t)
        wbase = builder.add(wofs, builder.mul(t, I64(nv * vl)))
        wv = [k.vload(wp, builder.add(wbase, I64(v * vl))) for v in range(nv)]
        updated = []
        for p in range(npx):
            xs = k.splat(k.load(xp, builder.add(bases[p], o)))
            for v in range(nv):
                updated.append(k.fmuladd(wv[v], xs, accs[p * nv + v]))
        return updated

    accs, _ = counted_loop(builder, "tile", I64(0), ntaps, 1, init * npx, step)
    switch = k.switch(leak)
    for p in range(npx):
        row = builder.add(zofs, builder.mul(I64(p), zstride))
        for v in range(nv):
            k.vstore(switch(accs[p * nv + v]), zp, builder.add(row, I64(v * vl)))


@intrinsic(prefer_literal=True)
def pool_step(typingctx, z, zofs, best, barg, bofs, flat, NV, FIRST):
    """One pooling candidate for ``NV`` vectors of channels (lane l < NV*VL)::

        v = z[zofs + l]; cb = best[bofs + l]
        FIRST:  best[bofs + l] = v;  barg[bofs + l] = flat
        else:   take = (cb == cb) and (v > cb or v != v)     # the first NaN wins and sticks
                if take: best[bofs + l] = v;  barg[bofs + l] = flat

    ``z`` and ``best`` share a float dtype, ``barg`` is int32. ``NV`` (1..4) and ``FIRST``
    are compile-time constants, or run-time values to dispatch on (any other NV takes 1).
    No bounds checks.
    """
    nv = _choice("pool_step", "NV", NV, _WHY_NV, range(len(PIX) - 1, 0, -1))
    first = _choice("pool_step", "FIRST", FIRST, "the first candidate is stored, not compared",
                    (1, 0), truth=True)
    sig = types.void(z, zofs, best, barg, bofs, flat, NV, FIRST)
    return sig, _codegen(z.dtype, [first, nv], lambda k, first, nv: _pool_step(k, nv, first))


def _pool_step(k, nv, first):
    builder, vl = k.builder, k.vl
    zofs, bofs = k.int64("zofs", "bofs")
    zp, bp, ap = k.data("z", "best", "barg")
    flatv = k.splat(k.arg("flat", types.int32))
    for v in range(nv):
        zat, bat = builder.add(zofs, I64(v * vl)), builder.add(bofs, I64(v * vl))
        val = k.vload(zp, zat)
        if first:
            k.vstore(val, bp, bat)
            k.vstore(flatv, ap, bat)
            continue
        cur = k.vload(bp, bat)
        arg = k.vload(ap, bat, k.ity)
        take = builder.and_(builder.fcmp_ordered("ord", cur, cur),
                            builder.or_(builder.fcmp_ordered(">", val, cur),
                                        builder.fcmp_unordered("uno", val, val)))
        k.vstore(builder.select(take, val, cur), bp, bat)
        k.vstore(builder.select(take, flatv, arg), ap, bat)


@intrinsic
def axpy(typingctx, y, yofs, alpha, x, xofs, n):
    """``y[yofs + i] = fmuladd(alpha, x[xofs + i], y[yofs + i])`` for i < n, in full SIMD
    vectors then a scalar tail. Every element is updated independently (no reduction), so
    the result does not depend on the split. ``x`` and ``y`` must not overlap; no bounds
    checks."""
    sig = types.void(y, yofs, alpha, x, xofs, n)

    def codegen(context, builder, signature, args):
        k = vector_helpers(context, builder, y.dtype, signature, args)
        vl = k.vl
        yofs_, xofs_, n_ = k.int64("yofs", "xofs", "n")
        alpha_ = k.arg("alpha", k.dtype)
        yp = builder.gep(k.data("y"), [yofs_], inbounds=True)
        xp = builder.gep(k.data("x"), [xofs_], inbounds=True)
        av = k.splat(alpha_)
        nvec_end = builder.mul(builder.sdiv(n_, I64(vl)), I64(vl))

        def vbody(i, _):
            k.vstore(k.fmuladd(av, k.vload(xp, i), k.vload(yp, i)), yp, i)
            return []

        def sbody(i, _):
            py_ = builder.gep(yp, [i], inbounds=True)
            builder.store(k.fmuladd(alpha_, k.load(xp, i), builder.load(py_)), py_)
            return []

        _, iv = counted_loop(builder, "axpy", I64(0), nvec_end, vl, [], vbody)
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

    ``acc``, ``u`` and ``qval`` share a float dtype; ``qoff`` is int64. ``NV`` and ``NL``
    are compile-time constants, or run-time values of ``GATHER_BLOCKS`` (4, 2, 1) to dispatch
    on (any other value takes 1). No bounds checks.
    """
    nv = _choice("gather_dots", "NV", NV, _WHY_NV, GATHER_BLOCKS)
    nl = _choice("gather_dots", "NL", NL, "it sets how many shifts of accumulators the tile "
                 "holds", GATHER_BLOCKS)
    sig = types.void(acc, aofs, astep, u, qoff, qval, start, count, shift, sstep, NV, NL)
    return sig, _codegen(u.dtype, [nl, nv], lambda k, nl, nv: _gather_dots(k, nv, nl))


def _gather_dots(k, nv, nl):
    builder, vl = k.builder, k.vl
    aofs, astep, start, count, shift, sstep = k.int64("aofs", "astep", "start", "count",
                                                      "shift", "sstep")
    end = builder.add(start, count)
    ap, up, op, vp = k.data("acc", "u", "qoff", "qval")
    shifts = [builder.add(shift, builder.mul(sstep, I64(m))) for m in range(nl)]

    def step(t, accs):
        base = k.load(op, t)
        sv = k.splat(k.load(vp, t))
        new = []
        for m in range(nl):
            row = builder.add(base, shifts[m])
            for v in range(nv):
                val = k.vload(up, builder.add(row, I64(v * vl)))
                new.append(k.fmuladd(sv, val, accs[m * nv + v]))
        return new

    accs, _ = counted_loop(builder, "gd", start, end, 1, [k.zero] * (nl * nv), step)
    for m in range(nl):
        row = builder.add(aofs, builder.mul(astep, I64(m)))
        for v in range(nv):
            at = builder.add(row, I64(v * vl))
            k.vstore(builder.fadd(k.vload(ap, at), accs[m * nv + v]), ap, at)


@intrinsic(prefer_literal=True)
def gemm_tile(typingctx, acc, aofs, a, abase, aoff, b, boff, t0, t1, NV, P):
    """Register-blocked ``acc += A^T B`` over a list of reduction steps, accumulating into
    memory. For p < P and lane l < NV*VL::

        s = acc[aofs[p] + l]
        for t in range(t0, t1):                   # fixed order
            s = fmuladd(b[boff[t] + l], a[abase[p] + aoff[t]], s)
        acc[aofs[p] + l] = s

    ``acc``, ``a`` and ``b`` share a float dtype; ``aofs``, ``abase``, ``aoff`` and ``boff``
    are 1-d int64 arrays; ``NV`` and ``P`` as ``conv_tile``'s (``P`` usually ``GPIX``). Two
    tiles p, p' may share an ``aofs`` only if what they write there is never read (scratch).
    No bounds checks.
    """
    nv, pixels = _tile_shapes("gemm_tile", NV, P)
    sig = types.void(acc, aofs, a, abase, aoff, b, boff, t0, t1, NV, P)
    return sig, _codegen(acc.dtype, [nv], lambda k, nv: _gemm_tile(k, nv, pixels[nv]))


def _gemm_tile(k, nv, npx):
    builder, vl = k.builder, k.vl
    t0, t1 = k.int64("t0", "t1")
    cp, cop, ap, abp, aop, bp, bop = k.data("acc", "aofs", "a", "abase", "aoff", "b", "boff")
    bases = [builder.gep(ap, [k.load(abp, I64(p))], inbounds=True) for p in range(npx)]
    couts = [k.load(cop, I64(p)) for p in range(npx)]
    init = [k.vload(cp, builder.add(couts[p], I64(v * vl)))
            for p in range(npx) for v in range(nv)]

    def step(t, accs):
        oa = k.load(aop, t)
        ob = k.load(bop, t)
        bv = [k.vload(bp, builder.add(ob, I64(v * vl))) for v in range(nv)]
        updated = []
        for p in range(npx):
            xs = k.splat(k.load(bases[p], oa))
            for v in range(nv):
                updated.append(k.fmuladd(bv[v], xs, accs[p * nv + v]))
        return updated

    accs, _ = counted_loop(builder, "gemm", t0, t1, 1, init, step)
    for p in range(npx):
        for v in range(nv):
            k.vstore(accs[p * nv + v], cp, builder.add(couts[p], I64(v * vl)))


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
    constant, or a run-time value of ``DOT_PIXELS`` (8, 4, 2, 1) to dispatch on (any other
    value takes 1). No bounds checks.
    """
    npx = _choice("dot_tile", "P", P, _WHY_P, DOT_PIXELS)
    sig = types.void(out, w, wofs, x, bases, woff, xoff, nsteps, P)
    return sig, _codegen(x.dtype, [npx], _dot_tile)


def _dot_tile(k, npx):
    builder, vl = k.builder, k.vl
    wofs, nsteps = k.int64("wofs", "nsteps")
    op = k.data("out")
    wp = builder.gep(k.data("w"), [wofs], inbounds=True)
    xp, bp, wop, xop = k.data("x", "bases", "woff", "xoff")
    starts = [builder.gep(xp, [k.load(bp, I64(p))], inbounds=True) for p in range(npx)]

    def step(t, accs):
        wv = k.vload(wp, k.load(wop, t))
        ox = k.load(xop, t)
        return [k.fmuladd(wv, k.vload(starts[p], ox), accs[p]) for p in range(npx)]

    accs, _ = counted_loop(builder, "dot", I64(0), nsteps, 1, [k.zero] * npx, step)
    undef = ir.Constant(k.vty, ir.Undefined)
    for p in range(npx):
        s, width = accs[p], vl
        while width > 1:  # add the upper half of the lanes onto the lower half
            width //= 2
            upper = builder.shuffle_vector(
                s, undef, k.mask([width + l if l < width else l for l in range(vl)]))
            s = builder.fadd(s, upper)
        builder.store(builder.extract_element(s, I32(0)),
                      builder.gep(op, [I64(p)], inbounds=True))


@intrinsic(prefer_literal=True)
def transpose_out(typingctx, src, sofs, place, pofs, pscale, dst, dofs, dstride, VL):
    """One VL x VL block from a channel-last buffer to channel-first rows::

        for position q < VL, channel i < VL:
            dst[dofs + i*dstride + q] = src[sofs + place[pofs + q]*pscale + i]

    (VL vectors loaded, one per position, transposed in registers by log2(VL) stages of
    block swaps, VL vectors stored, one per channel.) ``src`` and ``dst`` share a dtype
    (float, or int32 for positions), ``place`` is int64; ``VL`` (a power of two) is a
    compile-time constant, or a run-time value of ``BLOCK_LANES`` (16, 8, 4; any other
    value copies nothing). No bounds checks.
    """
    vl = _choice("transpose_out", "VL", VL, "it sets the lanes of the vectors transposed",
                 BLOCK_LANES, default=False)
    if src.dtype != dst.dtype:
        raise errors.TypingError(f"transpose_out: src ({src.dtype}) and dst ({dst.dtype}) "
                                 "must share a dtype")
    sig = types.void(src, sofs, place, pofs, pscale, dst, dofs, dstride, VL)
    return sig, _codegen(src.dtype, [vl], _transpose_out)


def _transpose_out(k, vl):
    k = k.with_lanes(vl)
    builder = k.builder
    sofs, pofs, pscale, dofs, dstride = k.int64("sofs", "pofs", "pscale", "dofs", "dstride")
    sp, pp, dp = k.data("src", "place", "dst")
    rows = []
    for q in range(vl):
        where = k.load(pp, builder.add(pofs, I64(q)))
        rows.append(k.vload(sp, builder.add(sofs, builder.mul(where, pscale))))
    rows = transpose_block(builder, rows, vl)
    for i in range(vl):
        k.vstore(rows[i], dp, builder.add(dofs, builder.mul(dstride, I64(i))))


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
            transpose_out(src, sofs + l0, place, e0, pscale, dst, dofs + l0 * dstride + e0,
                          dstride, vl)
    for l in range(nval):
        e_lo = ev if l < lv else 0
        row = dofs + l * dstride
        for e in range(e_lo, ne):
            dst[row + e] = src[sofs + place[e] * pscale + l]
