"""Top-down: unpooling to the argmax positions and transposed correlation (reference)."""

import numpy as np


def unpool(code, idx, plane_shape, switches):
    n, k = code.shape[:2]
    values = code if switches is None else code * switches
    u = np.zeros((n, k, plane_shape[0] * plane_shape[1]), dtype=code.dtype)
    if u.size == 0:
        return u.reshape(n, k, *plane_shape)
    rows = np.arange(n * k).repeat(idx.shape[2] * idx.shape[3])
    np.add.at(u.reshape(n * k, -1), (rows, idx.reshape(-1)), values.reshape(-1))
    return u.reshape(n, k, *plane_shape)


def transposed_correlate(u, templates, input_shape, padding):
    """r = crop(sum_k W[k] * U[k]) : the adjoint of correlate(., W) on the padded input."""
    n, _, ho, wo = u.shape
    _, c, kh, kw = templates.shape
    rpad = np.zeros((n, c, ho + kh - 1, wo + kw - 1), dtype=u.dtype)
    for a in range(kh):
        for b in range(kw):
            rpad[:, :, a:a + ho, b:b + wo] += np.einsum("nkhw,kc->nchw", u, templates[:, :, a, b])
    ph, pw = padding
    return np.ascontiguousarray(rpad[:, :, ph:ph + input_shape[0], pw:pw + input_shape[1]])


def render(code, idx, templates, geometry, switches):
    return transposed_correlate(unpool(code, idx, geometry.plane, switches), templates,
                                geometry.input, geometry.padding)
