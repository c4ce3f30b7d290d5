"""Reading the pooled units of a code: the switch arguments, a unit's value, a sample's
finiteness, and the unpooled planes (the ``unpool`` op and the per-sample forms the top-down
kernels build their buffers with).

Collisions (several units of one template at one plane position, from overlapping windows)
are always summed in row-major unit order, as the reference's ``np.add.at`` does.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import buffers
from ._partition import PARALLEL

__all__ = ["switch_args", "unit_value", "sample_finite", "unpool", "unpool_sample",
           "unpool_bordered"]


def switch_args(code, switches):
    """One compiled signature whatever ``switches`` is: ``(use_sw, sw)``, a flag and an
    array (a 1-element placeholder without switches)."""
    if switches is None:
        return False, np.zeros((1, 1, 1, 1), dtype=code.dtype)
    return True, switches


@njit(inline="always")
def unit_value(code, sw, use_sw, n, k, p, q):
    """Unit (n, k, p, q) of the code, times its switch if ``use_sw``."""
    val = code[n, k, p, q]
    if use_sw:
        val = val * sw[n, k, p, q]
    return val


@njit(cache=True)
def sample_finite(code, sw, use_sw, n):
    """True when every value code*switches of sample n is finite."""
    _, k_, hp, wp = code.shape
    for k in range(k_):
        for p in range(hp):
            for q in range(wp):
                v = unit_value(code, sw, use_sw, n, k, p, q)
                if not np.isfinite(v):
                    return False
    return True


@njit(parallel=PARALLEL, cache=True)
def _unpool_kernel(code, idx, sw, use_sw, u):
    n_, k_, hp, wp = code.shape
    plane = u.shape[2]
    for nk in prange(n_ * k_):
        n = nk // k_
        k = nk - n * k_
        row = u[n, k]
        for f in range(plane):
            row[f] = 0
        for p in range(hp):
            for q in range(wp):
                val = code[n, k, p, q]
                if use_sw:
                    val = val * sw[n, k, p, q]
                row[idx[n, k, p, q]] += val


def unpool(code, idx, plane_shape, switches):
    """The unpooled code (see ``fastdrmm.ops.unpool``): parallel over (sample, template)
    planes, each zeroed and then added to at its argmax positions in unit order."""
    n, k = code.shape[:2]
    ho, wo = plane_shape
    u = buffers.empty((n, k, ho * wo), code.dtype)
    if n * k:
        use_sw, sw = switch_args(code, switches)
        _unpool_kernel(code, idx, sw, use_sw, u)
    return u.reshape(n, k, ho, wo)


@njit(inline="always")
def unpool_sample(code, idx, sw, use_sw, n, npos, u, uofs):
    """u[uofs + k*npos + f] = the unpooled plane k of sample n (collisions summed in unit
    order); where the argmaxes are the identity (pool 1) a straight copy, checked in the
    same pass. One flat view per sample: views per (sample, template) cost more than the
    copy on small planes (1.07 -> 0.2 ms on conv-small's layer 4)."""
    _, k_, hp, wp = code.shape
    nunit = hp * wp
    cf = code[n].reshape(k_ * nunit)
    jf = idx[n].reshape(k_ * nunit)
    sf = sw[n if use_sw else 0].reshape(-1)  # (a 1-element placeholder without switches)
    if nunit == npos:
        ident = True
        for k in range(k_):
            src = k * nunit
            dst = uofs + k * npos
            for f in range(nunit):
                val = cf[src + f]
                if use_sw:
                    val = val * sf[src + f]
                u[dst + f] = val
                ident &= jf[src + f] == f
        if ident:
            return
    for k in range(k_):
        src = k * nunit
        dst = uofs + k * npos
        for f in range(npos):
            u[dst + f] = 0
        for f in range(nunit):
            val = cf[src + f]
            if use_sw:
                val = val * sf[src + f]
            u[dst + jf[src + f]] += val


@njit(inline="always")
def unpool_bordered(code, idx, sw, use_sw, n, place, ho, wo, kh, kw, wu, kpad, u):
    """Sample n unpooled channel-last, ``u[place[f] + k]`` (collisions summed in unit order),
    in a buffer whose zero border of (kh-1, kw-1) is left as it is."""
    _, k_, hp, wp = code.shape
    for i in range(ho):
        row = ((i + kh - 1) * wu + kw - 1) * kpad
        u[row:row + wo * kpad] = 0
    for k in range(k_):
        for p in range(hp):
            for q in range(wp):
                u[place[idx[n, k, p, q]] + k] += unit_value(code, sw, use_sw, n, k, p, q)
