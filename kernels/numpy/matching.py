"""Bottom-up matching, switch and max-over-translation pooling (reference)."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def pad(x, padding):
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def correlate(x, templates, padding):
    """z[n,k,i,j] = sum_{c,u,v} W[k,c,u,v] xpad[n,c,i+u,j+v], one matmul per tap."""
    xpad = pad(x, padding)
    n = x.shape[0]
    k, _, kh, kw = templates.shape
    ho, wo = xpad.shape[2] - kh + 1, xpad.shape[3] - kw + 1
    if ho * wo <= kh * kw and np.isfinite(xpad).all() and np.isfinite(templates).all():
        # few output positions, many taps (whole-input templates): one matrix product. Only
        # for finite data: BLAS may skip 0 * NaN terms, the per-tap loop below never does.
        windows = sliding_window_view(xpad, (kh, kw), axis=(2, 3))  # (N, C, Ho, Wo, kh, kw)
        z = np.tensordot(windows, templates, axes=([1, 4, 5], [1, 2, 3]))
        return np.ascontiguousarray(z.transpose(0, 3, 1, 2))
    z = np.zeros((n, k, ho, wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            z += np.einsum("nchw,kc->nkhw", xpad[:, :, u:u + ho, v:v + wo], templates[:, :, u, v])
    return z


def switch(z, leak):
    """y = z for z > 0 (and NaN), else leak*z; the plain ReLU (leak 0) maps every z <= 0,
    -inf included, to 0 rather than to 0*(-inf) = NaN."""
    keep = (z > 0) | np.isnan(z)
    if leak == 0:
        return np.where(keep, z, z.dtype.type(0))
    return np.where(keep, z, z * z.dtype.type(leak))


def pool_argmax(y, pool, stride):
    """Window max and first row-major argmax (flat into y's plane); the first NaN wins."""
    ho, wo = y.shape[2:]
    hp, wp = (ho - pool[0]) // stride[0] + 1, (wo - pool[1]) // stride[1] + 1
    rows = np.arange(hp)[:, None] * stride[0]
    cols = np.arange(wp)[None, :] * stride[1]
    best = None
    for a in range(pool[0]):
        for b in range(pool[1]):
            cand = y[:, :, a:a + stride[0] * (hp - 1) + 1:stride[0],
                     b:b + stride[1] * (wp - 1) + 1:stride[1]]
            flat = ((rows + a) * wo + cols + b).astype(np.int32)
            if best is None:
                best = cand.copy()
                idx = np.broadcast_to(flat, cand.shape).copy()
                continue
            take = ~np.isnan(best) & ((cand > best) | np.isnan(cand))
            best = np.where(take, cand, best)
            idx = np.where(take, flat, idx)
    return best, idx.astype(np.int32)


def match_switch_pool(x, templates, bias, geometry, leak):
    z = correlate(x, templates, geometry.padding) + bias[None, :, None, None]
    return pool_argmax(switch(z, leak), geometry.pool, geometry.stride)


def match_at(x, templates, idx, geometry, switches):
    """The matching read at the positions idx (no bias, identity switch), times switches;
    exactly 0 where a switch is 0 (those units are not matched at all)."""
    z = correlate(x, templates, geometry.padding)
    n, k, ho, wo = z.shape
    rows = np.arange(n * k, dtype=np.intp).reshape(n, k, 1, 1) * (ho * wo)
    picked = z.reshape(-1)[idx.astype(np.intp) + rows]
    if switches is None:
        return picked
    return np.multiply(picked, switches, out=np.zeros_like(picked), where=switches != 0)
