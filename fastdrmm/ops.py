"""The DRMM ops: validate, pick a backend, call it.

Semantics (DESIGN.md section 2), for x (N,C,H,W), templates W (K,C,kh,kw), bias b (K,):

* ``match_switch_pool`` -- the bottom-up E-step. ``z = correlate(xpad, W) + b`` on the
  (Ho, Wo) plane with Ho = H + 2*padding - kh + 1; ``y = z if z > 0 else leak*z`` (NaN stays
  NaN; with ``leak == 0``, the plain ReLU, every z <= 0 including -inf gives 0); over each
  pooling window the max of y and the flat index ``i*Wo + j`` of its first row-major position
  (a NaN wins over every number, the first NaN over later ones).
* ``match_at`` -- the matching read at given plane positions only: ``z`` (no bias, no switch)
  at the flat index ``idx`` of each unit, times ``switches``, and exactly 0 where a switch is
  0 (those units are not matched, so a NaN there does not leak out). For fixed latents it is
  the adjoint of ``render`` with respect to the code: the code gradient of the top-down pass.
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

Integer arguments (padding, pool, stride, kernel_size, plane_shape, input_shape) are Python or
NumPy integers of any width, not bools or floats, at most 2**31 - 1; the (padded) planes they
describe must have at most 2**31 - 1 positions, since positions are int32. ``idx`` may have
any signed or unsigned integer dtype; its range is checked in that dtype.
"""

from __future__ import annotations

import numpy as np

from . import _backends
from . import _elementwise as elementwise
from . import _validation as v

__all__ = ["match_switch_pool", "match_at", "unpool", "render", "template_stats"]


class _Inputs:
    """Brings the arguments of one call to the chosen backend's arrays, checking location.

    Host backends get NumPy arrays (DLPack/``__array__`` objects are wrapped without a copy).
    Device backends wrap CUDA arrays with their module's ``asarray`` (zero-copy through
    ``__cuda_array_interface__``/DLPack), make contiguous copies with its
    ``ascontiguousarray`` and report an index array's extremes with ``index_range``. Nothing
    is moved between host and device behind the caller's back.
    """

    def __init__(self, backend, arrays):
        self.name, self.module = _backends.resolve(backend, arrays)
        self.device = _backends.BACKENDS[self.name].location == "device"

    def array(self, obj, argname):
        where = _backends.array_location(obj)
        if self.device and where != "device":
            raise TypeError(
                f"{argname} is a host array but the backend {self.name!r} runs on a GPU; "
                "move it to the device first (e.g. cupy.asarray) or choose a host backend"
            )
        if not self.device and where != "host":
            raise TypeError(
                f"{argname} lives on a GPU but the backend {self.name!r} runs on the host; "
                "move it with .get()/.cpu() or choose a GPU backend"
            )
        return self.module.asarray(obj) if self.device else v.as_array(obj, argname)

    def contiguous(self, arr, dtype):
        if self.device:
            return self.module.ascontiguousarray(arr, dtype)
        return np.ascontiguousarray(arr, dtype=dtype)

    def floating(self, obj, argname, dtype, ndim=None, layout=""):
        arr = self.array(obj, argname)
        if ndim is not None:
            v.check_ndim(arr, argname, ndim, layout)
        if dtype is None:
            dtype = v.float_dtype(arr, argname)
        elif np.dtype(arr.dtype).kind != "f":
            raise TypeError(f"{argname} must hold floating-point data, got dtype {arr.dtype}")
        return self.contiguous(arr, dtype)

    def index(self, obj, shape, plane, check=True):
        """idx as C-contiguous int32, checked against the plane in its own dtype first (a
        uint32 2**32-1 is reported as itself, not as the -1 it would become)."""
        idx = self.array(obj, "idx")
        v.check_index_dtype(idx.dtype, "idx")
        if tuple(idx.shape) != tuple(shape):
            raise ValueError(f"idx must have shape {tuple(shape)}, got {tuple(idx.shape)}")
        if not isinstance(check, (bool, np.bool_)):
            raise TypeError(f"check_idx must be True or False, got {check!r}")
        if not check and v.fits_int32(idx.dtype):
            # the caller vouches for the positions (its own match_switch_pool's, on this
            # plane): the range pass reads the whole array, 0.1-0.3 ms a call on conv-small.
            # Types with values beyond int32 (uint32, 64-bit) are checked anyway: they are
            # narrowed to int32 next.
            return self.contiguous(idx, np.int32)
        low, high = self._index_range(idx)
        v.check_index_range(low, high, plane, "idx", idx.dtype)
        return self.contiguous(idx, np.int32)

    def _index_range(self, idx):
        """(min, max) of idx as exact Python ints ((0, 0) when empty)."""
        if not idx.size:
            return 0, 0
        if self.device:
            if np.dtype(idx.dtype) == np.uint32:
                # a device range kernel may narrow 32-bit types to int32: widen first
                idx = self.contiguous(idx, np.int64)
            return self.module.index_range(idx)
        return elementwise.index_range(idx)

    def switches(self, obj, shape, dtype):
        if obj is None:
            return None
        sw = self.array(obj, "switches")
        if tuple(sw.shape) != tuple(shape):
            raise ValueError(f"switches must have shape {tuple(shape)}, got {tuple(sw.shape)}")
        if np.dtype(sw.dtype).kind not in "biuf":
            raise TypeError(f"switches must be boolean or real, got dtype {sw.dtype}")
        return self.contiguous(sw, dtype)

    def code(self, obj, dtype=None):
        return self.floating(obj, "code", dtype, 4, "(N, K, Hp, Wp)")


