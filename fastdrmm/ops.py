"""The four DRMM ops: validate, pick a backend, call it.

Semantics (DESIGN.md section 2), for x (N,C,H,W), templates W (K,C,kh,kw), bias b (K,):

* ``match_switch_pool`` -- the bottom-up E-step. ``z = correlate(xpad, W) + b`` on the
  (Ho, Wo) plane with Ho = H + 2*padding - kh + 1; ``y = z if z > 0 else leak*z`` (NaN stays
  NaN; with ``leak == 0``, the plain ReLU, every z <= 0 including -inf gives 0); over each
  pooling window the max of y and the flat index ``i*Wo + j`` of its first row-major position
  (a NaN wins over every number, the first NaN over later ones).
* ``unpool`` -- scatter ``code * switches`` to ``idx`` in a zero (Ho, Wo) plane; collisions add.
* ``render`` -- the top-down pass: the transposed correlation of the unpooled code with W,
  cropped by ``padding`` to (H, W). For fixed latents it is the adjoint of the matching.
* ``template_stats`` -- the M-step statistics for the unpooled code U:
  ``B[k,c,u,v] = sum_{n,i,j} U[n,k,i,j] * xpad[n,c,i+u,j+v]``, ``s[k] = sum U[n,k]`` and
  ``G = D^T D`` for the linear map ``W -> render(code, W)`` (rows and columns ordered as
  ``(k, u, v)``, one matrix shared by every input channel), so that
  ``solve(G + ridge*I, B.transpose(0, 2, 3, 1).reshape(K*kh*kw, C))`` is the least-squares
  fit of the templates to x.

Outputs have the dtype of x (or of ``code``) and live where the inputs live.
"""

from __future__ import annotations

import numpy as np

from . import _backends
from . import _validation as v

__all__ = ["match_switch_pool", "unpool", "render", "template_stats"]


def _host(obj, name, backend_name):
    if _backends.array_location(obj) != "host":
        raise TypeError(
            f"{name} lives on a GPU but the backend {backend_name!r} runs on the host; "
            "move it with .get()/.cpu() or choose a GPU backend"
        )
    return v.as_array(obj, name)


def _code_and_idx(code, idx, switches, backend_name):
    code = _host(code, "code", backend_name)
    v.check_ndim(code, "code", 4, "(N, K, Hp, Wp)")
    dtype = v.float_dtype(code, "code")
    code = np.ascontiguousarray(code)
    idx = v.as_index(_host(idx, "idx", backend_name), "idx", code.shape)
    switches = v.as_switches(switches, code.shape, dtype)
    return code, idx, switches, dtype


def match_switch_pool(x, templates, bias, *, padding=0, pool=2, stride=None, leak=0.0,
                      backend="auto"):
    """Fused template matching + bias + switch + max-over-translation pooling.

    Parameters
    ----------
    x : array (N, C, H, W), float32 or float64
    templates : array (K, C, kh, kw); cast to x's dtype
    bias : array (K,); cast to x's dtype
    padding : int or (int, int), zero padding of x
    pool, stride : int or (int, int); ``stride=None`` means ``stride=pool``
    leak : slope of the switch for z <= 0 (0 is the ReLU)
    backend : "auto", "numpy", "cpu", ...

    Returns
    -------
    h : (N, K, Hp, Wp) window maxima of the switched matches, dtype of x
    idx : (N, K, Hp, Wp) int32 flat index ``i*Wo + j`` of each maximum in the (Ho, Wo) plane
    """
    name, module = _backends.resolve(backend, (x, templates, bias))
    x = _host(x, "x", name)
    v.check_ndim(x, "x", 4, "(N, C, H, W)")
    dtype = v.float_dtype(x, "x")
    templates = _host(templates, "templates", name)
    v.check_ndim(templates, "templates", 4, "(K, C, kh, kw)")
    if templates.shape[1] != x.shape[1]:
        raise ValueError(
            f"templates have {templates.shape[1]} channels but x has {x.shape[1]}"
        )
    if templates.shape[0] < 1:
        raise ValueError("templates must hold at least one template (K >= 1)")
    bias = _host(bias, "bias", name)
    if bias.ndim != 1 or bias.shape[0] != templates.shape[0]:
        raise ValueError(f"bias must have shape ({templates.shape[0]},), got {tuple(bias.shape)}")
    geometry = v.match_geometry(x.shape[2:], templates.shape[2:], padding, pool, stride)
    leak = v.check_leak(leak)
    return module.match_switch_pool(
        np.ascontiguousarray(x),
        v.as_float(templates, "templates", dtype),
        v.as_float(bias, "bias", dtype),
        geometry.padding, geometry.pool, geometry.stride, leak,
    )


