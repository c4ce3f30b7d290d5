"""3x3 template matching by Winograd's minimal filtering F(2x2, 3x3) (Numba CPU).

Why
---
On the 3x3 layers with many channels the direct kernel (``matching._match_planes``) already
runs at 60-85 % of the machine's sgemm rate, so it cannot get much faster by doing the same
multiplications. F(2x2, 3x3) computes a 2x2 block of outputs from a 4x4 block of inputs with
16 multiplications per (input channel, template) instead of 36: the correlation becomes 16
independent matrix products, one per point of the 4x4 transform domain (Lavin & Gray, "Fast
Algorithms for Convolutional Neural Networks", 2016)::

    U[xi, c, k]    = (G g[k, c] G^T)[xi]           templates, once per call (float64, rounded)
    V[xi, t, c]    = (B^T d[t, c] B)[xi]           the 4x4 input block of tile t
    M[xi, t, k]    = sum_c V[xi, t, c] U[xi, c, k] (the products: ``conv_tile`` with the
                                                    switch off, leak = 1)
    z[t, k] (2x2)  = A^T M[:, t, k] A + bias[k]

then the switch and the max-pooling exactly as in the direct kernel (same row buffer, same
``_pool_group``; a 1x1 window has nothing to pool and goes straight from the row buffer), so
only the rounding of z differs from it (a few ulps more; exact on integer data, where every
intermediate is an integer or a half). A 1x1 window's z goes to h by register transposes
(``_common.copy_out``); pooled results are copied out element by element (the transposes
measured no faster there).

Non-finite values: a NaN/inf pixel reaches in the transform domain exactly the outputs whose
receptive field holds it (the supports of B and A are those of the 3x3 window), and every
value computed from a non-finite one is non-finite, so z is non-finite exactly where the
direct z is. But the kind can differ (inf - inf = NaN in the transforms where the direct sum
has one inf), so any sample with a non-finite z is flagged and recomputed by the direct
kernel; so is one whose transforms overflow. Non-finite templates or bias never come here.

Accuracy: the transforms pair each input with the weights of other taps, so z's error is
bounded by (C + 12) u sum_c sum_{a,b} K(a, b) |x_c,a| |w_kc,b| rather than by the classical
u * sum |w||x| (a large input on a small or zero weight breaks the latter). Every call runs
``screen``, an a-priori check of each 2x2 tile against the contract of ``kernels.contracts``
(c = 256): matching recomputes directly the pooling windows that touch a flagged tile,
match_at the units read there, render redoes flagged samples. Where nothing is flagged
(standard-normal or ReLU inputs; ~1 % of the tiles of MNIST's second layer are) the results
are the kernel's own, bit for bit.

The same kernel renders (``render``): the transposed correlation of the unpooled code is a
correlation with the flipped, transposed templates, and the code is unpooled (times the
switches) straight into the kernel's channel-last buffer; bias 0, leak 1 and pool 1 make the
epilogue a copy. A dense code (an unpooled layer's) is copied by VL x VL register
transposes (``transpose_in``), which also check that its argmax positions are the identity
(a sample where they are not is flagged and redone).

Layout and work split: as in the direct kernel, work items are (samples, channel block)
pairs in contiguous chunks per thread (one sample per item, or several when the plane is
small: their blocks then share the product calls). A thread copies each of its samples
channel-last into a zero-padded buffer (VL x VL blocks by register transposes, ``input_in``:
l2 match 3.4 -> 2.95 ms, l3 5.9 -> 5.4 at N = 128) and transforms it whole (V, 16 x tiles
x C), then for each channel block walks groups of tile rows: 16 products into a small M
buffer, the output transform + bias + switch into the row buffer, pooling straight into
``h``/``idx``. The
planes of V and M are one vector more than a multiple of 4 KiB apart (else all 16 streams of
a block share one L1 set), and the micro-kernel runs on gemm_tile's tile sizes.
"""

from __future__ import annotations

import functools

import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import buffers
from ._common import (GPIX, NV_MAX, PARALLEL, PIX_MAX, _data, chunk_bounds, conv_tile,
                      copy_out, lanes, num_chunks, transpose_block, vector_empty, vector_helpers,
                      vector_zeros)
from .matching import _blocks, _pool_group

__all__ = ["applies", "match_switch_pool", "match_at_applies", "match_at", "render_applies",
           "render"]

_MIN_CHANNELS = 16   # below this the transforms cost as much as the products they save
_SPI = None          # samples per item, forced (benchmarks, tests); None: chosen
_TRANSFORM_CHUNKS = 8  # template transform: work chunks (scratch each)
_MAX_TILES = 48      # tiles per group: M stays small (16 x 48 x 64 floats = 192 KiB)
_MATCH_AT_SHARE = 0.05  # match_at: the least share of the plane's units worth a whole plane
_SCREEN = True       # False: no accuracy screen (only to measure its cost: results may then
                     # break the accuracy contract)
#: Whether the ops' automatic choice may take these kernels (``algorithm="winograd"`` and the
#: modules' force switches always can). Off: with a sound accuracy screen the Winograd kernels
#: no longer pay. On MNIST's layer-2 input the screen flags ~20 % of the (sample, template,
#: tile) triples and the screened matching took 70-97 ms against 13-15 ms for the direct
#: kernel (N = 128, 32 -> 64 channels, 16x16); on data it never flags, the screen's 5 ms ate
#: the 5 ms that Winograd saves (8 vs 13 ms). A screen folded into the transform pass (a few
#: per cent) with a tighter per-output room is what would bring them back.
AUTO = False


