"""The transforms of Winograd's minimal filtering F(2x2, 3x3) and the copies into its
channel-last buffers (Numba CPU), shared by the matching/render kernel (``winograd``) and the
statistics kernel (``winograd_stats``).

* ``transformed_templates``: U = G g G^T of every template, once per call, in float64;
* ``input_transform`` / ``transform_blocks``: V = B^T d B of the 4x4 input blocks;
* ``output_transform``: z = A^T M A + bias, switched, into a row buffer;
* ``input_in`` / ``code_in`` / ``transpose_in``: an input sample, or an unpooled code times
  its switches, copied channel-last (VL x VL blocks by register transposes);
* ``any_non_finite``: the IR check the transforms use to flag a sample.

See ``winograd`` for the algorithm, its accuracy and its layout.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import buffers
from ._partition import PARALLEL, chunk_bounds
from ._tiles import channel_blocks
from ._vector import I1, I32, I64, literal_int, transpose_block, vector_helpers

__all__ = ["transformed_templates", "any_non_finite", "any_lane", "load_block",
           "input_transform", "transpose_in", "output_transform", "transform_blocks", "input_in",
           "code_in"]

_TRANSFORM_CHUNKS = 8  # template transform: work chunks (scratch each)


def transformed_templates(templates, vl, cpad):
    """U = G g G^T (computed in float64), laid out per channel block as [xi][c][lanes],
    channels padded with zeros to ``cpad``."""
    k = templates.shape[0]
    k0, nv, nvec = channel_blocks(k, vl)
    widths = nv * vl
    wofs = np.zeros(len(k0), dtype=np.int64)
    wofs[1:] = np.cumsum(16 * cpad * widths)[:-1]
    out = buffers.empty(16 * cpad * nvec * vl, templates.dtype)  # every element written
    # a compiled loop: the same float64 operations as whole-array NumPy ones, which took
    # ~0.45 ms a call in Python overhead (11 calls, 5 ms of a conv-small EG step)
    _transform_templates(templates, k0, widths, wofs, cpad, out)
    return out, k0, nv, wofs, nvec * vl


@njit(parallel=PARALLEL, cache=True)
def _transform_templates(templates, blk_k0, widths, wofs, cpad, out):
    """out[wofs[b] + (xi * cpad + c) * widths[b] + k - k0] = (G g[k, c] G^T)[xi] (float64
    arithmetic, rounded once) for template k of block b (first template k0), 0 for the
    padding (templates past K, channels past C). One (block, channel) pair at a time, so that
    the 16 rows it writes are contiguous; the pairs on both cores (11 calls a conv-small
    training step, ~0.1 ms each on one)."""
    nb = blk_k0.shape[0]
    wmax = widths.max()
    nitems = nb * cpad
    nchunks = min(nitems, _TRANSFORM_CHUNKS)
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, nitems)
        # scratch per chunk, not per item: a (block, channel) pair is ~1 us of work
        t = np.empty((4, 3), dtype=np.float64)
        u = np.empty((16, wmax), dtype=out.dtype)
        for item in range(lo, hi):
            _transform_pair(templates, blk_k0, widths, wofs, cpad, item // cpad,
                            item % cpad, t, u, out)


@njit(inline="always")
def _transform_pair(templates, blk_k0, widths, wofs, cpad, b, c, t, u, out):
    """The 16 rows of channel c of block b (see ``_transform_templates``)."""
    k_, c_ = templates.shape[:2]
    k0, w, base = blk_k0[b], widths[b], wofs[b]
    kw = min(w, k_ - k0) if c < c_ else 0
    for xi in range(16):
        for j in range(kw, w):
            u[xi, j] = 0
    for j in range(kw):
        k = k0 + j
        for v in range(3):       # G along the rows
            a0 = np.float64(templates[k, c, 0, v])
            a1 = np.float64(templates[k, c, 1, v])
            a2 = np.float64(templates[k, c, 2, v])
            t[0, v] = a0
            t[1, v] = (a0 + a1 + a2) * 0.5
            t[2, v] = (a0 - a1 + a2) * 0.5
            t[3, v] = a2
        for a in range(4):       # then along the columns
            a0, a1, a2 = t[a, 0], t[a, 1], t[a, 2]
            u[4 * a, j] = a0
            u[4 * a + 1, j] = (a0 + a1 + a2) * 0.5
            u[4 * a + 2, j] = (a0 - a1 + a2) * 0.5
            u[4 * a + 3, j] = a2
    for xi in range(16):
        at = base + (xi * cpad + c) * w
        for j in range(w):
            out[at + j] = u[xi, j]


def any_non_finite(builder, vectors):
    """(IR) An i1: whether any lane of any of the vectors is NaN or +-inf (v - v is 0 for a
    finite v and NaN otherwise)."""
    vty = vectors[0].type
    zero = ir.Constant(vty, [0.0] * vty.count)
    bad = None
    for val in vectors:
        ne = builder.fcmp_unordered("!=", builder.fsub(val, val), zero)
        bad = ne if bad is None else builder.or_(bad, ne)
    return any_lane(builder, bad)


def load_block(k, ptr, base, rs, cs, n):
    """(IR) The n x n block of vectors ``ptr[base + i*rs + j*cs]`` (row i, column j) of the
    ``VectorIR`` ``k``'s dtype."""
    b = k.builder
    return [[k.vload(ptr, b.add(base, b.add(b.mul(rs, I64(i)), b.mul(cs, I64(j)))))
             for j in range(n)] for i in range(n)]


