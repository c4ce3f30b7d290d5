"""M-step statistics of the templates (reference)."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .matching import pad
from .rendering import unpool


def shifted_planes(u, kernel_size, input_shape, padding):
    """S[(k,a,b), n, y, x] = U[n, k, y+ph-a, x+pw-b] on the cropped (H, W) image.

    Row (k, a, b) of S is the image that template tap W[k, :, a, b] paints, so the rendering
    is ``r[:, c] = sum_rows W[k, c, a, b] * S[row]`` and G = S S^T.
    """
    n, k, ho, wo = u.shape
    kh, kw = kernel_size
    ph, pw = padding
    h, w = input_shape
    out = np.zeros((k, kh, kw, n, h, w), dtype=u.dtype)
    full = np.zeros((n, k, ho + kh - 1, wo + kw - 1), dtype=u.dtype)
    for a in range(kh):
        for b in range(kw):
            full[...] = 0
            full[:, :, a:a + ho, b:b + wo] = u
            out[:, a, b] = full[:, :, ph:ph + h, pw:pw + w].transpose(1, 0, 2, 3)
    return out.reshape(k * kh * kw, -1)


def weighted_patches(u, xpad, kernel_size):
    """B[k,c,a,b] = sum_{n,i,j} u[n,k,i,j] * xpad[n,c,i+a,j+b]."""
    kh, kw = kernel_size
    ho, wo = u.shape[2:]
    if ho * wo <= kh * kw and np.isfinite(xpad).all() and np.isfinite(u).all():
        # few output positions, many taps (whole-input templates): one matrix product. Only
        # for finite data: BLAS may skip 0 * NaN terms, the per-tap loop below never does.
        windows = sliding_window_view(xpad, (kh, kw), axis=(2, 3))  # (N, C, Ho, Wo, kh, kw)
        return np.tensordot(u, windows, axes=([0, 2, 3], [0, 2, 3]))
    big_b = np.empty((u.shape[1], xpad.shape[1], kh, kw), dtype=u.dtype)
    for a in range(kh):
        for b in range(kw):
            big_b[:, :, a, b] = np.einsum("nkhw,nchw->kc", u, xpad[:, :, a:a + ho, b:b + wo])
    return big_b


def template_stats(x, code, idx, geometry, switches, gram):
    kernel_size, padding = geometry.kernel, geometry.padding
    u = unpool(code, idx, geometry.plane, switches)
    big_b = weighted_patches(u, pad(x, padding), kernel_size).astype(x.dtype, copy=False)
    s = u.sum(axis=(0, 2, 3))
    big_g = None
    if gram:
        planes = shifted_planes(u, kernel_size, geometry.input, padding)
        big_g = planes @ planes.T
    return big_b, s, big_g
