"""Launch configuration of the CUDA C kernels: one source of truth for the GPU backend, the
NVRTC compile check and the host harness under tests/.

Everything here is pure Python (no CuPy): the op drivers below take the op's Geometry
(``fastdrmm.kernels.geometry``: every size, computed once by ``fastdrmm.ops``) and a
``device`` object with ``empty(shape, dtype)``, ``zeros(shape, dtype)`` and
``launch(name_expression, grid, block, args)``; ``backend.py`` implements it with CuPy, the
tests with NumPy and ctypes. Arguments are passed in kernel order: arrays (pointers),
``numpy.int32`` and scalars of the dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SOURCES = {
    "matching.cu": ("match_pool_tiled", "match_pool_direct", "match_at"),
    "rendering.cu": ("unpool_scatter", "render_tiled", "render_direct"),
    "statistics.cu": ("stats_b", "stats_s", "stats_g"),
}
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
INT_MAX = 2**31 - 1


def name_expression(kernel, dtype):
    return f"{kernel}<{CTYPES[np.dtype(dtype)]}>"


def name_expressions(filename):
    """The templated kernels of one source, for float and double (RawModule's list)."""
    return [f"{k}<{t}>" for k in SOURCES[filename] for t in ("float", "double")]


@dataclass(frozen=True)
class Config:
    """Compile-time tile constants (-D defines) and the block size derived from them."""

    threads: int = 256   # threads per (1-D) block, a power of two
    kb: int = 4          # templates (matching) / channels (rendering) per block
    xs_cap: int = 2048   # shared elements: staged input or code patch
    ws_cap: int = 1024   # shared elements: staged templates
    zs_cap: int = 1024   # shared elements: switched matches of a tile

    def __post_init__(self):
        if self.threads < 1 or self.threads & (self.threads - 1):
            raise ValueError("threads must be a power of two")

    def defines(self):
        return (f"-DFD_THREADS={self.threads}", f"-DFD_KB={self.kb}",
                f"-DFD_XS_CAP={self.xs_cap}", f"-DFD_WS_CAP={self.ws_cap}",
                f"-DFD_ZS_CAP={self.zs_cap}")


GPU = Config()
STD = "--std=c++17"


def compile_options(cfg=GPU):
    """NVRTC options of the loader and of the compile check (no fast math: NaN rules)."""
    return (STD, *cfg.defines())


def _i(*values):
    for v in values:
        if v > INT_MAX:
            raise ValueError("array too large for the 32-bit indexing of the CUDA kernels")
    return tuple(np.int32(v) for v in values)


def _blocks(total, cfg):
    return max(1, -(-total // cfg.threads))


def _fitting_tile(rows, cols, fits):
    """(rows, cols) halved on the longer side until ``fits(rows, cols)``; None when even a
    1 x 1 tile does not fit."""
    while not fits(rows, cols):
        if rows == 1 and cols == 1:
            return None
        if rows >= cols:
            rows = max(1, rows // 2)
        else:
            cols = max(1, cols // 2)
    return rows, cols


class MatchTiles(NamedTuple):
    """How match_pool_tiled splits the pooled grid: a ``rows`` x ``cols`` tile of pooled
    units per block, input channels staged ``channels`` at a time."""

    rows: int
    cols: int
    channels: int


def match_tiles(geometry, channels, cfg=GPU):
    """The MatchTiles of match_pool_tiled, or None when even a 1x1 tile does not fit."""
    (hp, wp), (kh, kw) = geometry.pooled, geometry.kernel
    pool, stride = geometry.pool, geometry.stride

    def span(tph, tpw):
        return (tph - 1) * stride[0] + pool[0], (tpw - 1) * stride[1] + pool[1]

    def fits(tph, tpw):
        zh, zw = span(tph, tpw)
        return (cfg.kb * zh * zw <= cfg.zs_cap and (zh + kh - 1) * (zw + kw - 1) <= cfg.xs_cap
                and cfg.kb * kh * kw <= cfg.ws_cap)

    side = max(1, math.isqrt(max(1, cfg.threads // cfg.kb)))
    tile = _fitting_tile(min(side, hp), min(side, wp), fits)
    if tile is None:
        return None
    tph, tpw = tile
    zh, zw = span(tph, tpw)
    patch = (zh + kh - 1) * (zw + kw - 1)
    cchunk = max(1, min(channels, cfg.xs_cap // patch, cfg.ws_cap // (cfg.kb * kh * kw)))
    return MatchTiles(tph, tpw, cchunk)


def match_switch_pool(dev, x, templates, bias, geometry, leak, cfg=GPU):
    n, c = x.shape[:2]
    k = templates.shape[0]
    hp, wp = geometry.pooled
    dtype = np.dtype(x.dtype)
    out_h = dev.empty((n, k, hp, wp), dtype)
    out_idx = dev.empty((n, k, hp, wp), np.int32)
    if out_h.size == 0:
        return out_h, out_idx
    _i(x.size, templates.size, out_h.size)
    args = (x, templates, bias, out_h, out_idx,
            *_i(n, c, *geometry.input, k, *geometry.kernel, *geometry.padding, *geometry.pool,
                *geometry.stride, *geometry.plane, hp, wp),
            dtype.type(leak))
    tiles = match_tiles(geometry, c, cfg)
    if tiles is None:
        dev.launch(name_expression("match_pool_direct", dtype), (_blocks(out_h.size, cfg), 1, 1),
                   (cfg.threads, 1, 1), args)
    else:
        grid = -(-hp // tiles.rows) * -(-wp // tiles.cols) * -(-k // cfg.kb) * n
        dev.launch(name_expression("match_pool_tiled", dtype), (_i(grid)[0], 1, 1),
                   (cfg.threads, 1, 1), (*args, *_i(*tiles)))
    return out_h, out_idx


def match_at(dev, x, templates, idx, geometry, switches, cfg=GPU):
    """The matching at the positions idx, times the switches: one thread per output unit."""
    n, c = x.shape[:2]
    k = templates.shape[0]
    dtype = np.dtype(x.dtype)
    out = dev.empty(idx.shape, dtype)
    if out.size == 0:
        return out
    _i(x.size, templates.size, out.size)
    has = switches is not None
    units_per_plane = geometry.pooled[0] * geometry.pooled[1]
    args = (x, templates, idx, switches if has else x, out,  # x: a placeholder, never read
            *_i(n, c, *geometry.input, k, *geometry.kernel, *geometry.padding,
                geometry.plane[1], units_per_plane, int(has)))
    dev.launch(name_expression("match_at", dtype), (_blocks(out.size, cfg), 1, 1),
               (cfg.threads, 1, 1), args)
    return out


def unpool(dev, code, idx, plane_shape, switches, cfg=GPU):
    n, k, hp, wp = code.shape
    dtype = np.dtype(code.dtype)
    u = dev.zeros((n, k, *plane_shape), dtype)
    if code.size == 0:
        return u
    _i(u.size)
    has = switches is not None
    args = (code, idx, switches if has else code, u,
            *_i(code.size, hp * wp, plane_shape[0] * plane_shape[1], int(has)))
    dev.launch(name_expression("unpool_scatter", dtype), (_blocks(code.size, cfg), 1, 1),
               (cfg.threads, 1, 1), args)
    return u


class RenderTiles(NamedTuple):
    """How render_tiled splits the output: a ``rows`` x ``cols`` tile of rendered pixels per
    block, code channels (templates) staged ``templates`` at a time."""

    rows: int
    cols: int
    templates: int


def render_tiles(geometry, cfg=GPU):
    """The RenderTiles of render_tiled, or None when even a 1x1 tile does not fit."""
    (h, w), (kh, kw) = geometry.input, geometry.kernel
    if cfg.kb * kh * kw > cfg.ws_cap:
        return None
    tw = min(w, cfg.threads)
    tile = _fitting_tile(min(h, max(1, cfg.threads // tw)), tw,
                         lambda th, tw: (th + kh - 1) * (tw + kw - 1) <= cfg.xs_cap)
    if tile is None:
        return None
    th, tw = tile
    kchunk = max(1, min(cfg.xs_cap // ((th + kh - 1) * (tw + kw - 1)),
                        cfg.ws_cap // (cfg.kb * kh * kw)))
    return RenderTiles(th, tw, kchunk)


def render(dev, code, idx, templates, geometry, switches, cfg=GPU):
    k, c = templates.shape[:2]
    n = code.shape[0]
    h, w = geometry.input
    dtype = np.dtype(code.dtype)
    r = dev.empty((n, c, h, w), dtype)
    if r.size == 0:
        return r
    u = unpool(dev, code, idx, geometry.plane, switches, cfg)
    args = (u, templates, r, *_i(n, k, c, h, w, *geometry.plane, *geometry.kernel,
                                 *geometry.padding))
    tiles = render_tiles(geometry, cfg)
    if tiles is None:
        dev.launch(name_expression("render_direct", dtype), (_blocks(r.size, cfg), 1, 1),
                   (cfg.threads, 1, 1), args)
    else:
        grid = -(-h // tiles.rows) * -(-w // tiles.cols) * -(-c // cfg.kb) * n
        dev.launch(name_expression("render_tiled", dtype), (_i(grid)[0], 1, 1),
                   (cfg.threads, 1, 1), (*args, *_i(*tiles)))
    return r


def template_stats(dev, x, code, idx, geometry, switches, gram, cfg=GPU):
    n, c = x.shape[:2]
    k = code.shape[1]
    kh, kw = geometry.kernel
    dtype = np.dtype(x.dtype)
    u = unpool(dev, code, idx, geometry.plane, switches, cfg)
    big_b = dev.empty((k, c, kh, kw), dtype)
    s = dev.empty((k,), dtype)
    rows = k * kh * kw
    big_g = dev.empty((rows, rows), dtype) if gram else None
    block = (cfg.threads, 1, 1)
    sizes = _i(*geometry.input, *geometry.plane, kh, kw, *geometry.padding)
    if big_b.size:
        dev.launch(name_expression("stats_b", dtype), (_i(big_b.size)[0], 1, 1), block,
                   (u, x, big_b, *_i(n, k, c), *sizes))
    dev.launch(name_expression("stats_s", dtype), (k, 1, 1), block,
               (u, s, *_i(n, k, geometry.plane[0] * geometry.plane[1])))
    if gram:
        dev.launch(name_expression("stats_g", dtype), (_i(rows * rows)[0], 1, 1), block,
                   (u, big_g, *_i(n, k), *sizes))
    return big_b, s, big_g
