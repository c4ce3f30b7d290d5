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
``_tiles.pool_group``; a 1x1 window has nothing to pool and goes straight from the row
buffer), so only the rounding of z differs from it (a few ulps more; exact on integer data,
where every intermediate is an integer or a half). A 1x1 window's z goes to h by register transposes
(``copy_out``); pooled results are copied out element by element (the transposes measured
no faster there).

Non-finite values: a NaN/inf pixel reaches in the transform domain exactly the outputs whose
receptive field holds it (the supports of B and A are those of the 3x3 window), and every
value computed from a non-finite one is non-finite, so z is non-finite exactly where the
direct z is. But the kind can differ (inf - inf = NaN in the transforms where the direct sum
has one inf), so any sample with a non-finite z is flagged and recomputed by the direct
kernel; so is one whose transforms overflow. Non-finite templates or bias never come here.

Accuracy: the transforms pair each input with the weights of other taps, so z's error is
bounded by (C + 12) u sum_c sum_{a,b} K(a, b) |x_c,a| |w_kc,b| rather than by the classical
u * sum |w||x| (a large input on a small or zero weight breaks the latter). Every call runs
``screen`` (``screen_code`` for render), an a-priori check of each output against the
contract of ``kernels.contracts`` (c = 256): matching recomputes by the classical sum the
pooling windows that hold a flagged output, match_at the units read there, render the flagged
outputs. Where nothing is flagged (standard-normal or ReLU inputs; 0-0.08 % of the outputs of
conv-small's layers 2-4 on MNIST are) the results are the kernel's own, bit for bit.

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

Modules: the transforms and channel-last copies are in ``winograd_transforms``, the accuracy
screen and the direct recomputation of what it flags in ``winograd_screen``; this module
holds the kernel, its work plan and the three ops' entries (each returns flags of the samples
its caller redoes with an exact kernel). The kernel inlines the transforms: Numba's cache of
it sees changes to this file only, so clear its cache files after editing those
(``winograd_transforms``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .. import buffers
from ..geometry import Geometry
from ._microkernels import GPIX, NV_MAX, PIX_MAX, conv_tile, copy_out
from ._partition import PARALLEL, chunk_bounds, num_chunks, vector_empty, vector_zeros
from ._tiles import pool_group
from ._units import unpool
from ._vector import lanes
from .winograd_screen import (channel_last_templates, recompute_units, recompute_windows,
                              samples_to_redo, screen, screen_code, window_flags)
from .winograd_transforms import (code_in, input_in, output_transform, transform_blocks,
                                  transformed_templates)

__all__ = ["AUTO", "applies", "saves_products", "match_switch_pool", "match_at_applies",
           "match_at", "render_applies", "render", "screen"]

_MIN_CHANNELS = 16   # below this the transforms cost as much as the products they save
_MAX_TILES = 48      # tiles per group: M stays small (16 x 48 x 64 floats = 192 KiB)
_MATCH_AT_SHARE = 0.05  # match_at: the least share of the plane's units worth a whole plane
#: Whether the ops' automatic choice (the modules' ``plan_*``) may take these kernels
#: (``algorithm="winograd"`` always can). Off: with the sound accuracy screen they do not pay
#: yet. The per-output screen flags almost nothing on real layers (0-0.08 % of the outputs of
#: conv-small's layers 2-4 on MNIST, against ~20 % of the tiles for the per-tile screen it
#: replaced), but its own pass costs ~60 ms of a conv-small EG step (N = 128: ~208 ms
#: screened against ~175 ms by the direct kernels and ~146 ms unchecked
#: (benchmarks/NOTES.md). Folding the field sums into the kernel's transform pass is what
#: would bring them back.
AUTO = False


def saves_products(plane):
    """Whether 16 products per 2x2 block of the (ho, wo) plane are at most 0.9x the 9 per
    position of the direct way (not so on tiny or thin planes: half-used blocks)."""
    ho, wo = plane
    return -(-ho // 2) * -(-wo // 2) * 16 <= 0.9 * 9 * ho * wo


def applies(templates, bias, plane):
    """Whether the Winograd kernel pays on this call: 3x3 templates, enough input channels
    and templates, finite templates and bias, a (Ho, Wo) plane where it saves products."""
    k, c, kh, kw = templates.shape
    return (kh == 3 and kw == 3 and c >= _MIN_CHANNELS and k >= _MIN_CHANNELS
            and saves_products(plane)
            and bool(np.isfinite(templates).all()) and bool(np.isfinite(bias).all()))


class Source(NamedTuple):
    """The kernel's input plane (hh x ww, C channels): x itself, or with ``from_code`` the
    code x (N, C, Hp, Wp), flat in ``xf``, times the switches ``swf`` (if ``use_sw``) added
    at its positions ``indf``. Plane position f is buffer element ``place[f]`` (see
    ``code_in``)."""
    x: np.ndarray
    from_code: bool
    use_sw: bool
    xf: np.ndarray
    indf: np.ndarray
    swf: np.ndarray
    place: np.ndarray


class Filters(NamedTuple):
    """The transformed templates ``u`` (block b at ``uofs[b]``, first template ``k0[b]``,
    ``nv[b]`` vectors), the bias padded to whole vectors and the switch's leak."""
    u: np.ndarray
    uofs: np.ndarray
    bias: np.ndarray
    k0: np.ndarray
    nv: np.ndarray
    leak: float


class Layout(NamedTuple):
    """Sizes of one call: the input plane (hh, ww), lanes, the pooling window and stride, the
    output plane's width ``wo`` and the units per pooled row ``wp``, the plane columns the
    windows use (``wused``), the tile grid (th, tw), the padded channel-last buffer (hrow x
    wrow x cpad), pooled rows per group and their tiles, samples per work item, chunks."""
    hh: int
    ww: int
    vl: int
    poolh: int
    poolw: int
    sh: int
    sw: int
    wo: int
    wp: int
    wused: int
    th: int
    tw: int
    hrow: int
    wrow: int
    cpad: int
    group: int
    gtiles: int
    spi: int
    nchunks: int


class Gather(NamedTuple):
    """With ``gather`` (one group of the whole plane, pool 1) nothing is pooled: unit e of
    template k reads z at the plane position ``gidx[n, k, e]`` (row-buffer pixel
    ``gplace[f]``), times ``gsw[n, k, e]`` (if ``use_gsw``; exactly 0 where that is 0)."""
    gather: bool
    gidx: np.ndarray
    gsw: np.ndarray
    use_gsw: bool
    gplace: np.ndarray


@njit(parallel=PARALLEL, cache=True)
def _winograd_kernel(src, filters, layout, gathering, h, idx, with_idx, redo):
    """The Winograd correlation of ``src`` (a ``Source``) with ``filters``, switched and
    pooled into ``h`` and (with ``with_idx``) ``idx``, or read at the ``gathering``
    positions into ``h`` (see ``Gather``); ``redo[n]`` = 1 flags a sample with a non-finite
    value."""
    x, unpool, use_sw, xf, indf, swf, place = src
    u, uofs_b, bpad, blk_k0, blk_nv, leak = filters
    (hh, ww, vl, poolh, poolw, sh, sw, wo, wp, wused, th, tw, hrow, wrow, cpad, group, gtiles,
     spi, nchunks) = layout
    gather, gidx, gsw, use_gsw, gplace = gathering
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
            npx = GPIX[nv]
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
                        # M = V U at transform point xi: the matching tile with a zero bias
                        # and the switch off (leak 1), on gemm_tile's tile sizes (NV = 2
                        # with 12 pixels spills, see _microkernels)
                        conv_tile(u, uofs_b[b] + xi * cpad * kbw, v, xb, off, off.shape[0],
                                  zero, 0, mb, xi * mstride + f0 * kbw, kbw, 1.0, nv, GPIX)
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
                    pool_group(zb[s * zsize:], nv, kbw, g0, g1, r0 - 1, wz, wp, wo, sh, sw,
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




def _plan(hp, th, tw, stride, pool, npx, gather, samples_per_item):
    """(pooled rows per group, samples per work item)."""
    if th * tw < _MAX_TILES // 2:
        # a small plane: one group, several samples' tiles through the products together
        return hp, samples_per_item or _samples_per_item(th * tw, npx)
    if gather:
        # any unit may read any position: the whole plane stays in the row buffer
        return hp, samples_per_item or 1
    return _group(hp, stride[0], pool[0], tw, npx), samples_per_item or 1


def _source(x, geometry, wrow, cpad, code_idx, code_sw):
    """The kernel's ``Source``: x, or the code x unpooled at ``code_idx`` (times
    ``code_sw``), flat, with the channel-last place of every plane position."""
    hh, ww = geometry.input
    ph, pw = geometry.padding
    rows, cols = np.divmod(np.arange(hh * ww, dtype=np.int64), ww)
    place = ((rows + ph) * wrow + pw + cols) * cpad
    xf = np.ascontiguousarray(x).reshape(-1)
    use_sw = code_sw is not None
    if code_idx is None:
        # the input, copied channel-last by register transposes (``input_in``)
        return Source(x, False, use_sw, xf, np.zeros(1, np.int32), np.zeros(1, x.dtype), place)
    # flat views of the code, positions and switches (C-contiguous, as the ops layer passes
    # them)
    indf = np.ascontiguousarray(code_idx, dtype=np.int32).reshape(-1)
    swf = (np.ascontiguousarray(code_sw, dtype=x.dtype).reshape(-1) if use_sw
           else np.zeros(1, x.dtype))
    return Source(x, True, use_sw, xf, indf, swf, place)


def _gathering(h, geometry, wused, gather_idx, gather_sw):
    """The kernel's ``Gather`` and its view of h: (N, K, units)."""
    n, k = h.shape[:2]
    dtype = h.dtype
    use_gsw = gather_sw is not None
    if gather_idx is None:
        hp, wp = geometry.pooled
        return (Gather(False, np.zeros((1, 1, 1), np.int32), np.zeros((1, 1, 1), dtype), use_gsw,
                       np.zeros(1, dtype=np.int64)), h.reshape(n, k, hp * wp))
    # plane position f = (i, j) is pixel (i + 1, j) of the row buffer (wused + 1 wide)
    ho, wo = geometry.plane
    rows, cols = np.divmod(np.arange(ho * wo, dtype=np.int64), wo)
    gsw = gather_sw.reshape(n, k, -1) if use_gsw else np.zeros((1, 1, 1), dtype)
    return (Gather(True, gather_idx.reshape(n, k, -1), gsw, use_gsw,
                   (rows + 1) * (wused + 1) + cols), h.reshape(n, k, -1))


def _correlate(x, templates, bias, geometry, leak, with_idx, code_idx=None, code_sw=None,
               gather_idx=None, gather_sw=None, samples_per_item=None):
    """Run the kernel on the correlation ``geometry``: returns (h, idx or None, redo). With
    ``code_idx`` x is a code, unpooled at those positions (times ``code_sw``) onto the
    geometry's input plane. With ``gather_idx`` (pool and stride 1) h has its shape: z read
    at those plane positions, times ``gather_sw`` (if given)."""
    n, c = x.shape[:2]
    k = templates.shape[0]
    hh, ww = geometry.input
    ph, pw = geometry.padding
    pool, stride = geometry.pool, geometry.stride
    hp, wp = geometry.pooled
    gather = gather_idx is not None
    h = buffers.empty(gather_idx.shape if gather else (n, k, hp, wp), x.dtype)
    idx = buffers.empty((n, k, hp, wp) if with_idx else (n, k, 0, 1), np.int32)
    redo = np.zeros(n, dtype=np.int8)
    if n == 0:
        return h, idx, redo
    vl = lanes(x.dtype)
    cpad = -(-c // vl) * vl
    u, k0, nv, uofs, kpad = transformed_templates(templates, vl, cpad)
    bpad = buffers.aligned_zeros(kpad, x.dtype)
    bpad[:k] = bias
    hused = (hp - 1) * stride[0] + pool[0]
    wused = (wp - 1) * stride[1] + pool[1]
    th, tw = -(-hused // 2), -(-wused // 2)
    # the padded sample, grown to whole 4x4 blocks (tile rows/columns beyond the plane read
    # zeros and write spare rows/columns of the row buffer)
    hrow = max(hh + 2 * ph, 2 * th + 2)
    wrow = max(ww + 2 * pw, 2 * tw + 2)
    group, spi = _plan(hp, th, tw, stride, pool, GPIX[int(nv[0])], gather, samples_per_item)
    gtiles = ((((group - 1) * stride[0] + pool[0] + 1) // 2) + 1) * tw
    layout = Layout(hh, ww, vl, pool[0], pool[1], stride[0], stride[1], geometry.plane[1], wp,
                    wused, th, tw, hrow, wrow, cpad, group, gtiles, spi,
                    num_chunks(-(-n // spi) * len(k0)))
    gathering, hv = _gathering(h, geometry, wused, gather_idx, gather_sw)
    # a 1x1 window's argmax is its own position: the identity, written as whole rows after
    # the kernel rather than element by element from its pooling
    identity = with_idx and pool == (1, 1) and stride == (1, 1)
    _winograd_kernel(_source(x, geometry, wrow, cpad, code_idx, code_sw),
                     Filters(u, uofs, bpad, k0, nv, float(leak)), layout, gathering, hv,
                     idx.reshape(n, k, -1), with_idx and not identity, redo)
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


def match_switch_pool(x, templates, bias, geometry, leak, samples_per_item=None):
    """The Winograd version of ``matching.match_switch_pool`` for 3x3 templates.

    Returns ``(h, idx, redo)``: ``redo`` flags the samples (int8, 1 = redo) whose z had a
    non-finite value; the caller recomputes those with an exact kernel. The pooling windows
    with an output the accuracy screen flags (``screen``) are recomputed here by the
    classical sum. ``samples_per_item`` forces the samples whose tiles share the product
    calls (None: the plan's; any number gives the same bits).
    """
    h, idx, redo = _correlate(x, templates, bias, geometry, leak, True,
                              samples_per_item=samples_per_item)
    flags = screen(x, templates, bias, geometry.padding, geometry.plane)
    if flags is not None:
        (ph, pw), (poolh, poolw), (sh, sw) = geometry.padding, geometry.pool, geometry.stride
        windows = np.empty(h.shape, np.uint8)
        window_flags(flags, poolh, poolw, sh, sw, windows)
        recompute_windows(x, channel_last_templates(templates), bias, ph, pw, poolh, poolw,
                          sh, sw, geometry.plane[1], x.dtype.type(leak), windows,
                          samples_to_redo(windows, redo), h, idx, True)
    return h, idx, redo


def match_at_applies(n, templates, plane, units_on):
    """Whether ``match_at`` pays off: where ``applies`` (3x3, >= 16 channels and templates,
    finite templates, a plane where Winograd saves products) and the units to read are at
    least 5 % of the plane. The unit-by-unit kernel has a large fixed cost (conv-small's
    layer 3 at batch 128, ms, units vs Winograd, by the share of a 2x2-pooled code switched
    on: 5 %: 4.8 vs 6.6, 10 %: 5.9 vs 7.6, 25 %: 7.8 vs 7.3, 50 %: 10.3 vs 8.8, 94 %: 11.1 vs
    6.7; a trained model has about half on). ``n`` samples, the (Ho, Wo) plane."""
    k = templates.shape[0]
    return (units_on >= _MATCH_AT_SHARE * n * k * plane[0] * plane[1]
            and applies(templates, np.zeros(1, templates.dtype), plane))


def match_at(x, templates, idx, geometry, switches):
    """``matching.match_at`` by the Winograd kernel: the whole plane of every sample (no bias,
    no switch), read at ``idx`` times the switches (exactly 0 where a switch is 0). The
    units whose output the accuracy screen flags are recomputed here by the classical sum.

    Returns ``(z, redo)``: ``redo`` flags the samples with a non-finite value anywhere on
    their plane; the caller recomputes those with the unit-by-unit kernel.
    """
    n, k = x.shape[0], templates.shape[0]
    zero = np.zeros(k, dtype=x.dtype)
    plane = geometry._replace(pooled=geometry.plane)  # pool and stride 1: the whole plane
    z, _, redo = _correlate(x, templates, zero, plane, 1.0, False, gather_idx=idx,
                            gather_sw=switches)
    flags = (screen(x, templates, zero, geometry.padding, geometry.plane, extra=1) if z.size
             else None)
    if flags is not None:
        ph, pw = geometry.padding
        use_sw = switches is not None
        idf = idx.reshape(n, k, -1)
        units = np.take_along_axis(flags.reshape(n, k, -1), idf.astype(np.intp), axis=2)
        sw = switches.reshape(n, k, -1) if use_sw else np.zeros((1, 1, 1), x.dtype)
        recompute_units(x, channel_last_templates(templates), ph, pw, geometry.plane[1], idf,
                        sw, use_sw, units, samples_to_redo(units, redo), zero,
                        z.reshape(n, k, -1))
    return z, redo


def render_applies(templates, padding, any_size=False):
    """Whether ``render`` can take this call (3x3 templates, padding at most 2) and, unless
    ``any_size``, pays off: >= 16 channels on both sides, finite templates."""
    k, c, kh, kw = templates.shape
    if kh != 3 or kw != 3 or max(padding) > 2:
        return False
    return any_size or (c >= _MIN_CHANNELS and k >= _MIN_CHANNELS
                        and bool(np.isfinite(templates).all()))


def render(code, idx, templates, geometry, switches):
    """The top-down render (``rendering.render``) by Winograd: the transposed correlation of
    the unpooled code is the correlation with the flipped, transposed templates at padding
    2 - p, whose output plane is the input's, so nothing is cropped. The code is unpooled
    (times the switches) straight into the kernel's channel-last buffer.

    Returns ``(r, redo)``; the caller re-renders the flagged samples (a non-finite value).
    """
    flipped = np.ascontiguousarray(templates[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    zero = np.zeros(flipped.shape[0], dtype=code.dtype)
    inner = (2 - geometry.padding[0], 2 - geometry.padding[1])
    # the correlation of the unpooled plane with the flipped templates: the image, unpooled
    transposed = Geometry(geometry.plane, (3, 3), inner, geometry.input, (1, 1), (1, 1),
                          geometry.input)
    r, _, redo = _correlate(code, flipped, zero, transposed, 1.0, False, code_idx=idx,
                            code_sw=switches)
    # the accuracy screen on the unpooled code; the outputs it flags are recomputed from
    # the unpooled code of their samples
    collisions = (-(-geometry.pool[0] // geometry.stride[0])
                  * -(-geometry.pool[1] // geometry.stride[1]))
    flags = screen_code(code, idx, switches, geometry.plane, flipped, inner, geometry.input,
                        collisions)
    if flags is not None:
        samples = np.flatnonzero(flags.any(axis=(1, 2, 3)) & (redo == 0))
        part = r[samples]
        unpooled = unpool(code[samples], idx[samples], geometry.plane,
                          None if switches is None else switches[samples])
        recompute_windows(unpooled, channel_last_templates(flipped), zero, inner[0],
                          inner[1], 1, 1, 1, 1, geometry.input[1], code.dtype.type(1),
                          flags[samples], np.ones(samples.size, np.uint8), part,
                          np.zeros((1, 1, 1, 1), np.int32), False)
        r[samples] = part
    return r, redo
