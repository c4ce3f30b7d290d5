"""Top-down rendering (the transposed correlation of the unpooled code), Numba CPU.

Algorithms (``plan_render`` picks, ``algorithm=`` forces one of ``ALGORITHMS``)
-----------------------------------------------------------------------------
* "scatter" (``_render_kernel``): parallel over chunks of samples (samples are independent,
  so there is no race and no reduction). Each thread keeps one zero-padded, channel-last
  image buffer (Hpad x Wpad x C). For every pooled unit with a non-zero value the templates,
  re-laid out as (K, kh, kw, C), are scattered straight from the pooled code: for each
  template row the kw*C contiguous weights are added with one SIMD ``axpy`` into kw*C
  contiguous buffer entries. Only Hp*Wp units per channel are visited, never the whole
  unpooled plane. The buffer is then cropped by the padding and transposed into r (N, C, H,
  W).
* "conv" (``_render_conv_kernel``): the dense correlation of the unpooled code with the
  flipped templates by ``conv_tile`` (finite templates); "gemm" (``_render_gemm_kernel``):
  small GEMMs per tap, every term computed (any values). The cheapest of the three by a
  measured cost model.
* "dots": few output channels (C < lanes, finite templates: the first layer) render by dot
  products over the templates instead (``_render_dots_kernel``): the unpooled code
  channel-last with a zero border, each output pixel one ``dot_tile`` of its flipped
  templates with the buffer around it; vectors over C or kw*C would be mostly empty there.
* "winograd": 3x3 layers with at least 16 channels on both sides (where ``winograd.AUTO``);
  the exact algorithms redo its flagged samples (non-finite values, or a dense code whose
  argmax positions are not the identity).

The unit loops find a flat argmax's buffer offset in a per-call table (``place_table``)
rather than by a division per unit. Exact IEEE semantics of the dense reference: skipping a
zero unit drops terms ``0 * w``, which is exact only when every template entry is finite and
the unit values are finite. When the templates hold inf/NaN, or a sample's values do, the
scatter kernel renders that sample densely (every plane position, zeros included), as the
reference does. ``unpool`` lives in ``_units``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import buffers
from . import winograd
from ._microkernels import (GPIX, NV_MAX, PIX, PIX_MAX, axpy, conv_tile, copy_out, dot_tile,
                            gemm_tile)
from ._partition import (PARALLEL, chunk_bounds, num_chunks, place_table, vector_empty,
                         vector_zeros)
from ._dispatch import choose, redo_flagged
from ._tiles import channel_blocks, relayout
from ._units import (sample_finite, switch_args, unit_value, unpool, unpool_bordered,
                     unpool_sample)
from ._vector import lanes
from .elementwise import count_nonzero

__all__ = ["ALGORITHMS", "plan_render", "render", "unpool"]

ALGORITHMS = ("scatter", "conv", "gemm", "dots", "winograd")

@njit(parallel=PARALLEL, cache=True)
def _render_kernel(code, idx, sw, use_sw, wr, w_finite, ho, wo, ph, pw, nchunks, r):
    n_, k_, hp, wp = code.shape
    _, c_, hh, ww = r.shape
    kh, kw = wr.shape[1], wr.shape[2]
    hpad, wpad = ho + kh - 1, wo + kw - 1
    wflat = wr.reshape(-1)
    run = kw * c_
    place = place_table(ho, wo, wpad * c_, c_, 0)
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        buf = vector_empty(hpad * wpad * c_, r.dtype)
        dense_u = vector_empty(ho * wo, r.dtype)
        for n in range(lo, hi):
            buf[:] = 0
            if w_finite and sample_finite(code, sw, use_sw, n):
                for k in range(k_):
                    wk = k * kh * run
                    for p in range(hp):
                        for q in range(wp):
                            val = unit_value(code, sw, use_sw, n, k, p, q)
                            if val == 0:
                                continue
                            at = place[idx[n, k, p, q]]
                            for a in range(kh):
                                axpy(buf, at + a * wpad * c_, val, wflat, wk + a * run, run)
            else:
                # dense: every plane position, zeros included (0 * inf is NaN as in numpy)
                for k in range(k_):
                    dense_u[:] = 0
                    for p in range(hp):
                        for q in range(wp):
                            dense_u[idx[n, k, p, q]] += unit_value(code, sw, use_sw, n, k, p, q)
                    wk = k * kh * run
                    for i in range(ho):
                        for j in range(wo):
                            val = dense_u[i * wo + j]
                            for a in range(kh):
                                axpy(buf, ((i + a) * wpad + j) * c_, val, wflat, wk + a * run, run)
            for c in range(c_):
                for y in range(hh):
                    src = ((y + ph) * wpad + pw) * c_ + c
                    for x in range(ww):
                        r[n, c, y, x] = buf[src + x * c_]


@njit(parallel=PARALLEL, cache=True)
def _render_conv_kernel(code, idx, sw, use_sw, wr, wofs_b, bzero, off, blk_c0, blk_nv, vl, ho,
                        wo, ph, pw, kh, kw, ww, nchunks, r):
    """Render as a dense correlation of the unpooled code with the flipped templates.

    Per sample the unpooled code goes into a channel-major buffer with a zero border of
    (kh-1, kw-1); output pixels are then matched against the flipped templates with the
    register-blocked ``conv_tile`` (output channels in vectors, pixels in tiles), the switch
    being the identity (leak 1). For finite templates this is the same sum of terms as the
    reference (the border only adds 0 * w = 0).
    """
    n_, k_, hp, wp = code.shape
    c_, npix = r.shape[1], r.shape[2]  # r is (N, C, H*W)
    hu, wu = ho + 2 * (kh - 1), wo + 2 * (kw - 1)
    plane = hu * wu
    nb = blk_c0.shape[0]
    kbw_max = NV_MAX * vl
    place = place_table(ho, wo, wu, 1, (kh - 1) * wu + kw - 1)
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        upad = vector_zeros(k_ * plane, r.dtype)
        zb = vector_empty((npix + PIX_MAX) * kbw_max, r.dtype)
        xb = np.empty(PIX_MAX, dtype=np.int64)
        for n in range(lo, hi):
            for k in range(k_):
                for i in range(ho):
                    row = k * plane + (i + kh - 1) * wu + kw - 1
                    upad[row:row + wo] = 0
                for p in range(hp):
                    for q in range(wp):
                        upad[k * plane + place[idx[n, k, p, q]]] += unit_value(
                            code, sw, use_sw, n, k, p, q)
            for b in range(nb):
                c0 = blk_c0[b]
                nv = blk_nv[b]
                kbw = nv * vl
                npx = PIX[nv]
                y = 0
                x = 0
                for f0 in range(0, npix, npx):
                    for p in range(npx):
                        xb[p] = (y + ph) * wu + x + pw
                        if f0 + p < npix - 1:  # the tail of the last tile repeats a pixel
                            x += 1
                            if x == ww:
                                x = 0
                                y += 1
                    conv_tile(wr, wofs_b[b], upad, xb, off, off.shape[0], bzero, 0, zb,
                              f0 * kbw, kbw, 1.0, nv, PIX)
                for l in range(min(kbw, c_ - c0)):
                    out = r[n, c0 + l]
                    for f in range(npix):
                        out[f] = zb[f * kbw + l]



@njit(parallel=PARALLEL, cache=True)
def _render_gemm_kernel(code, idx, sw, use_sw, wt, blk_c0, blk_nv, cpad, ho, wo, hh, ww, ph, pw,
                        kh, kw, group, vl, nchunks, r):
    """Render as small GEMMs: ``out[(i+a, j+b), :] += U[:, i, j] . W[:, :, a, b]``, cropped.

    A group of samples is unpooled (``u[s, k, (i, j)]``, collisions summed in unit order; a
    plain copy for pool 1). Its plane positions are cut into tiles of ``P``; for each tile,
    block of ``NV`` vectors of output channels and tap (a, b) in order, ``gemm_tile`` adds
    the K-term dot products into a channel-last buffer of the uncropped transposed output
    (k in order within a tap), which is then cropped into r. The tile's rows of u stay in L1
    across the taps while the templates stream in order. Every (position, tap) term of the
    reference is computed, zeros included, so the IEEE semantics are the dense reference's
    for any values (terms that land in the crop border are computed and dropped). Tiles are
    padded with a zero position that writes a scratch sample slot.
    """
    n_, k_, hp, wp = code.shape
    c_ = r.shape[1]  # r is (N, C, H*W)
    npos = ho * wo
    hu, wu = ho + kh - 1, wo + kw - 1
    opl = hu * wu * cpad  # one sample of the uncropped output
    kplane = k_ * npos
    nb = blk_c0.shape[0]
    crop = place_table(hh, ww, wu, 1, ph * wu + pw)  # image pixel -> position in out
    rf = r.reshape(-1)
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        u = vector_zeros((group + 1) * kplane, r.dtype)  # the last sample slot stays zero
        out = vector_empty((group + 1) * opl, r.dtype)  # the last one is scratch
        aoff = np.empty(k_, dtype=np.int64)
        boff = np.empty(k_, dtype=np.int64)
        for k in range(k_):
            aoff[k] = k * npos
            boff[k] = k * cpad
        posa = np.empty(group * npos + PIX_MAX, dtype=np.int64)
        poso = np.empty(group * npos + PIX_MAX, dtype=np.int64)
        for g0 in range(lo, hi, group):
            ns = min(group, hi - g0)
            out[:ns * opl] = 0
            m = 0
            for s in range(ns):
                unpool_sample(code, idx, sw, use_sw, g0 + s, npos, u, s * kplane)
                for i in range(ho):
                    for j in range(wo):
                        posa[m] = s * kplane + i * wo + j
                        poso[m] = s * opl + (i * wu + j) * cpad
                        m += 1
            total = m
            for p in range(PIX_MAX):
                posa[total + p] = group * kplane
                poso[total + p] = group * opl
            for blk in range(nb):
                c0 = blk_c0[blk]
                nv = blk_nv[blk]
                npx = GPIX[nv]
                for m0 in range(0, total, npx):
                    pa = posa[m0:]
                    po = poso[m0:]
                    for a in range(kh):
                        for b in range(kw):
                            gemm_tile(out[(a * wu + b) * cpad + c0:], po, u, pa, aoff,
                                      wt[(a * kw + b) * k_ * cpad + c0:], boff, 0, k_, nv,
                                      GPIX)
            # the crop, channel-last -> channel-first, by register transposes
            for s in range(ns):
                copy_out(out, s * opl, crop, cpad, hh * ww, c_, vl, rf, (g0 + s) * c_ * hh * ww,
                         hh * ww)



@njit(parallel=PARALLEL, cache=True)
def _render_dots_kernel(code, idx, sw, use_sw, wl, kpad, vl, ho, wo, ph, pw, kh, kw, nchunks,
                        r):
    """Render with the vectors over the templates: for few output channels (the first layer),
    where vectors over C would be mostly empty.

    Per sample the unpooled code goes into a channel-last buffer ``u[Q*kpad + k]`` with a zero
    border of (kh-1, kw-1); each output pixel is then one dot product of the flipped
    templates of its channel, ``wl[c][a][b][k]``, with the buffer around it: ``dot_tile``
    over the taps and vectors of k, for up to 8 pixels of a row at a time. Each pixel is
    computed whole by one thread, so the result does not depend on the threads. For finite
    templates this is the reference's sum of terms (the border only adds 0 * w = 0).
    """
    n_, k_, hp, wp = code.shape
    c_, hh, ww = r.shape[1], r.shape[2], r.shape[3]
    hu, wu = ho + 2 * (kh - 1), wo + 2 * (kw - 1)
    nkv = kpad // vl
    nsteps = kh * kw * nkv
    woff = np.empty(nsteps, dtype=np.int64)
    xoff = np.empty(nsteps, dtype=np.int64)
    for a in range(kh):
        for b in range(kw):
            for v in range(nkv):
                t = (a * kw + b) * nkv + v
                woff[t] = t * vl
                # pixel (y, x) reads plane position (y + ph - a, x + pw - b)
                xoff[t] = -(a * wu + b) * kpad + v * vl
    place = place_table(ho, wo, wu * kpad, kpad, ((kh - 1) * wu + kw - 1) * kpad)
    rf = r.reshape(n_ * c_ * hh * ww)
    for chunk in prange(nchunks):
        lo, hi = chunk_bounds(chunk, nchunks, n_)
        u = vector_zeros(hu * wu * kpad, r.dtype)  # the border stays zero
        bases = np.empty(8, dtype=np.int64)
        for n in range(lo, hi):
            unpool_bordered(code, idx, sw, use_sw, n, place, ho, wo, kh, kw, wu, kpad, u)
            for c in range(c_):
                wofs = c * nsteps * vl
                for y in range(hh):
                    row = ((y + ph + kh - 1) * wu + pw + kw - 1) * kpad
                    out = ((n * c_ + c) * hh + y) * ww
                    x = 0
                    while x < ww:
                        npx = 8 if ww - x >= 8 else (4 if ww - x >= 4 else
                                                     (2 if ww - x >= 2 else 1))
                        for p in range(npx):
                            bases[p] = row + (x + p) * kpad
                        dot_tile(rf[out + x:], wl, wofs, u, bases, woff, xoff, nsteps, npx)
                        x += npx


def _render_dots(code, idx, sw, use_sw, templates, ho, wo, ph, pw, vl, r):
    n, c = r.shape[:2]
    k, _, kh, kw = templates.shape
    kpad = -(-k // vl) * vl
    wl = buffers.aligned_zeros((c, kh, kw, kpad), r.dtype)
    wl[..., :k] = templates.transpose(1, 2, 3, 0)
    _render_dots_kernel(code, idx, sw, use_sw, wl.reshape(-1), kpad, vl, ho, wo, ph, pw, kh, kw,
                        num_chunks(n), r)


_GEMM_POSITIONS = 192  # plane positions per tap and group of samples in the GEMM render


def _render_gemm(code, idx, sw, use_sw, templates, ho, wo, ph, pw, vl, r):
    n, c, hh, ww = r.shape
    k, _, kh, kw = templates.shape
    c0, nv, nvec = channel_blocks(c, vl)
    cpad = nvec * vl
    wt = buffers.aligned_zeros((kh, kw, k, cpad), r.dtype)
    wt[..., :c] = templates.transpose(2, 3, 0, 1)
    group = max(1, min(-(-n // num_chunks(n)), _GEMM_POSITIONS // (ho * wo)))
    _render_gemm_kernel(code, idx, sw, use_sw, wt.reshape(-1), c0, nv, cpad, ho, wo, hh, ww, ph,
                        pw, kh, kw, group, vl, num_chunks(n), r.reshape(n, c, hh * ww))


# Measured cost of one vector FMA of the dense conv_tile path relative to one vector update of
# the scatter path (AVX-512 host, MNIST-like layers).
_DENSE_VS_SCATTER = 0.25


def _render_conv(code, idx, sw, use_sw, templates, ho, wo, ph, pw, vl, r):
    n, c, hh, ww = r.shape
    k, _, kh, kw = templates.shape
    flipped = np.ascontiguousarray(templates[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    wr, _, c0, nv, wofs = relayout(flipped, np.zeros(c, dtype=code.dtype), vl)
    bzero = buffers.aligned_zeros(-(-c // vl) * vl, code.dtype)
    hu, wu = ho + 2 * (kh - 1), wo + 2 * (kw - 1)
    kk, aa, bb = np.meshgrid(np.arange(k), np.arange(kh), np.arange(kw), indexing="ij")
    off = (kk * hu * wu + aa * wu + bb).reshape(-1).astype(np.int64)
    _render_conv_kernel(code, idx, sw, use_sw, wr, wofs, bzero, off, c0, nv, vl, ho, wo,
                        ph, pw, kh, kw, ww, num_chunks(n), r.reshape(n, c, hh * ww))


def plan_render(code, idx, templates, geometry, switches, w_finite=None):
    """The algorithm the automatic choice takes: "winograd" where ``_winograd_pays``, else
    ``_plan_exact``'s. ``w_finite``: whether the templates are finite, where known."""
    if _winograd_pays(code, templates, geometry):
        return "winograd"
    return _plan_exact(code, templates, geometry, w_finite)


