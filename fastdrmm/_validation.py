"""Argument checking for the public ops.

Every public op validates here before a backend sees anything, so that bad input fails early
with a ValueError/TypeError that names the offending argument, and backends can assume clean,
C-contiguous arrays of one floating dtype with consistent shapes.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def pair(value, name, *, minimum):
    """An int or a pair of ints -> a tuple of two ints, each >= minimum."""
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool):
        out = (int(value), int(value))
    else:
        try:
            out = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(out) != 2 or not all(
            isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool) for v in out
        ):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        out = (int(out[0]), int(out[1]))
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def check_int(value, name, minimum):
    """An int (not a bool) >= minimum, else a TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_real(value, name, minimum=0.0, maximum=np.inf, open_low=False):
    """A finite real in [minimum, maximum] ((minimum, maximum] with open_low) as a float."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    low_ok = value > minimum if open_low else value >= minimum
    if not (np.isfinite(value) and low_ok and value <= maximum):
        bound = f"> {minimum}" if open_low else f">= {minimum}"
        upper = f" and <= {maximum}" if np.isfinite(maximum) else ""
        raise ValueError(f"{name} must be a finite number {bound}{upper}, got {value!r}")
    return value


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


def as_float(arr, name, dtype):
    """Cast a real array to the working dtype, refusing integer/bool/complex data."""
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must hold floating-point data, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def as_index(arr, name, shape):
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.int32)


def check_index_range(idx, size, name):
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise ValueError(
            f"{name} out of range: entries must lie in [0, {size}) for the given plane, "
            f"found [{int(idx.min())}, {int(idx.max())}]"
        )


def as_switches(switches, shape, dtype):
    if switches is None:
        return None
    switches = as_array(switches, "switches")
    if tuple(switches.shape) != tuple(shape):
        raise ValueError(f"switches must have shape {tuple(shape)}, got {tuple(switches.shape)}")
    if switches.dtype.kind not in "biuf":
        raise TypeError(f"switches must be boolean or real, got dtype {switches.dtype}")
    return np.ascontiguousarray(switches, dtype=dtype)


class MatchGeometry(NamedTuple):
    padding: tuple
    pool: tuple
    stride: tuple
    plane: tuple  # (Ho, Wo): the correlation plane
    pooled: tuple  # (Hp, Wp)


def match_geometry(input_hw, kernel_hw, padding, pool, stride):
    """Sizes of the matching plane and the pooled grid, with errors naming the argument."""
    padding = pair(padding, "padding", minimum=0)
    pool = pair(pool, "pool", minimum=1)
    stride = pool if stride is None else pair(stride, "stride", minimum=1)
    plane = plane_shape_of(input_hw, kernel_hw, padding)
    if pool[0] > plane[0] or pool[1] > plane[1]:
        raise ValueError(f"pool {pool} is larger than the matching plane {plane}")
    pooled = ((plane[0] - pool[0]) // stride[0] + 1, (plane[1] - pool[1]) // stride[1] + 1)
    return MatchGeometry(padding, pool, stride, plane, pooled)


def plane_shape_of(input_hw, kernel_hw, padding):
    ho = input_hw[0] + 2 * padding[0] - kernel_hw[0] + 1
    wo = input_hw[1] + 2 * padding[1] - kernel_hw[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"templates of size {tuple(kernel_hw)} are larger than the padded input "
            f"{(input_hw[0] + 2 * padding[0], input_hw[1] + 2 * padding[1])}"
        )
    return (ho, wo)


def check_leak(leak):
    if isinstance(leak, bool) or not isinstance(leak, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"leak must be a real number, got {leak!r}")
    leak = float(leak)
    if not np.isfinite(leak):
        raise ValueError(f"leak must be finite, got {leak!r}")
    return leak
