"""Input checks shared by the models: sample arrays, labels, seeds and parameter constraints.

Every check raises a TypeError (wrong kind of value) or a ValueError (wrong value) whose
message names the argument, before any work is done.

Seeds: the RMM draws from NumPy's legacy ``RandomState`` (:func:`check_random_state`) and the
DRMM seeds ``numpy.random.default_rng`` and its Numba kernels with one integer
(:func:`seed_of`). Both accept the same values (``RANDOM_STATE`` is the matching scikit-learn
parameter constraint): None, an int >= 0, a ``RandomState`` or a ``Generator``; each keeps the
streams it has always drawn, so a fixed seed gives the same fit as before.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from sklearn.utils import check_random_state as _sklearn_random_state
from sklearn.utils._param_validation import Interval, StrOptions, _Constraint

from . import _backends

__all__ = ["BackendName", "Count", "NON_NEGATIVE", "Number", "POSITIVE", "RANDOM_STATE",
           "as_labels", "check_images", "check_labels", "check_magnitude", "check_random_state",
           "check_samples", "seed_of", "unlabeled_mask"]


# --------------------------------------------------------------------------------------------
# parameter constraints (scikit-learn's declarative validation)


class Number(Interval):
    """scikit-learn's ``Interval`` without bools: ``True`` is neither a count nor a tolerance.

    ``Number(numbers.Real, 0, None, closed="left")`` is a finite real >= 0 (an interval never
    holds NaN, and an unbounded end excludes infinity)."""

    def is_satisfied_by(self, val):
        return not isinstance(val, (bool, np.bool_)) and super().is_satisfied_by(val)


def Count(minimum):
    """The constraint of an int (not a bool) >= ``minimum``."""
    return Number(numbers.Integral, minimum, None, closed="left")


#: a finite real >= 0 / > 0 (weights, tolerances, rates)
NON_NEGATIVE = Number(numbers.Real, 0, None, closed="left")
POSITIVE = Number(numbers.Real, 0, None, closed="neither")


#: the values a ``random_state`` parameter takes (both models): see the module docstring
RANDOM_STATE = [None, Count(0), np.random.RandomState, np.random.Generator]

_RANDOM_STATE_KINDS = "None, an int >= 0, a numpy RandomState or Generator"


# --------------------------------------------------------------------------------------------
# seeds


def _checked_seed(random_state, name):
    """``random_state`` if it is None, an int >= 0 (not a bool), a RandomState or a Generator."""
    if isinstance(random_state, (numbers.Integral, np.integer)) and not isinstance(
            random_state, (bool, np.bool_)):
        if random_state < 0:
            raise ValueError(f"{name} must be >= 0, got {random_state!r}")
        return random_state
    if random_state is None or isinstance(random_state, (np.random.RandomState,
                                                         np.random.Generator)):
        return random_state
    raise TypeError(f"{name} must be {_RANDOM_STATE_KINDS}, got {random_state!r:.80}")


def seed_of(random_state, name="random_state"):
    """One int seed drawn from ``random_state``: an int is itself, None fresh OS entropy, a
    RandomState or Generator one draw from it (``randint(0, 2**31 - 1)``,
    ``integers(0, 2**63 - 1)``)."""
    random_state = _checked_seed(random_state, name)
    if random_state is None:
        return int(np.random.SeedSequence().entropy % (2 ** 63))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2 ** 31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2 ** 63 - 1))
    return int(random_state)


def check_random_state(random_state, name="random_state"):
    """A legacy ``RandomState`` for ``random_state``, by scikit-learn's rule: None is NumPy's
    global one, an int below 2**32 seeds a new one, a RandomState is itself. A Generator, or
    an int of 2**32 or more (beyond ``RandomState``'s seeds), seeds a Mersenne Twister through
    :func:`seed_of`."""
    random_state = _checked_seed(random_state, name)
    if isinstance(random_state, np.random.Generator) or (
            random_state is not None and not isinstance(random_state, np.random.RandomState)
            and random_state >= 2 ** 32):
        return np.random.RandomState(np.random.MT19937(seed_of(random_state, name)))
    return _sklearn_random_state(random_state)


# --------------------------------------------------------------------------------------------
# samples

_LAYOUTS = {2: "a 2-d array (N, D)", 4: "a 4-d array (N, C, H, W)"}


def check_samples(X, name="X", *, ndims=(2, 4), dtype=np.float64, input_shape=None):
    """X as a C-contiguous array of ``dtype`` with finite values, of ``ndims`` dimensions:
    (N, D) flat samples or (N, C, H, W) images, at least one sample, no empty dimension, and
    samples of ``input_shape`` when it is given."""
    try:
        arr = np.asarray(X)
    except Exception as exc:
        raise TypeError(f"{name} must be an array of numbers, got {type(X).__name__}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        hint = " (reshape (N, H, W) images to (N, 1, H, W))" if arr.ndim == 3 else ""
        layouts = " or ".join(_LAYOUTS[d] for d in ndims)
        raise ValueError(f"{name} must be {layouts}, got shape {arr.shape}{hint}")
    if arr.shape[0] < 1:
        raise ValueError(f"{name} holds no samples (shape {arr.shape})")
    if 0 in arr.shape[1:]:
        raise ValueError(f"{name} has an empty feature dimension (shape {arr.shape})")
    if input_shape is not None and tuple(arr.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{name} has samples of shape {tuple(arr.shape[1:])} but the model "
                         f"was fitted on samples of shape {tuple(input_shape)}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def check_images(X, name="X", input_shape=None, dtype=np.float32):
    """X as a C-contiguous (N, C, H, W) array of ``dtype`` with finite values."""
    return check_samples(X, name, ndims=(4,), dtype=dtype, input_shape=input_shape)


def check_magnitude(X, name="X"):
    """Refuse values whose squares overflow float64 in a mixture's sums.

    EM sums ``||x_n - mu_k||^2`` over samples (every template lies in the data's convex
    hull, so each term is at most ``4 D max|x|^2``): with ``4 N D max|x|^2`` finite, every
    squared distance, the noise variance and every M-step sum is finite. Beyond that the
    noise variance itself (about ``max|x|^2``) has no float64 value, so the model cannot be
    represented at that scale and X must be rescaled (the model is scale-equivariant: fitting
    ``X / s`` gives templates ``mu / s`` and noise variance ``sigma^2 / s^2``, with ``reg``
    scaled by ``1 / s^2``). ``X`` is (N, ...) float64."""
    largest = float(np.abs(X).max())
    limit = math.sqrt(np.finfo(np.float64).max / (4.0 * X.shape[0] * X[0].size))
    if largest > limit:
        raise ValueError(
            f"{name} holds values up to |x| = {largest:.3g}: their squares overflow float64 in "
            f"the model's sums (at most {limit:.3g} for {X.shape[0]} samples of "
            f"{X[0].size} features); rescale {name}, e.g. divide it by its largest value")


# --------------------------------------------------------------------------------------------
# labels as class indices (the DRMM's)


def check_labels(y, n, n_classes, name="y"):
    """y -> int64 class indices with -1 for unlabeled; None -> all unlabeled.

    Values are compared in y's own dtype before any cast (a cast would wrap 2**64-1 to -1 or
    1e20 to -2**63): only an exact -1 (of a signed or float y) marks an unlabeled sample, and
    a value out of range or not integral is refused, quoted as it was given."""
    if y is None:
        return np.full(n, -1, np.int64)
    try:
        arr = np.asarray(y)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{name} must hold integer class indices: {exc}") from None
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold integer class indices in [0, {n_classes}) or -1, "
                        f"got dtype {arr.dtype}")
    with np.errstate(invalid="ignore"):
        valid = (arr >= 0) & (arr < n_classes)
        if arr.dtype.kind != "u":
            valid |= arr == -1
        if arr.dtype.kind == "f":
            valid &= arr == np.floor(arr)
    if not valid.all():
        bad = arr[~valid][0].item()
        raise ValueError(f"{name} holds {bad!r}: labels must be integer class indices in "
                         f"[0, {n_classes}) (or -1 for an unlabeled sample)")
    return arr.astype(np.int64)


# --------------------------------------------------------------------------------------------
# labels of any kind (the RMM's): ints, floats, strings, bools, with unlabeled markers

#: the Python types a label of an object array may have (NumPy scalars of these kinds too):
#: the types a saved model can give back exactly
LABEL_TYPES = (str, bool, int, float)
NUMPY_LABEL_KINDS = "biufU"


def as_labels(y):
    """y as an array without losing any label's value.

    ``np.asarray`` turns a list of Python ints beyond int64 into float64 (2**64 - 1 becomes
    1.8446744073709552e19, another number); such lists are kept as object arrays instead."""
    arr = np.asarray(y)
    if not isinstance(y, np.ndarray) and arr.dtype.kind == "f" and arr.size:
        values = np.asarray(y, dtype=object).ravel().tolist()
        if any(isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)
               and float(v) != v for v in values):
            arr = np.asarray(y, dtype=object)
    return arr


def _check_object_label(value, name):
    """A label of an object array: a str, bool, int or finite float (or a NumPy scalar of
    those kinds), else a TypeError/ValueError showing it."""
    if isinstance(value, np.generic):
        usable = value.dtype.kind in NUMPY_LABEL_KINDS
    else:
        usable = isinstance(value, LABEL_TYPES)
    if not usable:
        raise TypeError(f"{name} holds the label {value!r:.80} of type {type(value).__name__}: "
                        "labels are ints, floats, strings or bools (None or -1 marks unlabeled)")
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        raise ValueError(f"{name} contains NaN or infinity ({value!r}); mark unlabeled samples "
                         "with -1 or None")


def _is_unlabeled_marker(value):
    """None, the string '-1', or a number equal to -1 (bools are labels, never markers)."""
    if value is None:
        return True
    if isinstance(value, (str, np.str_)):
        return value == "-1"
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (numbers.Number, np.number)):
        return value == -1
    return False


def unlabeled_mask(y, name="y"):
    """Entries of the 1-d label array ``y`` marking an unlabeled sample: -1 (or the string
    '-1', or None in object arrays).

    The markers are recognised exactly: an unsigned array has no -1 (its largest value is a
    label like any other), and no value is ever cast to another type to be compared. Every
    other value is checked to be a usable label (finite; of a label type)."""
    kind = y.dtype.kind
    if kind == "u" or kind == "b":
        return np.zeros(y.shape, bool)
    if kind == "i":
        return y == -1
    if kind == "f":
        if not np.isfinite(y).all():
            bad = y[~np.isfinite(y)][0]
            raise ValueError(f"{name} contains NaN or infinity ({bad!r}): labels must be "
                             "finite; mark unlabeled samples with -1")
        return y == -1
    if kind == "U":
        return y == "-1"
    if kind == "S":
        return y == b"-1"
    if kind == "O":
        mask = np.fromiter((_is_unlabeled_marker(v) for v in y), bool, count=len(y))
        for value in y[~mask]:
            _check_object_label(value, name)
        return mask
    raise TypeError(f"{name} must hold class labels (numbers or strings), got dtype {y.dtype}")


# --------------------------------------------------------------------------------------------
# the backend parameter


class BackendName(StrOptions):
    """The constraint of a ``backend`` parameter: "auto" or a backend registered in
    :mod:`fastdrmm._backends` when the check runs (not when the constraint was made)."""

    def __init__(self):
        _Constraint.__init__(self)  # StrOptions would store a fixed set of options
        self.type = str
        self.deprecated = set()

    @property
    def options(self):
        return ("auto", *_backends.BACKENDS)
