"""The ``cupy`` backend: the CUDA C kernels of this package through ``cupy.RawModule``.

Inputs arrive validated and C-contiguous (see fastdrmm._backends). Outputs are CuPy arrays
on the current device, computed on the current stream (``cupy.cuda.get_current_stream()``,
where RawKernel launches), in the input dtype.
"""

from __future__ import annotations

import cupy
import numpy as np

from . import launch, loader

__all__ = ["match_switch_pool", "match_at", "unpool", "render", "template_stats",
           "asarray", "ascontiguousarray", "index_range"]


def asarray(obj):
    """A CuPy view of a CUDA array (``__cuda_array_interface__`` or DLPack), no copy."""
    if isinstance(obj, cupy.ndarray):
        return obj
    if hasattr(obj, "__cuda_array_interface__"):
        return cupy.asarray(obj)
    return cupy.from_dlpack(obj)


def ascontiguousarray(arr, dtype):
    dtype = np.dtype(dtype)
    if arr.dtype == dtype and arr.flags.c_contiguous:
        return arr
    return cupy.ascontiguousarray(arr, dtype=dtype)


def index_range(idx):
    if idx.size == 0:
        return 0, 0
    return int(idx.min()), int(idx.max())


class _Device:
    """The device interface of launch.py on CuPy: current device and stream."""

    @staticmethod
    def empty(shape, dtype):
        return cupy.empty(shape, dtype=dtype)

    @staticmethod
    def zeros(shape, dtype):
        return cupy.zeros(shape, dtype=dtype)

    @staticmethod
    def launch(name_expr, grid, block, args):
        kernel = loader.get_function(name_expr)
        kernel(grid, block, args)  # RawKernel launches on the current stream


_DEV = _Device()


def match_switch_pool(x, templates, bias, geometry, leak):
    return launch.match_switch_pool(_DEV, x, templates, bias, geometry, leak)


def match_at(x, templates, idx, geometry, switches):
    return launch.match_at(_DEV, x, templates, idx, geometry, switches)


def unpool(code, idx, plane_shape, switches):
    return launch.unpool(_DEV, code, idx, tuple(plane_shape), switches)


def render(code, idx, templates, geometry, switches):
    return launch.render(_DEV, code, idx, templates, geometry, switches)


def template_stats(x, code, idx, geometry, switches, gram):
    return launch.template_stats(_DEV, x, code, idx, geometry, switches, gram)