def saves_products(plane):
    """Whether 16 products per 2x2 block of the (ho, wo) plane are at most 0.9x the 9 per
    position of the direct way (not so on tiny or thin planes: half-used blocks)."""
    ho, wo = plane
    return -(-ho // 2) * -(-wo // 2) * 16 <= 0.9 * 9 * ho * wo


def applies(x, templates, bias, padding=(0, 0)):
    """Whether the Winograd kernel takes this call: 3x3 templates, enough input channels and
    templates, finite templates and bias, a plane where it saves products."""
    k, c, kh, kw = templates.shape
    plane = (x.shape[2] + 2 * padding[0] - 2, x.shape[3] + 2 * padding[1] - 2)
    return (kh == 3 and kw == 3 and c >= _MIN_CHANNELS and k >= _MIN_CHANNELS
            and saves_products(plane)
            and bool(np.isfinite(templates).all()) and bool(np.isfinite(bias).all()))


def _transformed_templates(templates, vl, cpad):
    """U = G g G^T (computed in float64), laid out per channel block as [xi][c][lanes],
    channels padded with zeros to ``cpad``."""
    k = templates.shape[0]
    k0, nv, nvec = _blocks(k, vl)
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
    mask = builder.bitcast(bad, ir.IntType(vty.count))
    return builder.icmp_unsigned("!=", mask, ir.Constant(ir.IntType(vty.count), 0))


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
    if not isinstance(CHECK, types.IntegerLiteral):
        return None
    check = bool(CHECK.literal_value)
    sig = types.boolean(xp, base, cs, rs, v, vofs, vs, CHECK)

    def codegen(context, builder, signature, args):
        xp_, base_, cs_, rs_, v_, vofs_, vs_, _ = args
        aty = signature.args
        _, vload, vstore, _ = vector_helpers(context, builder, xp.dtype)
        i64 = ir.IntType(64)
        base_, cs_, rs_ = (context.cast(builder, a, t, types.int64)
                           for a, t in ((base_, aty[1]), (cs_, aty[2]), (rs_, aty[3])))
        vofs_, vs_ = (context.cast(builder, a, t, types.int64)
                      for a, t in ((vofs_, aty[5]), (vs_, aty[6])))
        xptr = _data(context, builder, aty[0], xp_)
        vptr = _data(context, builder, aty[4], v_)
        d = [[vload(xptr, builder.add(base_, builder.add(builder.mul(rs_, i64(i)),
                                                         builder.mul(cs_, i64(j)))))
              for j in range(4)] for i in range(4)]
        sub, add = builder.fsub, builder.fadd

        def bt(a0, a1, a2, a3):  # B^T applied to a column (or B to a row)
            return sub(a0, a2), add(a1, a2), sub(a2, a1), sub(a1, a3)

        cols = [bt(d[0][j], d[1][j], d[2][j], d[3][j]) for j in range(4)]  # cols[j][i]
        out = []
        for i in range(4):
            row = bt(*(cols[j][i] for j in range(4)))
            for j in range(4):
                vstore(row[j], vptr, builder.add(vofs_, builder.mul(vs_, i64(4 * i + j))))
            out.extend(row)
        return any_non_finite(builder, out) if check else ir.Constant(ir.IntType(1), 0)

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
    if not isinstance(USE_SW, types.IntegerLiteral) or not isinstance(CHECK, types.IntegerLiteral):
        return None
    use_sw = bool(USE_SW.literal_value)
    check = bool(CHECK.literal_value)
    sig = types.boolean(src, sofs, sstride, sw, ind, f0, dst, place, c0, USE_SW, CHECK)

    def codegen(context, builder, signature, args):
        src_, sofs_, sstr_, sw_, ind_, f0_, dst_, place_, c0_, _, _ = args
        aty = signature.args
        vty, vload, vstore, _ = vector_helpers(context, builder, src.dtype)
        vl = vty.count
        i32, i64 = ir.IntType(32), ir.IntType(64)
        ity = ir.VectorType(i32, vl)
        sofs_, sstr_, f0_, c0_ = (context.cast(builder, a, t, types.int64) for a, t in
                                  ((sofs_, aty[1]), (sstr_, aty[2]), (f0_, aty[5]),
                                   (c0_, aty[8])))
        sp = _data(context, builder, aty[0], src_)
        wp = _data(context, builder, aty[3], sw_)
        ip = _data(context, builder, aty[4], ind_)
        dp = _data(context, builder, aty[6], dst_)
        pp = _data(context, builder, aty[7], place_)
        f0v = builder.trunc(f0_, i32)
        undef = ir.Constant(ity, ir.Undefined)
        want = builder.add(builder.shuffle_vector(builder.insert_element(undef, f0v, i32(0)),
                                                  undef, ir.Constant(ity, [0] * vl)),
                           ir.Constant(ity, list(range(vl))))
        rows, bad = [], None
        for i in range(vl):
            at = builder.add(sofs_, builder.mul(sstr_, i64(i)))
            val = vload(sp, at)
            if use_sw:
                val = builder.fmul(val, vload(wp, at))
            rows.append(val)
            if not check:
                continue
            got = builder.load(builder.bitcast(builder.gep(ip, [at], inbounds=True),
                                               ity.as_pointer()), align=4)
            ne = builder.icmp_unsigned("!=", got, want)
            bad = ne if bad is None else builder.or_(bad, ne)
        rows = transpose_block(builder, rows, vl)
        for q in range(vl):
            where = builder.load(builder.gep(pp, [builder.add(f0_, i64(q))], inbounds=True))
            vstore(rows[q], dp, builder.add(where, c0_))
        if not check:
            return ir.Constant(ir.IntType(1), 0)
        mask = builder.bitcast(bad, ir.IntType(vl))
        return builder.icmp_unsigned("!=", mask, ir.Constant(ir.IntType(vl), 0))

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
        mb_, mofs_, ms_, b_, bofs_, leak_, zb_, *outs = args
        aty = signature.args
        dt = mb.dtype
        vty, vload, vstore, splat = vector_helpers(context, builder, dt)
        i64 = ir.IntType(64)
        mofs_, ms_ = (context.cast(builder, a, t, types.int64)
                      for a, t in ((mofs_, aty[1]), (ms_, aty[2])))
        bofs_ = context.cast(builder, bofs_, aty[4], types.int64)
        outs = [context.cast(builder, o, t, types.int64) for o, t in zip(outs, aty[7:])]
        leak_ = context.cast(builder, leak_, aty[5], dt)
        mptr = _data(context, builder, aty[0], mb_)
        bptr = _data(context, builder, aty[3], b_)
        zptr = _data(context, builder, aty[6], zb_)
        m = [[vload(mptr, builder.add(mofs_, builder.mul(ms_, i64(4 * i + j))))
              for j in range(4)] for i in range(4)]
        sub, add = builder.fsub, builder.fadd

        def at(a0, a1, a2, a3):  # A^T applied to a column (or A to a row)
            return add(add(a0, a1), a2), sub(sub(a1, a2), a3)

        cols = [at(m[0][j], m[1][j], m[2][j], m[3][j]) for j in range(4)]  # cols[j][a]
        bv = vload(bptr, bofs_)
        zero = ir.Constant(vty, [0.0] * vty.count)
        leakv = splat(leak_)
        leak_zero = builder.fcmp_ordered("==", leak_, ir.Constant(leak_.type, 0.0))
        zs = []
        for a in range(2):
            row = at(*(cols[j][a] for j in range(4)))
            for b in range(2):
                z = add(row[b], bv)
                zs.append(z)
                keep = builder.or_(builder.fcmp_ordered(">", z, zero),
                                   builder.fcmp_unordered("uno", z, z))
                other = builder.select(leak_zero, zero, builder.fmul(z, leakv))
                vstore(builder.select(keep, z, other), zptr, outs[2 * a + b])
        return any_non_finite(builder, zs)

    return sig, codegen


@njit(inline="always")
def _products(nv, u, uofs, v, xb, off, zero, mb, mofs, kbw):
    """M for ``_gpix(nv)`` tiles = V U at one transform point: the matching tile with a zero
    bias and the switch off (leak 1), on gemm_tile's tile sizes (NV = 2 with 12 pixels
    spills, see _common)."""
    if nv == 4:
        conv_tile(u, uofs, v, xb, off, off.shape[0], zero, 0, mb, mofs, kbw, 1.0, 4, GPIX[4])
    elif nv == 3:
        conv_tile(u, uofs, v, xb, off, off.shape[0], zero, 0, mb, mofs, kbw, 1.0, 3, GPIX[3])
    elif nv == 2:
        conv_tile(u, uofs, v, xb, off, off.shape[0], zero, 0, mb, mofs, kbw, 1.0, 2, GPIX[2])
    else:
        conv_tile(u, uofs, v, xb, off, off.shape[0], zero, 0, mb, mofs, kbw, 1.0, 1, GPIX[1])


@njit(inline="always")
def _gpix(nv):
    return GPIX[4] if nv == 4 else (GPIX[3] if nv == 3 else (GPIX[2] if nv == 2 else GPIX[1]))


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


@njit(parallel=PARALLEL, cache=True)
def _winograd_kernel(x, unpool, use_sw, xf, indf, swf, place, hh, ww, u, uofs_b, bpad, blk_k0,
                     blk_nv, vl, poolh, poolw, sh, sw, leak, wo, wp, wused, th, tw, hrow,
                     wrow, cpad, group, gtiles, spi, nchunks, h, idx, with_idx, redo,
                     gather, gidx, gsw, use_gsw, gplace):
    """The input plane (hh x ww, C channels) is x itself, or with ``unpool`` the code x
    (N, C, Hp, Wp), flat in ``xf``, times the switches ``swf`` (if ``use_sw``) added at its
    positions ``indf`` (plane position f is buffer element ``place[f]``: see ``code_in``).

    With ``gather`` (one group of the whole plane, pool 1) nothing is pooled: unit e of
    template k reads z at the plane position ``gidx[n, k, e]`` (row-buffer pixel
    ``gplace[f]``), times ``gsw[n, k, e]`` (if ``use_gsw``; exactly 0 where that is 0), into
    ``h[n, k, e]``."""
    n_, c_ = x.shape[:2]
    k_ = h.shape[1]
    hp = (gplace.shape[0] if gather else h.shape[2]) // wp  # gather: h holds the units
    nb = blk_k0.shape[0]
    dense = x.shape[2] * x.shape[3] == hh * ww
    nitems = -(-n_ // spi) * nb
    kbw_max = NV_MAX * vl
    tiles = th * tw
    wz = wused + 1              # row buffer: one spare column, one spare row above and below
    zsize = ((group - 1) * sh + poolh + 3) * wz * kbw_max
    # the 16 planes of V and M are one vector more than a multiple of 4 KiB apart at most:
    # strides that are multiples of 4 KiB put all 16 in one L1 set (3x slower transforms)
    vstride = spi * tiles * cpad + vl
    mstride = (spi * gtiles + PIX_MAX) * kbw_max + vl
    hpw = hp * wp
    hf = h.reshape(h.size)
    unpooled = poolh == 1 and poolw == 1 and sh == 1 and sw == 1
    # z of a 1x1 window: the row buffer's pixel zplace[e] (rows from r0 - 1, wz wide)
    zplace = np.empty(group * wp, dtype=np.int64)
    for e in range(group * wp):
        zplace[e] = (e // wp + 1) * wz + e % wp
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, nitems)
        # channel-last, channels padded with zeros to whole vectors
        xp = vector_zeros(hrow * wrow * cpad, x.dtype)
        v = vector_empty(16 * vstride, x.dtype)
        mb = vector_empty(16 * mstride, x.dtype)
        zb = vector_empty(spi * zsize, x.dtype)
        best = vector_empty(group * wp * kbw_max, x.dtype)
        barg = vector_empty(group * wp * kbw_max, np.int32)
        xb = np.empty(PIX_MAX, dtype=np.int64)
        off = np.arange(cpad)
        zero = vector_zeros(kbw_max, x.dtype)
        cur = -1
        for item in range(lo, hi):
            sg = item // nb
            b = item - sg * nb
            n0 = sg * spi
            ns = min(spi, n_ - n0)
            if sg != cur:
                for s in range(ns):
                    n = n0 + s
                    if unpool:
                        if code_in(xf, indf, swf, use_sw, dense, n, c_, x.shape[2] * x.shape[3],
                                   hh * ww, vl, place, xp):
                            redo[n] = 1
                    else:
                        input_in(xf, n, c_, hh * ww, vl, place, xp)
                    transform_blocks(xp, wrow, cpad, th, tw, s, vl, v, vstride, False)
                cur = sg
            k0 = blk_k0[b]
            nv = blk_nv[b]
            kbw = nv * vl
            kval = min(kbw, k_ - k0)
            npx = _gpix(nv)
            for g0 in range(0, hp, group):
                g1 = min(g0 + group, hp)
                r0 = g0 * sh
                nrows = (g1 - 1 - g0) * sh + poolh
                ti0 = r0 // 2
                ti1 = (r0 + nrows + 1) // 2
                t0 = ti0 * tw
                nt = (ti1 - ti0) * tw   # tiles of one sample; the products run over ns * nt
                for xi in range(16):
                    for f0 in range(0, ns * nt, npx):
                        for p in range(npx):
                            j = min(f0 + p, ns * nt - 1)
                            s = j // nt
                            xb[p] = xi * vstride + (s * tiles + t0 + j - s * nt) * cpad
                        _products(nv, u, uofs_b[b] + xi * cpad * kbw, v, xb, off, zero, mb,
                                  xi * mstride + f0 * kbw, kbw)
                for s in range(ns):
                    # z rows r0 - 1 .. r0 + nrows go to buffer rows 0 .. nrows + 1
                    bad = False
                    for jj in range(nt):
                        ti = ti0 + jj // tw
                        tj = jj - (jj // tw) * tw
                        zr = 2 * ti - r0 + 1
                        o00 = s * zsize + (zr * wz + 2 * tj) * kbw
                        o10 = o00 + wz * kbw
                        j = s * nt + jj
                        for q in range(0, kbw, vl):
                            bad |= output_transform(mb, j * kbw + q, mstride, bpad, k0 + q,
                                                    leak, zb, o00 + q, o00 + kbw + q, o10 + q,
                                                    o10 + kbw + q)
                    if bad:
                        redo[n0 + s] = 1
                    if gather:
                        n = n0 + s
                        zs = zb[s * zsize:]
                        for l in range(kval):
                            src = gidx[n, k0 + l]
                            dst = h[n, k0 + l]
                            if use_gsw:
                                swr = gsw[n, k0 + l]
                                for e in range(src.shape[0]):
                                    m = swr[e]
                                    dst[e] = 0 if m == 0 else zs[gplace[src[e]] * kbw + l] * m
                            else:
                                for e in range(src.shape[0]):
                                    dst[e] = zs[gplace[src[e]] * kbw + l]
                        continue
                    ne = (g1 - g0) * wp
                    if unpooled and not with_idx:
                        # a 1x1 window: z straight from the row buffer (pixel zplace[e]) into
                        # h's rows (channel-first), by register transposes
                        hbase = ((n0 + s) * k_ + k0) * hpw + g0 * wp
                        copy_out(zb, s * zsize, zplace, kbw, ne, kval, vl, hf, hbase, hpw)
                        continue
                    _pool_group(zb[s * zsize:], nv, kbw, g0, g1, r0 - 1, wz, wp, wo, sh, sw,
                                poolh, poolw, best, barg)
                    # pooled: element by element (the transposes measured no faster here)
                    for l in range(kval):
                        hrow_ = h[n0 + s, k0 + l]
                        for e in range(ne):
                            hrow_[g0 * wp + e] = best[e * kbw + l]
                        if with_idx:
                            irow = idx[n0 + s, k0 + l]
                            for e in range(ne):
                                irow[g0 * wp + e] = barg[e * kbw + l]


@functools.lru_cache(maxsize=256)
def _group(hp, sh, poolh, tw, npx):
    """Pooled rows per group: the fewest tile slots in all (a group's tiles are computed
    ``npx`` at a time, the last few repeated), groups of at most _MAX_TILES tiles. Cached:
    a search in Python, ~60 us a call, 7 calls a conv-small training step."""
    best, best_slots = 1, None
    for group in range(1, hp + 1):
        slots, biggest = 0, 0
        for g0 in range(0, hp, group):
            r0 = g0 * sh
            nrows = (min(g0 + group, hp) - 1 - g0) * sh + poolh
            nt = ((r0 + nrows + 1) // 2 - r0 // 2) * tw
            slots += -(-nt // npx) * npx
            biggest = max(biggest, nt)
        if group > 1 and biggest > _MAX_TILES:
            break
        if best_slots is None or slots < best_slots:
            best, best_slots = group, slots
    return best


def _samples_per_item(tiles, npx):
    """Samples of a small plane whose tiles go through the products together: the fewest
    with the least slot waste, at most _MAX_TILES tiles in all (the 3x3 tiles of a 6x6 plane
    fill 12 slots of 6 alone, 18 of 18 in pairs)."""
    best, best_fill = 1, 0.0
    for spi in range(1, _MAX_TILES // tiles + 1):
        fill = spi * tiles / (-(-spi * tiles // npx) * npx)
        if fill > best_fill + 1e-9:
            best, best_fill = spi, fill
    return best


def _correlate(x, unpool, src_idx, src_sw, plane, templates, bias, padding, pool, stride, leak,
               with_idx, gather_idx=None, gather_sw=None):
    """Run the kernel: returns (h, idx or None, redo). With ``gather_idx`` (pool and stride 1)
    h has its shape: z read at those plane positions, times ``gather_sw`` (if given)."""
    n, c = x.shape[:2]
    hh, ww = plane
    k = templates.shape[0]
    ph, pw = padding
    ho, wo = hh + 2 * ph - 2, ww + 2 * pw - 2
    hp, wp = (ho - pool[0]) // stride[0] + 1, (wo - pool[1]) // stride[1] + 1
    gather = gather_idx is not None
    h = buffers.empty(gather_idx.shape if gather else (n, k, hp, wp), x.dtype)
    idx = buffers.empty((n, k, hp, wp) if with_idx else (n, k, 0, 1), np.int32)
    redo = np.zeros(n, dtype=np.int8)
    if n == 0:
        return h, idx, redo
    vl = lanes(x.dtype)
    cpad = -(-c // vl) * vl
    u, k0, nv, uofs, kpad = _transformed_templates(templates, vl, cpad)
    bpad = buffers.aligned_zeros(kpad, x.dtype)
    bpad[:k] = bias
    hused = (hp - 1) * stride[0] + pool[0]
    wused = (wp - 1) * stride[1] + pool[1]
    th, tw = -(-hused // 2), -(-wused // 2)
    # the padded sample, grown to whole 4x4 blocks (tile rows/columns beyond the plane read
    # zeros and write spare rows/columns of the row buffer)
    hrow = max(hh + 2 * ph, 2 * th + 2)
    wrow = max(ww + 2 * pw, 2 * tw + 2)
    npx = GPIX[int(nv[0])]
    if th * tw < _MAX_TILES // 2:
        # a small plane: one group, several samples' tiles through the products together
        group, spi = hp, _SPI or _samples_per_item(th * tw, npx)
    elif gather:
        # any unit may read any position: the whole plane stays in the row buffer
        group, spi = hp, _SPI or 1
    else:
        group, spi = _group(hp, stride[0], pool[0], tw, npx), _SPI or 1
    gtiles = ((((group - 1) * stride[0] + pool[0] + 1) // 2) + 1) * tw
    use_sw = src_sw is not None
    if src_idx is None:
        # the input, copied channel-last by register transposes (``input_in``)
        xf = np.ascontiguousarray(x).reshape(-1)
        indf, swf = np.zeros(1, np.int32), np.zeros(1, x.dtype)
        rows, cols = np.divmod(np.arange(hh * ww, dtype=np.int64), ww)
        place = ((rows + ph) * wrow + pw + cols) * cpad
    else:
        # flat views of the code, positions and switches (C-contiguous, as the ops layer
        # passes them)
        xf = np.ascontiguousarray(x).reshape(-1)
        indf = np.ascontiguousarray(src_idx, dtype=np.int32).reshape(-1)
        swf = (np.ascontiguousarray(src_sw, dtype=x.dtype).reshape(-1) if use_sw
               else np.zeros(1, x.dtype))
        rows, cols = np.divmod(np.arange(hh * ww, dtype=np.int64), ww)
        place = ((rows + ph) * wrow + pw + cols) * cpad
    use_gsw = gather_sw is not None
    if gather:
        # plane position f = (i, j) is pixel (i + 1, j) of the row buffer (wused + 1 wide)
        rows, cols = np.divmod(np.arange(ho * wo, dtype=np.int64), wo)
        gplace = (rows + 1) * (wused + 1) + cols
        gidx = gather_idx.reshape(n, k, -1)
        gsw = gather_sw.reshape(n, k, -1) if use_gsw else np.zeros((1, 1, 1), x.dtype)
        hv = h.reshape(n, k, -1)
    else:
        gplace = np.zeros(1, dtype=np.int64)
        gidx, gsw = np.zeros((1, 1, 1), np.int32), np.zeros((1, 1, 1), x.dtype)
        hv = h.reshape(n, k, hp * wp)
    # a 1x1 window's argmax is its own position: the identity, written as whole rows after
    # the kernel rather than element by element from its pooling
    identity = with_idx and pool == (1, 1) and stride == (1, 1)
    _winograd_kernel(x, unpool, use_sw, xf, indf, swf, place, hh, ww, u, uofs, bpad, k0, nv, vl,
                     pool[0], pool[1], stride[0], stride[1], float(leak), wo, wp, wused,
                     th, tw, hrow, wrow, cpad, group, gtiles, spi,
                     num_chunks(-(-n // spi) * len(k0)),
                     hv, idx.reshape(n, k, -1), with_idx and not identity, redo,
                     gather, gidx, gsw, use_gsw, gplace)
    if identity:
        _identity_rows(idx.reshape(n * k, hp * wp))
    return h, (idx if with_idx else None), redo


@njit(parallel=PARALLEL, cache=True)
def _identity_rows(idx):
    """idx[r, e] = e: the positions of a 1x1 window, on both cores (a NumPy broadcast of
    ``arange`` wrote them on one: 0.7 ms in the step for the 6.4 MB of l2's idx at N = 128,
    ~0.25 ms this way)."""
    rows, cols = idx.shape
    for r in prange(rows):
        row = idx[r]
        for e in range(cols):
            row[e] = e


def match_switch_pool(x, templates, bias, padding, pool, stride, leak):
    """The Winograd version of ``matching.match_switch_pool`` for 3x3 templates.

    Returns ``(h, idx, redo)``: ``redo`` flags the samples (int8, 1 = redo) whose z had a
    non-finite value; the caller recomputes those with the direct kernel. The pooling windows
    that touch a tile the accuracy screen flags (``screen``) are recomputed here, directly.
    """
    h, idx, redo = _correlate(x, False, None, None, x.shape[2:], templates, bias, padding,
                              pool, stride, leak, True)
    flags = screen(x, templates, bias, padding)
    need = flags.any(axis=(1, 2))
    if need.any():
        _direct_windows(x, templates, bias, padding[0], padding[1], pool[0], pool[1],
                        stride[0], stride[1], x.dtype.type(leak), flags, need, redo, h, idx)
    return h, idx, redo


def match_at_applies(x, templates, padding, units_on):
    """Whether ``match_at`` pays off: where ``applies`` (3x3, >= 16 channels and templates,
    finite templates, a plane where Winograd saves products) and the units to read are at
    least 5 % of the plane. The unit-by-unit kernel has a large fixed cost (conv-small's
    layer 3 at batch 128, ms, units vs Winograd, by the share of a 2x2-pooled code switched
    on: 5 %: 4.8 vs 6.6, 10 %: 5.9 vs 7.6, 25 %: 7.8 vs 7.3, 50 %: 10.3 vs 8.8, 94 %: 11.1 vs
    6.7; a trained model has about half on)."""
    n, k = x.shape[0], templates.shape[0]
    plane = (x.shape[2] + 2 * padding[0] - 2) * (x.shape[3] + 2 * padding[1] - 2)
    return (units_on >= _MATCH_AT_SHARE * n * k * plane
            and applies(x, templates, np.zeros(1, x.dtype), padding))


def match_at(x, templates, idx, padding, switches):
    """``matching.match_at`` by the Winograd kernel: the whole plane of every sample (no bias,
    no switch), read at ``idx`` times the switches (exactly 0 where a switch is 0).

    Returns ``(z, redo)``: ``redo`` flags the samples with a non-finite value anywhere on
    their plane; the caller recomputes those with the unit-by-unit kernel.
    """
    k = templates.shape[0]
    zero = np.zeros(k, dtype=x.dtype)
    z, _, redo = _correlate(x, False, None, None, x.shape[2:], templates, zero, padding,
                            (1, 1), (1, 1), 1.0, False, gather_idx=idx, gather_sw=switches)
    flags = screen(x, templates, zero, padding)
    need = flags.any(axis=(1, 2))
    if need.any():
        use_sw = switches is not None
        sw = switches if use_sw else np.zeros((1, 1, 1, 1), x.dtype)
        wo = x.shape[3] + 2 * padding[1] - 2
        _direct_units(x, templates, padding[0], padding[1], wo, idx, sw, use_sw, flags, need,
                      redo, zero, z)
    return z, redo


def render_applies(templates, padding, any_size=False):
    """Whether ``render`` can take this call (3x3 templates, padding at most 2) and, unless
    ``any_size``, pays off: >= 16 channels on both sides, finite templates."""
    k, c, kh, kw = templates.shape
    if kh != 3 or kw != 3 or max(padding) > 2:
        return False
    return any_size or (c >= _MIN_CHANNELS and k >= _MIN_CHANNELS
                        and bool(np.isfinite(templates).all()))


def render(code, idx, templates, input_shape, padding, switches):
    """The top-down render (``rendering.render``) by Winograd: the transposed correlation of
    the unpooled code is the correlation with the flipped, transposed templates at padding
    2 - p, whose output plane is the input's, so nothing is cropped. The code is unpooled
    (times the switches) straight into the kernel's channel-last buffer.

    Returns ``(r, redo)``; the caller re-renders the flagged samples (a non-finite value).
    """
    ho = input_shape[0] + 2 * padding[0] - 2
    wo = input_shape[1] + 2 * padding[1] - 2
    flipped = np.ascontiguousarray(templates[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    zero = np.zeros(flipped.shape[0], dtype=code.dtype)
    inner = (2 - padding[0], 2 - padding[1])
    r, _, redo = _correlate(code, True, idx, switches, (ho, wo), flipped, zero, inner, (1, 1),
                            (1, 1), 1.0, False)
    # the accuracy screen on the unpooled code: a flagged sample is re-rendered (by the
    # caller) with the other kernels
    from .rendering import unpool  # imports matching, as this module does

    unpooled = unpool(code, idx, (ho, wo), switches)
    redo |= screen(unpooled, flipped, zero, inner).any(axis=(1, 2, 3)).astype(np.int8)
    return r, redo


# The accuracy screen
# -------------------
# Rounding in F(2x2, 3x3): the input transform (2 roundings per V), the templates' (computed
# in float64, rounded once: at most 4 float64 roundings and one of the dtype), the products
# summed over the C channels, the output transform (4 roundings) and the bias (1) bound the
# error of one z by
#
#     (C + 12) * u * (|bias| + sum_c sum_{a in field, b in taps} K_o(a, b) |x_c,a| |w_kc,b|)
#
# (first order; K_o(a, b) = sum_xi |A_o,xi| |G x G|_xi,b |B x B|_xi,a <= ka_o(a), the
# weights 1, 1, 2 along each axis of the field, mirrored for the tile's second row/column).
# So ``est = sum_c W1_kc * FP_c(o)`` (W1: sum of |w_kc|, FP: the ka-weighted sum of |x| over
# the field) bounds it, and ``room = sum_c wmin_kc * F1_c(o)`` (wmin: the smallest |w_kc|,
# F1: the plain sum of |x|) is at most sum |w||x|: where ``(C + 12) est <= c T room`` (c the
# contract's constant, T = 9 C + 1 terms) the tile meets the contract. Per 2x2 tile: the
# largest FP and the smallest F1 of its four outputs (leaving out those whose field is all
# zero: their z is the bias, exactly; at the edge of a digit they flagged ~24 % of the tiles
# of MNIST's second layer, 0.7 % without). Two float64 matrix products
# (tiles x C by C x K), a few per cent of the kernel's products.

_HIGHER_ORDER = 1.0 + 2.0 ** -10   # covers the second-order terms ((C + 12) u << 2**-10)
_PRODUCT_ROUNDING = 1.0 - 2.0 ** -30  # the screen's own float64 sums of at most 10**6 terms


def screen(x, templates, bias, padding, c=None):
    """Flags (bool, (N, th, tw, K)) of the 2x2 output tiles (tile (i, j): outputs 2i, 2i + 1
    by 2j, 2j + 1) whose z the Winograd kernel may not compute within the accuracy contract
    (``kernels.contracts``, constant ``c``, default the WINOGRAD one): a large input on a
    tiny or zero weight, a dynamic range the transforms cannot carry. Non-finite inputs flag
    their tiles too (the kernel's own check redoes those samples)."""
    from ..contracts import WINOGRAD

    c = WINOGRAD if c is None else c
    n, ch = x.shape[:2]
    k = templates.shape[0]
    ho = x.shape[2] + 2 * padding[0] - 2
    wo = x.shape[3] + 2 * padding[1] - 2
    th, tw = -(-ho // 2), -(-wo // 2)
    if n == 0 or th <= 0 or tw <= 0 or not _SCREEN:
        return np.zeros((n, max(th, 0), max(tw, 0), k), dtype=np.bool_)
    aw = np.abs(templates.astype(np.float64)).reshape(k, ch, 9)
    cT = c * (9 * ch + 1)
    w1 = np.ascontiguousarray((ch + 12) * _HIGHER_ORDER * aw.sum(axis=2).T)   # (C, K)
    wmin = np.ascontiguousarray(cT * _PRODUCT_ROUNDING * aw.min(axis=2).T)
    bterm = (cT - ch - 12) * np.abs(bias.astype(np.float64))
    # a "strong" channel (4 w1 <= wmin: FP <= 4 F1 on every field) meets its share of every
    # output's check by itself, so its tile-level lower bound may be raised to 0; a weak one
    # (a tiny or zero weight) keeps its signed bound
    floor = np.where(4.0 * w1 <= wmin, 0.0, -np.inf)
    flags = np.empty((n, th, tw, k), dtype=np.bool_)
    _screen_tiles(x, padding[0], padding[1], th, tw, w1, wmin, floor, bterm, flags)
    return flags


@njit(parallel=PARALLEL, cache=True)
def _screen_tiles(x, ph, pw, th, tw, w1, wmin, floor, bterm, flags):
    """flags[n, ti, tj, k] = not (0 <= bterm[k] + sum_c max(f1[c] wmin[c, k] - fp[c] w1[c, k],
    floor[c, k])) with fp[c] the largest ka-weighted sum of |x_c| over the fields of the
    tile's four outputs and f1[c] the smallest plain sum over them (an all-zero field
    included, see ``_field_sums``).

    Each term bounds channel c's share ``wmin F1_c(o) - w1 FP_c(o)`` of one output's check
    from below, for each of the four outputs o, so the sum certifies every output of the tile;
    ``floor`` is 0 where that share is never negative (a strong channel), so a strong channel
    that is zero on one field costs nothing (without it ~20 % of MNIST layer-2 tiles were
    flagged). float64; a sample at a time, |x| copied into a zero-padded
    buffer; all in one pass (NumPy's BLAS took 30 ms for these small products next to the
    kernels' threads)."""
    n_, c_, hh, ww = x.shape
    k_ = w1.shape[1]
    hb, wb = 2 * th + 2, 2 * tw + 2
    for n in prange(n_):
        buf = np.zeros((c_, hb, wb))
        for c in range(c_):
            for r in range(min(hh, hb - ph)):
                for q in range(min(ww, wb - pw)):
                    buf[c, r + ph, q + pw] = abs(np.float64(x[n, c, r, q]))
        fp = np.empty(c_)
        f1 = np.empty(c_)
        room = np.empty(k_)
        for ti in range(th):
            for tj in range(tw):
                for c in range(c_):
                    fp[c], f1[c] = _field_sums(buf, c, 2 * ti, 2 * tj)
                for kk in range(k_):
                    room[kk] = bterm[kk]
                for c in range(c_):
                    a = fp[c]
                    if a == 0:       # every field of the tile all zero in channel c
                        continue
                    b = f1[c]
                    for kk in range(k_):
                        share = b * wmin[c, kk] - a * w1[c, kk]
                        if share < floor[c, kk]:     # NaN stays NaN
                            share = floor[c, kk]
                        room[kk] += share
                for kk in range(k_):
                    flags[n, ti, tj, kk] = not room[kk] >= 0   # NaN flags


@njit(inline="always")
def _field_sums(buf, c, r0, q0):
    """(largest ka-weighted sum, smallest plain sum) over the four 3x3 fields of the 4x4
    block at (r0, q0) of channel c.

    The smallest sum counts all-zero fields too (then it is 0): the tile's check must hold for
    each of its four outputs, and a channel that is zero on one output's field adds nothing
    to that output's room while its other fields could add to the tile's. Leaving zero fields
    out let a channel with large inputs and strong weights next to an output pay for another
    channel's large input on a zero weight inside it (errors of ~1e-4 where the exact z is
    0). A channel whose whole block is zero is skipped by the caller (it adds to neither)."""
    big = 0.0
    small = np.inf
    for pi in range(2):
        for pj in range(2):
            sp = 0.0
            s1 = 0.0
            for a in range(3):
                wa = 2.0 if a == 2 - 2 * pi else 1.0
                for b in range(3):
                    v = buf[c, r0 + pi + a, q0 + pj + b]
                    sp += wa * (2.0 if b == 2 - 2 * pj else 1.0) * v
                    s1 += v
            if not sp <= big:    # NaN wins
                big = sp
            if not s1 >= small:   # NaN wins
                small = s1
    return big, small


@njit(inline="always")
def _direct_z(x, templates, k, n, i, j, ph, pw, z):
    """z + sum_{c,u,v} W[k,c,u,v] xpad[n,c,i+u,j+v] in x's dtype (the classical bound)."""
    c_, hh, ww = x.shape[1:]
    for c in range(c_):
        for a in range(3):
            r = i + a - ph
            if r < 0 or r >= hh:
                continue
            for b in range(3):
                q = j + b - pw
                if 0 <= q < ww:
                    z += templates[k, c, a, b] * x[n, c, r, q]
    return z


@njit(parallel=PARALLEL, cache=True)
def _direct_windows(x, templates, bias, ph, pw, poolh, poolw, sh, sw, leak, flags, need, redo,
                    h, idx):
    """The pooling windows of (n, k) that touch a flagged tile, recomputed directly: z, the
    switch and the first row-major max, as the reference does. Samples to be redone anyway
    (``redo``) are skipped."""
    n_, k_, hp, wp = h.shape
    wo = x.shape[3] + 2 * pw - 2
    for nk in prange(n_ * k_):
        n = nk // k_
        k = nk - n * k_
        if redo[n] or not need[n, k]:
            continue
        for pi in range(hp):
            r0 = pi * sh
            for pj in range(wp):
                c0 = pj * sw
                hit = False
                for ti in range(r0 // 2, (r0 + poolh - 1) // 2 + 1):
                    for tj in range(c0 // 2, (c0 + poolw - 1) // 2 + 1):
                        hit |= flags[n, ti, tj, k]
                if not hit:
                    continue
                best = h[n, k, pi, pj]
                barg = -1
                for a in range(poolh):
                    for b in range(poolw):
                        z = _direct_z(x, templates, k, n, r0 + a, c0 + b, ph, pw, bias[k])
                        if z > 0 or z != z:
                            y = z
                        elif leak == 0:
                            y = 0.0
                        else:
                            y = z * leak
                        if barg < 0 or (best == best and (y > best or y != y)):
                            best = y
                            barg = (r0 + a) * wo + c0 + b
                h[n, k, pi, pj] = best
                idx[n, k, pi, pj] = barg


@njit(parallel=PARALLEL, cache=True)
def _direct_units(x, templates, ph, pw, wo, idx, sw, use_sw, flags, need, redo, zero, z):
    """match_at's units whose position lies in a flagged tile, recomputed directly (times
    the switch; exactly 0 where it is 0)."""
    n_, k_ = z.shape[:2]
    zf = z.reshape(n_, k_, -1)
    idf = idx.reshape(n_, k_, -1)
    swf = sw.reshape(sw.shape[0], sw.shape[1], -1)
    for nk in prange(n_ * k_):
        n = nk // k_
        k = nk - n * k_
        if redo[n] or not need[n, k]:
            continue
        for e in range(zf.shape[2]):
            p = idf[n, k, e]
            i = p // wo
            j = p - i * wo
            if not flags[n, i // 2, j // 2, k]:
                continue
            if not use_sw:
                zf[n, k, e] = _direct_z(x, templates, k, n, i, j, ph, pw, zero[0])
            elif swf[n, k, e] == 0:
                zf[n, k, e] = 0
            else:
                zf[n, k, e] = _direct_z(x, templates, k, n, i, j, ph, pw, zero[0]) * swf[n, k, e]