def any_lane(builder, flags):
    """(IR) An i1: whether any lane of the i1 vector ``flags`` is set."""
    mask = builder.bitcast(flags, ir.IntType(flags.type.count))
    return builder.icmp_unsigned("!=", mask, ir.Constant(ir.IntType(flags.type.count), 0))


@intrinsic(prefer_literal=True)
def input_transform(typingctx, xp, base, cs, rs, v, vofs, vs, CHECK):
    """One vector of channels of ``V = B^T d B`` for a 4x4 block of the channel-last sample::

        d[i][j] = xp[base + i*rs + j*cs + l]             (l < VL lanes)
        v[vofs + (4 i + j)*vs + l] = (B^T d B)[i][j]

    with B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]. Returns, if the
    compile-time constant ``CHECK`` is 1, whether any V is non-finite (every d appears in
    some V with a coefficient +-1, so a non-finite d always shows), else False. No bounds
    checks.
    """
    check = bool(literal_int("input_transform", "CHECK", CHECK,
                             "it decides whether the non-finite test is emitted"))
    sig = types.boolean(xp, base, cs, rs, v, vofs, vs, CHECK)

    def codegen(context, builder, signature, args):
        k = vector_helpers(context, builder, xp.dtype, signature, args)
        base_, cs_, rs_, vofs_, vs_ = k.int64("base", "cs", "rs", "vofs", "vs")
        xptr, vptr = k.data("xp", "v")
        d = load_block(k, xptr, base_, rs_, cs_, 4)
        sub, add = builder.fsub, builder.fadd

        def bt(a0, a1, a2, a3):  # B^T applied to a column (or B to a row)
            return sub(a0, a2), add(a1, a2), sub(a2, a1), sub(a1, a3)

        cols = [bt(d[0][j], d[1][j], d[2][j], d[3][j]) for j in range(4)]  # cols[j][i]
        out = []
        for i in range(4):
            row = bt(*(cols[j][i] for j in range(4)))
            for j in range(4):
                k.vstore(row[j], vptr, builder.add(vofs_, builder.mul(vs_, I64(4 * i + j))))
            out.extend(row)
        return any_non_finite(builder, out) if check else I1(0)

    return sig, codegen