def unpool(code, idx, plane_shape, *, switches=None, backend="auto"):
    """Scatter ``code`` (times ``switches``) to the positions ``idx`` of a zero plane.

    Returns U of shape (N, K, Ho, Wo) with ``plane_shape = (Ho, Wo)``; entries that several
    windows send to one position (overlapping windows) add up.
    """
    name, module = _backends.resolve(backend, (code, idx, switches))
    code, idx, switches, _ = _code_and_idx(code, idx, switches, name)
    plane = v.pair(plane_shape, "plane_shape", minimum=1)
    v.check_index_range(idx, plane[0] * plane[1], "idx")
    return module.unpool(code, idx, plane, switches)


def render(code, idx, templates, input_shape, *, padding=0, switches=None, backend="auto"):
    """Top-down rendering: unpool the code, transposed-correlate with the templates, crop.

    Returns r of shape (N, C, H, W) with ``input_shape = (H, W)``, dtype of ``code``.
    """
    name, module = _backends.resolve(backend, (code, idx, templates, switches))
    code, idx, switches, dtype = _code_and_idx(code, idx, switches, name)
    templates = _host(templates, "templates", name)
    v.check_ndim(templates, "templates", 4, "(K, C, kh, kw)")
    if templates.shape[0] != code.shape[1]:
        raise ValueError(
            f"templates hold {templates.shape[0]} templates but code has {code.shape[1]} channels"
        )
    input_shape = v.pair(input_shape, "input_shape", minimum=1)
    padding = v.pair(padding, "padding", minimum=0)
    plane = v.plane_shape_of(input_shape, templates.shape[2:], padding)
    v.check_index_range(idx, plane[0] * plane[1], "idx")
    return module.render(code, idx, v.as_float(templates, "templates", dtype), input_shape,
                         padding, switches)


def template_stats(x, code, idx, kernel_size, *, padding=0, switches=None, gram=True,
                   backend="auto"):
    """M-step statistics of the templates: B, s and (``gram=True``) the Gram matrix G.

    Returns B (K, C, kh, kw), s (K,) and G (K*kh*kw, K*kh*kw) or None, in x's dtype.
    """
    name, module = _backends.resolve(backend, (x, code, idx, switches))
    x = _host(x, "x", name)
    v.check_ndim(x, "x", 4, "(N, C, H, W)")
    dtype = v.float_dtype(x, "x")
    code, idx, switches, code_dtype = _code_and_idx(code, idx, switches, name)
    if code_dtype != dtype:
        code = code.astype(dtype)
        if switches is not None:
            switches = switches.astype(dtype)
    if code.shape[0] != x.shape[0]:
        raise ValueError(f"code holds {code.shape[0]} samples but x holds {x.shape[0]}")
    kernel_size = v.pair(kernel_size, "kernel_size", minimum=1)
    padding = v.pair(padding, "padding", minimum=0)
    plane = v.plane_shape_of(x.shape[2:], kernel_size, padding)
    v.check_index_range(idx, plane[0] * plane[1], "idx")
    if not isinstance(gram, (bool, np.bool_)):
        raise TypeError(f"gram must be True or False, got {gram!r}")
    return module.template_stats(np.ascontiguousarray(x), code, idx, kernel_size, padding,
                                 switches, bool(gram))
