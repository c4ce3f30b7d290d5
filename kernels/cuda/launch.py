"""Launch configuration of the CUDA C kernels: one source of truth for the GPU backend, the
NVRTC compile check and the host harness under tests/.

Everything here is pure Python (no CuPy): the op drivers below take a ``device`` object with
``empty(shape, dtype)``, ``zeros(shape, dtype)`` and ``launch(name_expression, grid, block,
args)``; ``backend.py`` implements it with CuPy, the tests with NumPy and ctypes. Arguments
are passed in kernel order: arrays (pointers), ``numpy.int32`` and scalars of the dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def match_tiles(ho_wo, hp_wp, kernel, channels, pool, stride, cfg=GPU):
    """(tph, tpw, cchunk) of match_pool_tiled, or None when even a 1x1 tile does not fit."""
    (hp, wp), (kh, kw) = hp_wp, kernel

    def fits(tph, tpw):
        zh, zw = (tph - 1) * stride[0] + pool[0], (tpw - 1) * stride[1] + pool[1]
        return (cfg.kb * zh * zw <= cfg.zs_cap and (zh + kh - 1) * (zw + kw - 1) <= cfg.xs_cap
                and cfg.kb * kh * kw <= cfg.ws_cap)

    side = max(1, math.isqrt(max(1, cfg.threads // cfg.kb)))
    tph, tpw = min(side, hp), min(side, wp)
    while not fits(tph, tpw):
        if tph == 1 and tpw == 1:
            return None
        if tph >= tpw:
            tph = max(1, tph // 2)
        else:
            tpw = max(1, tpw // 2)
    zh, zw = (tph - 1) * stride[0] + pool[0], (tpw - 1) * stride[1] + pool[1]
    patch = (zh + kh - 1) * (zw + kw - 1)
    cchunk = max(1, min(channels, cfg.xs_cap // patch, cfg.ws_cap // (cfg.kb * kh * kw)))
    return tph, tpw, cchunk


def match_switch_pool(dev, x, templates, bias, padding, pool, stride, leak, cfg=GPU):
    n, c, h, w = x.shape
    k, _, kh, kw = templates.shape
    ho, wo = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    hp, wp = (ho - pool[0]) // stride[0] + 1, (wo - pool[1]) // stride[1] + 1
    dtype = np.dtype(x.dtype)
    out_h = dev.empty((n, k, hp, wp), dtype)
    out_idx = dev.empty((n, k, hp, wp), np.int32)
    if out_h.size == 0:
        return out_h, out_idx
    _i(x.size, templates.size, out_h.size)
    args = (x, templates, bias, out_h, out_idx,
            *_i(n, c, h, w, k, kh, kw, *padding, *pool, *stride, ho, wo, hp, wp),
            dtype.type(leak))
    tiles = match_tiles((ho, wo), (hp, wp), (kh, kw), c, pool, stride, cfg)
    if tiles is None:
        dev.launch(name_expression("match_pool_direct", dtype), (_blocks(out_h.size, cfg), 1, 1),
                   (cfg.threads, 1, 1), args)
    else:
        tph, tpw, cchunk = tiles
        grid = -(-hp // tph) * -(-wp // tpw) * -(-k // cfg.kb) * n
        dev.launch(name_expression("match_pool_tiled", dtype), (_i(grid)[0], 1, 1),
                   (cfg.threads, 1, 1), (*args, *_i(tph, tpw, cchunk)))
    return out_h, out_idx


def match_at(dev, x, templates, idx, padding, switches, cfg=GPU):
    """The matching at the positions idx, times the switches: one thread per output unit."""
    n, c, h, w = x.shape
    k, _, kh, kw = templates.shape
    wo = w + 2 * padding[1] - kw + 1
    dtype = np.dtype(x.dtype)
    out = dev.empty(idx.shape, dtype)
    if out.size == 0:
        return out
    _i(x.size, templates.size, out.size)
    has = switches is not None
    args = (x, templates, idx, switches if has else x, out,  # x: a placeholder, never read
            *_i(n, c, h, w, k, kh, kw, *padding, wo, idx.shape[2] * idx.shape[3], int(has)))
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


def render_tiles(hw, kernel, cfg=GPU):
    """(th, tw, kchunk) of render_tiled, or None when even a 1x1 tile does not fit."""
    (h, w), (kh, kw) = hw, kernel
    if cfg.kb * kh * kw > cfg.ws_cap:
        return None
    tw = min(w, cfg.threads)
    th = min(h, max(1, cfg.threads // tw))
    while (th + kh - 1) * (tw + kw - 1) > cfg.xs_cap:
        if th == 1 and tw == 1:
            return None
        if th >= tw:
            th = max(1, th // 2)
        else:
            tw = max(1, tw // 2)
    kchunk = max(1, min(cfg.xs_cap // ((th + kh - 1) * (tw + kw - 1)),
                        cfg.ws_cap // (cfg.kb * kh * kw)))
    return th, tw, kchunk


def render(dev, code, idx, templates, input_shape, padding, switches, cfg=GPU):
    k, c, kh, kw = templates.shape
    n = code.shape[0]
    h, w = input_shape
    ho, wo = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    dtype = np.dtype(code.dtype)
    r = dev.empty((n, c, h, w), dtype)
    if r.size == 0:
        return r
    u = unpool(dev, code, idx, (ho, wo), switches, cfg)
    args = (u, templates, r, *_i(n, k, c, h, w, ho, wo, kh, kw, *padding))
    tiles = render_tiles((h, w), (kh, kw), cfg)
    if tiles is None:
        dev.launch(name_expression("render_direct", dtype), (_blocks(r.size, cfg), 1, 1),
                   (cfg.threads, 1, 1), args)
    else:
        th, tw, kchunk = tiles
        grid = -(-h // th) * -(-w // tw) * -(-c // cfg.kb) * n
        dev.launch(name_expression("render_tiled", dtype), (_i(grid)[0], 1, 1),
                   (cfg.threads, 1, 1), (*args, *_i(th, tw, kchunk)))
    return r


def template_stats(dev, x, code, idx, kernel_size, padding, switches, gram, cfg=GPU):
    n, c, h, w = x.shape
    k = code.shape[1]
    kh, kw = kernel_size
    ho, wo = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    dtype = np.dtype(x.dtype)
    u = unpool(dev, code, idx, (ho, wo), switches, cfg)
    big_b = dev.empty((k, c, kh, kw), dtype)
    s = dev.empty((k,), dtype)
    rows = k * kh * kw
    big_g = dev.empty((rows, rows), dtype) if gram else None
    block = (cfg.threads, 1, 1)
    geometry = _i(n, k, c, h, w, ho, wo, kh, kw, *padding)
    if big_b.size:
        dev.launch(name_expression("stats_b", dtype), (_i(big_b.size)[0], 1, 1), block,
                   (u, x, big_b, *geometry))
    dev.launch(name_expression("stats_s", dtype), (k, 1, 1), block,
               (u, s, *_i(n, k, ho * wo)))
    if gram:
        dev.launch(name_expression("stats_g", dtype), (_i(rows * rows)[0], 1, 1), block,
                   (u, big_g, *_i(n, k, h, w, ho, wo, kh, kw, *padding)))
    return big_b, s, big_g