def _image_and_templates(io, x, templates):
    """x (N, C, H, W) and templates (K >= 1, C, kh, kw) of x's dtype, checked together."""
    x = io.floating(x, "x", None, 4, "(N, C, H, W)")
    templates = io.floating(templates, "templates", np.dtype(x.dtype), 4, "(K, C, kh, kw)")
    if templates.shape[1] != x.shape[1]:
        raise ValueError(f"templates have {templates.shape[1]} channels but x has {x.shape[1]}")
    if templates.shape[0] < 1:
        raise ValueError("templates must hold at least one template (K >= 1)")
    return x, templates


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
    io = _Inputs(backend, (x, templates, bias))
    x, templates = _image_and_templates(io, x, templates)
    dtype = np.dtype(x.dtype)
    bias = io.floating(bias, "bias", dtype)
    if bias.ndim != 1 or bias.shape[0] != templates.shape[0]:
        raise ValueError(f"bias must have shape ({templates.shape[0]},), got {tuple(bias.shape)}")
    geometry = v.match_geometry(x.shape[2:], templates.shape[2:], padding, pool, stride)
    leak = v.check_leak(leak)
    return io.module.match_switch_pool(x, templates, bias, geometry, leak)


def match_at(x, templates, idx, *, padding=0, switches=None, check_idx=True, backend="auto"):
    """Template matching read at the positions ``idx`` only (the adjoint of ``render``).

    ``z[n, k, p, q] = sum_{c,u,v} W[k,c,u,v] * xpad[n, c, i+u, j+v]`` with
    ``(i, j) = divmod(idx[n, k, p, q], Wo)`` on the (Ho, Wo) plane of the matching, times
    ``switches[n, k, p, q]`` where that is not 0; where it is 0 the result is exactly 0 and
    the unit is not matched. No bias and no switch function: with ``idx`` from a max-pooling
    of ``match_switch_pool`` this is the full matching gathered at the argmax positions, at
    1 / pool^2 of its cost (less where switches are off).

    Parameters
    ----------
    x : array (N, C, H, W), float32 or float64
    templates : array (K, C, kh, kw); cast to x's dtype
    idx : integer array (N, K, Hp, Wp) of flat positions in [0, Ho*Wo)
    padding : int or (int, int), zero padding of x
    switches : None or array (N, K, Hp, Wp), boolean or real
    check_idx : bool
        False skips the pass that checks every position lies on the plane, for positions
        that come straight from ``match_switch_pool`` on the same plane (as in a training
        step). Positions of a type that int32 holds whole (int8, int16, int32, uint8,
        uint16) outside the plane are then undefined behaviour; other integer types (uint32,
        int64, uint64) are narrowed to int32, so they are checked anyway.
    backend : "auto", "numpy", "cpu", "numba-cuda" or "cupy" (every backend has it)

    Returns
    -------
    z : (N, K, Hp, Wp), dtype of x
    """
    io = _Inputs(backend, (x, templates, idx, switches))
    x, templates = _image_and_templates(io, x, templates)
    dtype = np.dtype(x.dtype)
    idx_obj = io.array(idx, "idx")
    v.check_ndim(idx_obj, "idx", 4, "(N, K, Hp, Wp)")
    geometry = v.units_geometry(x.shape[2:], templates.shape[2:], padding, idx_obj.shape[2:])
    shape = (x.shape[0], templates.shape[0], *idx_obj.shape[2:])
    idx = io.index(idx_obj, shape, geometry.plane, check_idx)
    switches = io.switches(switches, shape, dtype)
    return io.module.match_at(x, templates, idx, geometry, switches)