@intrinsic(prefer_literal=True)
def transpose_in(typingctx, src, sofs, sstride, sw, ind, f0, dst, place, c0, USE_SW, CHECK):
    """One VL x VL block of a dense code (or of an input) into the channel-last buffer,
    checking its argmax positions::

        for channel i < VL, position q < VL:
            val = src[sofs + i*sstride + q] (* sw[same] if USE_SW)
            dst[place[f0 + q] + c0 + i] = val
        returns (if CHECK) whether any ind[sofs + i*sstride + q] != f0 + q, else False

    (VL rows loaded, transposed in registers by log2(VL) stages of block swaps, VL rows
    stored.) ``src``, ``sw`` and ``dst`` share a float dtype, ``ind`` is int32, ``place``
    int64; ``USE_SW`` and ``CHECK`` are compile-time constants (without them ``sw`` and
    ``ind`` are not read). No bounds checks.
    """
    use_sw = bool(literal_int("transpose_in", "USE_SW", USE_SW,
                              "it decides whether the switches are read"))
    check = bool(literal_int("transpose_in", "CHECK", CHECK,
                             "it decides whether the positions are checked"))
    sig = types.boolean(src, sofs, sstride, sw, ind, f0, dst, place, c0, USE_SW, CHECK)

    def codegen(context, builder, signature, args):
        k = vector_helpers(context, builder, src.dtype, signature, args)
        vl = k.vl
        sofs_, sstr_, f0_, c0_ = k.int64("sofs", "sstride", "f0", "c0")
        sp, wp, ip, dp, pp = k.data("src", "sw", "ind", "dst", "place")
        want = builder.add(k.splat(builder.trunc(f0_, I32)), k.mask(range(vl)))
        rows, bad = [], None
        for i in range(vl):
            at = builder.add(sofs_, builder.mul(sstr_, I64(i)))
            val = k.vload(sp, at)
            if use_sw:
                val = builder.fmul(val, k.vload(wp, at))
            rows.append(val)
            if not check:
                continue
            ne = builder.icmp_unsigned("!=", k.vload(ip, at, k.ity), want)
            bad = ne if bad is None else builder.or_(bad, ne)
        rows = transpose_block(builder, rows, vl)
        for q in range(vl):
            k.vstore(rows[q], dp, builder.add(k.load(pp, builder.add(f0_, I64(q))), c0_))
        return any_lane(builder, bad) if check else I1(0)

    return sig, codegen


@intrinsic
def output_transform(typingctx, mb, mofs, ms, bias, bofs, leak, zb, o00, o01, o10, o11):
    """One vector of templates of ``z = A^T M A + bias``, switched, into the row buffer::

        m[i][j] = mb[mofs + (4 i + j)*ms + l]            (l < VL lanes)
        z[a][b] = (A^T m A)[a][b] + bias[bofs + l]
        zb[o_ab + l] = switch(z[a][b])                   (as conv_tile's epilogue)

    with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]. Returns whether any lane of any z is
    non-finite. No bounds checks.
    """
    sig = types.boolean(mb, mofs, ms, bias, bofs, leak, zb, o00, o01, o10, o11)

    def codegen(context, builder, signature, args):
        k = vector_helpers(context, builder, mb.dtype, signature, args)
        mofs_, ms_, bofs_ = k.int64("mofs", "ms", "bofs")
        outs = k.int64("o00", "o01", "o10", "o11")
        switch = k.switch(k.arg("leak", mb.dtype))
        mptr, bptr, zptr = k.data("mb", "bias", "zb")
        m = [[k.vload(mptr, builder.add(mofs_, builder.mul(ms_, I64(4 * i + j))))
              for j in range(4)] for i in range(4)]
        sub, add = builder.fsub, builder.fadd

        def at(a0, a1, a2, a3):  # A^T applied to a column (or A to a row)
            return add(add(a0, a1), a2), sub(sub(a1, a2), a3)

        cols = [at(m[0][j], m[1][j], m[2][j], m[3][j]) for j in range(4)]  # cols[j][a]
        bv = k.vload(bptr, bofs_)
        zs = []
        for a in range(2):
            row = at(*(cols[j][a] for j in range(4)))
            for b in range(2):
                z = add(row[b], bv)
                zs.append(z)
                k.vstore(switch(z), zptr, outs[2 * a + b])
        return any_non_finite(builder, zs)

    return sig, codegen


