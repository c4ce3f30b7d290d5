"""Argument checking for the public ops.

Every public op validates here before a backend sees anything, so that bad input fails early
with a ValueError/TypeError that names the offending argument, and backends can assume clean,
C-contiguous arrays of one floating dtype with consistent shapes.
"""

from __future__ import annotations

import numbers

import numpy as np

from .kernels.geometry import Geometry

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# Sizes and positions are int32 in the kernels (idx is int32, flat positions i*Wo + j): every
# integer argument, and every plane they describe, stays within it.
MAX_INT = 2**31 - 1


def _is_int(value):
    """A Python or NumPy integer of any width, not a bool (True is not a size)."""
    return (isinstance(value, (numbers.Integral, np.integer))
            and not isinstance(value, (bool, np.bool_)))


def pair(value, name, *, minimum, maximum=MAX_INT):
    """An int or a pair of ints -> a tuple of two ints, each in [minimum, maximum].

    Python and NumPy integers of every width are taken; bools, floats (even 2.0) and anything
    else are a TypeError, values out of range a ValueError, each naming the argument."""
    if _is_int(value):
        out = (int(value), int(value))
    else:
        try:
            out = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(out) != 2 or not all(_is_int(v) for v in out):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        out = (int(out[0]), int(out[1]))
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(out) > maximum:
        raise ValueError(f"{name} must be at most {maximum} (sizes and positions are int32), "
                         f"got {value!r}")
    return out


def check_int(value, name, minimum, maximum=None):
    """An int (not a bool) in [minimum, maximum], else a TypeError/ValueError naming it."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return int(value)


def float_dtype(arr, name):
    """The dtype of a floating array (float32/float64), else a TypeError naming it."""
    dtype = np.dtype(arr.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {dtype}")
    return dtype


def check_ndim(arr, name, ndim, layout):
    if getattr(arr, "ndim", None) != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-d array {layout}, got shape {tuple(getattr(arr, 'shape', ()))}"
        )


def as_array(obj, name):
    """Host arrays (and anything exposing __array__ / DLPack on the CPU) as NumPy, no copy."""
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "__dlpack__") and not hasattr(obj, "__cuda_array_interface__"):
        try:
            return np.from_dlpack(obj)
        except (BufferError, TypeError, RuntimeError):
            pass
    try:
        return np.asarray(obj)
    except Exception as exc:  # pragma: no cover - message path only
        raise TypeError(f"{name} must be an array, got {type(obj).__name__}") from exc


def check_index_dtype(dtype, name):
    """A signed or unsigned integer dtype of any width, else a TypeError naming ``name``."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (int8 to int64 or uint8 to uint64), "
                        f"got dtype {dtype}")
    return dtype


def fits_int32(dtype):
    """Whether every value of the integer dtype is an int32 (narrowing cannot wrap)."""
    info = np.iinfo(dtype)
    return info.min >= -2**31 and info.max <= MAX_INT


def check_index_range(low, high, plane, name, dtype):
    """Positions ``low..high`` (exact ints, from the array in its own dtype) on the plane."""
    size = plane[0] * plane[1]
    if low < 0 or high >= size:
        raise ValueError(
            f"{name} out of range: entries must lie in [0, {size}) for the plane {tuple(plane)}, "
            f"found [{low}, {high}] (dtype {np.dtype(dtype)})"
        )


def match_geometry(input_hw, kernel_hw, padding, pool, stride):
    """The Geometry of a pooled matching, with errors naming the argument."""
    padding = pair(padding, "padding", minimum=0)
    pool = pair(pool, "pool", minimum=1)
    stride = pool if stride is None else pair(stride, "stride", minimum=1)
    plane = plane_shape_of(input_hw, kernel_hw, padding)
    if pool[0] > plane[0] or pool[1] > plane[1]:
        raise ValueError(f"pool {pool} is larger than the matching plane {plane}")
    pooled = ((plane[0] - pool[0]) // stride[0] + 1, (plane[1] - pool[1]) // stride[1] + 1)
    return Geometry(tuple(input_hw), tuple(kernel_hw), padding, plane, pool, stride, pooled)


def units_geometry(input_hw, kernel_hw, padding, units):
    """The Geometry of an op that reads or writes given positions of the matching plane
    (match_at, render, template_stats): no pooling, units on the (Hp, Wp) grid ``units``."""
    padding = pair(padding, "padding", minimum=0)
    plane = plane_shape_of(input_hw, kernel_hw, padding)
    return Geometry(tuple(input_hw), tuple(kernel_hw), padding, plane, (1, 1), (1, 1),
                    tuple(units))


def plane_shape_of(input_hw, kernel_hw, padding):
    """(Ho, Wo) of the matching; a ValueError when the templates do not fit the padded input
    or the plane has more positions than int32 positions can address."""
    ho = input_hw[0] + 2 * padding[0] - kernel_hw[0] + 1
    wo = input_hw[1] + 2 * padding[1] - kernel_hw[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"templates of size {tuple(kernel_hw)} are larger than the padded input "
            f"{(input_hw[0] + 2 * padding[0], input_hw[1] + 2 * padding[1])}"
        )
    padded = (input_hw[0] + 2 * padding[0]) * (input_hw[1] + 2 * padding[1])
    if padded > MAX_INT:
        raise ValueError(
            f"the padded input {(input_hw[0] + 2 * padding[0], input_hw[1] + 2 * padding[1])} "
            f"(input {tuple(input_hw)}, padding {tuple(padding)}) has {padded} positions, "
            f"more than int32 positions address ({MAX_INT})"
        )
    check_plane_size((ho, wo), "the matching plane")
    return (ho, wo)


def check_plane_size(plane, what):
    """A (Ho, Wo) plane whose flat positions ``i*Wo + j`` fit in int32 (idx's dtype)."""
    size = plane[0] * plane[1]
    if size > MAX_INT:
        raise ValueError(f"{what} {tuple(plane)} has {size} positions, more than int32 idx "
                         f"can address ({MAX_INT})")
    return tuple(plane)


def check_leak(leak):
    if isinstance(leak, bool) or not isinstance(leak, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"leak must be a real number, got {leak!r}")
    leak = float(leak)
    if not np.isfinite(leak):
        raise ValueError(f"leak must be finite, got {leak!r}")
    return leak