def unpool(code, idx, plane_shape, *, switches=None, check_idx=True, backend="auto"):
    """Scatter ``code`` (times ``switches``) to the positions ``idx`` of a zero plane.

    Returns U of shape (N, K, Ho, Wo) with ``plane_shape = (Ho, Wo)``; entries that several
    windows send to one position (overlapping windows) add up. ``check_idx``: see
    ``match_at``.
    """
    io = _Inputs(backend, (code, idx, switches))
    code = io.code(code)
    plane = v.check_plane_size(v.pair(plane_shape, "plane_shape", minimum=1), "plane_shape")
    idx = io.index(idx, code.shape, plane, check_idx)
    switches = io.switches(switches, code.shape, code.dtype)
    return io.module.unpool(code, idx, plane, switches)


def render(code, idx, templates, input_shape, *, padding=0, switches=None, check_idx=True,
           backend="auto"):
    """Top-down rendering: unpool the code, transposed-correlate with the templates, crop.

    Returns r of shape (N, C, H, W) with ``input_shape = (H, W)``, dtype of ``code``.
    ``check_idx``: see ``match_at``.
    """
    io = _Inputs(backend, (code, idx, templates, switches))
    code = io.code(code)
    templates = io.floating(templates, "templates", code.dtype, 4, "(K, C, kh, kw)")
    if templates.shape[0] != code.shape[1]:
        raise ValueError(
            f"templates hold {templates.shape[0]} templates but code has {code.shape[1]} channels"
        )
    input_shape = v.pair(input_shape, "input_shape", minimum=1)
    geometry = v.units_geometry(input_shape, templates.shape[2:], padding, code.shape[2:])
    idx = io.index(idx, code.shape, geometry.plane, check_idx)
    switches = io.switches(switches, code.shape, code.dtype)
    return io.module.render(code, idx, templates, geometry, switches)


def template_stats(x, code, idx, kernel_size, *, padding=0, switches=None, gram=True,
                   check_idx=True, backend="auto"):
    """M-step statistics of the templates: B, s and (``gram=True``) the Gram matrix G.

    ``code`` is cast to the dtype of x. Returns B (K, C, kh, kw), s (K,) and
    G (K*kh*kw, K*kh*kw) or None, in x's dtype. ``check_idx``: see ``match_at``.
    """
    io = _Inputs(backend, (x, code, idx, switches))
    x = io.floating(x, "x", None, 4, "(N, C, H, W)")
    dtype = np.dtype(x.dtype)
    code = io.code(code, dtype)
    if code.shape[0] != x.shape[0]:
        raise ValueError(f"code holds {code.shape[0]} samples but x holds {x.shape[0]}")
    kernel_size = v.pair(kernel_size, "kernel_size", minimum=1)
    geometry = v.units_geometry(x.shape[2:], kernel_size, padding, code.shape[2:])
    idx = io.index(idx, code.shape, geometry.plane, check_idx)
    switches = io.switches(switches, code.shape, dtype)
    if not isinstance(gram, (bool, np.bool_)):
        raise TypeError(f"gram must be True or False, got {gram!r}")
    return io.module.template_stats(x, code, idx, geometry, switches, bool(gram))