@njit(inline="always")
def transform_blocks(xp, wrow, cpad, th, tw, s, vl, v, vstride, check):
    """V of every 4x4 block (th x tw blocks at stride 2) of the channel-last buffer into
    sample slot ``s`` of v; with ``check``, whether any V is non-finite (else False)."""
    bad = False
    for ti in range(th):
        for tj in range(tw):
            src = (2 * ti * wrow + 2 * tj) * cpad
            dst = ((s * th + ti) * tw + tj) * cpad
            for q in range(0, cpad, vl):
                if check:
                    bad |= input_transform(xp, src + q, cpad, wrow * cpad, v, dst + q,
                                           vstride, 1)
                else:
                    input_transform(xp, src + q, cpad, wrow * cpad, v, dst + q, vstride, 0)
    return bad


@njit(inline="always")
def input_in(xf, n, c_, plane, vl, place, buf):
    """Sample n of the flat (N, C, plane) input into the channel-last buffer (pixel f,
    channel c at ``buf[place[f] + c]``): VL x VL blocks by register transposes, the edges
    element by element; the border is left as it is."""
    fv = plane - plane % vl
    cv = c_ - c_ % vl
    for c0 in range(0, cv, vl):
        for f0 in range(0, fv, vl):
            transpose_in(xf, (n * c_ + c0) * plane + f0, plane, xf, place, f0, buf, place, c0,
                         0, 0)
    for f in range(plane):  # the rest: channels >= cv, pixels >= fv
        for c in range(cv if f < fv else 0, c_):
            buf[place[f] + c] = xf[(n * c_ + c) * plane + f]


@njit(inline="always")
def code_in(codef, indf, swf, use_sw, dense, n, k_, units, plane, vl, place, buf):
    """The unpooled code of sample n, times the switches, into a channel-last buffer: plane
    position f, template k at ``buf[place[f] + k]``. ``codef``, ``indf`` and ``swf`` are the
    flat (N, K, units) code, positions and switches.

    A dense code (units == plane) is copied by VL x VL register transposes, and the result
    is whether its positions were not the identity (the caller redoes that sample). Otherwise
    the plane is zeroed and the units are added in row-major order per template, so
    collisions add up as in the reference; the result is False.
    """
    if dense:
        fv = plane - plane % vl
        kv = k_ - k_ % vl
        mismatch = False
        for k0 in range(0, kv, vl):
            for f0 in range(0, fv, vl):
                at = (n * k_ + k0) * plane + f0
                if use_sw:
                    mismatch |= transpose_in(codef, at, plane, swf, indf, f0, buf, place, k0,
                                             1, 1)
                else:
                    mismatch |= transpose_in(codef, at, plane, swf, indf, f0, buf, place, k0,
                                             0, 1)
        for f in range(plane):  # the rest: templates >= kv, positions >= fv
            for k in range(kv if f < fv else 0, k_):
                at = (n * k_ + k) * plane + f
                val = codef[at]
                if use_sw:
                    val = val * swf[at]
                mismatch |= indf[at] != f
                buf[place[f] + k] = val
        return mismatch
    for f in range(plane):
        for k in range(k_):
            buf[place[f] + k] = 0
    # one template at a time: the code, positions and switches read contiguously (the
    # buffer, 16-64 KiB, takes the scattered adds from L1/L2); per template the units still
    # add in row-major order, so collisions sum as in the reference
    for k in range(k_):
        at0 = (n * k_ + k) * units
        for u in range(units):
            val = codef[at0 + u]
            if use_sw:
                val = val * swf[at0 + u]
            buf[place[indf[at0 + u]] + k] += val
    return False