def _winograd_pays(code, templates, geometry):
    """Whether the automatic choice takes the Winograd kernel (see winograd.render_applies).

    It computes the whole rendered plane, 16 products per 2x2 block, where the transposed
    correlation of a dense code costs 9 per code unit: on small planes the rendered border
    outweighs the saving (conv-small layer 4, 5x5 code -> 7x7: 256 vs 225 products, measured
    5.5 vs 5.2 ms), so a dense code takes it only where it does at most 0.9x the products.
    A pooled code's other path scatters unit by unit and is slower per product (l3: 10.3 vs
    15.1 ms).
    """
    if code.shape[0] == 0 or not winograd.AUTO:
        return False
    hh, ww = geometry.input
    units = code.shape[2] * code.shape[3]
    ho, wo = geometry.plane
    blocks = -(-hh // 2) * -(-ww // 2)
    cheaper = units < ho * wo or blocks * 16 <= 0.9 * units * 9
    return cheaper and winograd.render_applies(templates, geometry.padding)


def _plan_exact(code, templates, geometry, w_finite=None):
    """"dots" for few output channels (C < lanes) and finite templates, else the cheapest of
    "gemm", "conv" (finite templates) and "scatter"."""
    n, k = code.shape[:2]
    _, c, kh, kw = templates.shape
    hh, ww = geometry.input
    ho, wo = geometry.plane
    vl = lanes(code.dtype)
    if w_finite is None:
        w_finite = _finite(templates)
    # few output channels: dot products over the templates (vectors over C or kw*C would be
    # mostly empty; measured at N = 256, C = 1, 5x5: 15.5 -> 4.5 ms; C = 3, 3x3: 31 -> 12 ms)
    if w_finite and c < vl:
        return "dots"
    # dense correlation (every plane position, SIMD over output channels) or scatter from the
    # non-zero units (SIMD over kw*C): pick the cheaper
    dense = n * hh * ww * k * -(-c // vl) * kh * kw * _DENSE_VS_SCATTER
    scatter = count_nonzero(code) * kh * -(-(kw * c) // vl)
    # the GEMM path: every plane position with every tap (no border, exact for any values)
    gemm = n * ho * wo * kh * kw * k * -(-c // vl) * _DENSE_VS_SCATTER
    if gemm < min(scatter, dense if w_finite else np.inf):
        return "gemm"
    if w_finite and dense < scatter:
        return "conv"
    return "scatter"


def render(code, idx, templates, geometry, switches, algorithm="auto"):
    """The top-down render (see ``fastdrmm.ops.render``) by ``algorithm``: one of
    ``ALGORITHMS`` or "auto" (``plan_render``). "dots" and "conv" need finite templates,
    "winograd" 3x3 templates and a padding of at most 2; the samples the Winograd kernel
    flags are re-rendered by the exact automatic choice."""
    w_finite = _finite(templates)  # one pass, for the plan and the kernels alike
    name = choose(algorithm, ALGORITHMS,
                  lambda: plan_render(code, idx, templates, geometry, switches, w_finite))
    if name == "winograd":
        if not winograd.render_applies(templates, geometry.padding, any_size=True):
            raise ValueError("algorithm='winograd' needs 3x3 templates and a padding of at "
                             f"most 2, got {templates.shape[2]}x{templates.shape[3]} and "
                             f"{geometry.padding}")
        if code.shape[0]:
            r, redo = winograd.render(code, idx, templates, geometry, switches)
            redo_flagged(redo, lambda c, i, s: _render_exact(c, i, templates, geometry, s,
                                                             w_finite),
                         code, idx, switches, into=r)
            return r
        name = "scatter"  # an empty batch: nothing to render
    return _render_with(name, code, idx, templates, geometry, switches, w_finite)


def _finite(templates):
    return bool(np.isfinite(templates).all())


def _render_exact(code, idx, templates, geometry, switches, w_finite):
    """The render by the exact automatic choice (never Winograd)."""
    return _render_with(_plan_exact(code, templates, geometry, w_finite), code, idx, templates,
                        geometry, switches, w_finite)


def _render_scatter(code, idx, sw, use_sw, templates, ho, wo, ph, pw, vl, r, w_finite):
    wr = np.ascontiguousarray(templates.transpose(0, 2, 3, 1))  # (K, kh, kw, C)
    _render_kernel(code, idx, sw, use_sw, wr, w_finite, ho, wo, ph, pw, num_chunks(len(r)), r)


_RENDERERS = {"scatter": _render_scatter, "conv": _render_conv, "gemm": _render_gemm,
              "dots": _render_dots}
_NEED_FINITE = {"conv": "the dense-correlation render (algorithm='conv')",
                "dots": "the dot-product render (algorithm='dots')"}


def _render_with(name, code, idx, templates, geometry, switches, w_finite):
    """The render by the exact algorithm ``name`` (``w_finite``: the templates are finite)."""
    n = code.shape[0]
    c = templates.shape[1]
    hh, ww = geometry.input
    r = buffers.empty((n, c, hh, ww), code.dtype)
    if n == 0:
        return r
    if name in _NEED_FINITE and not w_finite:
        raise ValueError(f"{_NEED_FINITE[name]} needs finite templates")
    use_sw, sw = switch_args(code, switches)
    extra = (w_finite,) if name == "scatter" else ()  # the scatter kernel guards non-finite
    _RENDERERS[name](code, idx, sw, use_sw, templates, *geometry.plane, *geometry.padding,
                     lanes(code.dtype), r, *extra)
    return r
