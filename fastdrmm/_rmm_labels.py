"""The shallow RMM's labels: any labels -> class indices, and the labels of latent classes.

A fit takes labels of any kind (ints, floats, strings, bools, object arrays of those; -1 and
None mark unlabeled samples, see :func:`fastdrmm._inputs.unlabeled_mask`) and works on class
indices into ``classes_``: the sorted distinct labels, followed by new labels for the latent
classes that only unlabeled samples teach.
"""

from __future__ import annotations

import math

import numpy as np

from ._inputs import as_labels, unlabeled_mask


def class_indices(y, n_samples, n_classes, unlabeled_weight, known=None):
    """-> (classes_, yidx) with yidx the class index of each sample, -1 if unlabeled.

    ``known`` (a warm start's ``classes_``) keeps the classes: every label must be one of
    them. Otherwise the classes are y's distinct labels, then latent ones up to
    ``n_classes`` (which needs unlabeled samples of positive ``unlabeled_weight``)."""
    if y is None:
        classes = known if known is not None else np.arange(n_classes)
        return classes, np.full(n_samples, -1, np.intp)
    y = _checked_labels(y, n_samples)
    unlabeled = unlabeled_mask(y)
    labeled_values = y[~unlabeled]
    yidx = np.full(n_samples, -1, np.intp)
    if known is not None:
        if labeled_values.size:
            found, pos = _lookup(known, labeled_values)
            if not found.all():
                raise ValueError(
                    f"y holds labels {np.unique(labeled_values[~found]).tolist()} that the "
                    f"warm-started model does not know (classes_ = {known.tolist()})"
                )
            yidx[~unlabeled] = pos
        return known, yidx
    if labeled_values.size == 0:
        return np.arange(n_classes), yidx
    try:
        seen = np.unique(labeled_values)
    except TypeError as exc:
        raise TypeError(f"y holds labels that cannot be compared: {exc}") from None
    if seen.size > n_classes:
        raise ValueError(
            f"n_classes={n_classes} is smaller than the {seen.size} distinct labels in y"
        )
    yidx[~unlabeled] = np.searchsorted(seen, labeled_values)
    extra = n_classes - seen.size
    if extra == 0:
        return seen, yidx
    if not unlabeled.any() or unlabeled_weight == 0:
        raise ValueError(
            f"n_classes={n_classes} but y holds only {seen.size} distinct labels and no "
            "(weighted) unlabeled samples (label -1) to learn the other classes from"
        )
    return _latent_classes(seen, extra), yidx


def _checked_labels(y, n_samples):
    """y as a 1-d array of ``n_samples`` labels (an (N, 1) column is taken too)."""
    y = as_labels(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.ravel()
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-d array of labels, got shape {y.shape}")
    if y.shape[0] != n_samples:
        raise ValueError(f"y holds {y.shape[0]} labels but X holds {n_samples} samples")
    if y.dtype.kind == "c":
        raise TypeError(f"y must hold class labels, got complex dtype {y.dtype}")
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise ValueError("y contains NaN; mark unlabeled samples with -1")
    return y


def _lookup(classes, values):
    """(known mask, positions) of values among classes (-1 where unknown)."""
    index = {value: i for i, value in enumerate(classes.tolist())}
    pos = np.array([index.get(v, -1) for v in values.tolist()], np.intp)
    return pos >= 0, pos


def _latent_classes(seen, extra):
    """``seen`` (sorted distinct labels) followed by ``extra`` new labels for the latent
    classes: numbers after the largest label when they fit the labels' dtype exactly (else the
    smallest unused non-negative integers), strings ``latent<i>`` for other labels (of the
    labels' string or bytes dtype; in an object array for bools and objects). A new label
    never equals a seen one nor the unlabeled marker -1."""
    kind = seen.dtype.kind
    if kind in "iuf":
        taken = set(seen.tolist())
        largest = seen.max()
        top = (int(largest) if kind in "iu" else math.floor(float(largest))) + 1
        new = list(range(top, top + extra))
        if not _fit_exactly(new, seen.dtype, taken):
            new = []
            candidate = 0
            while len(new) < extra:
                if candidate not in taken:
                    new.append(candidate)
                candidate += 1
        dtype = seen.dtype if _fit_exactly(new, seen.dtype, taken) else (
            np.float64 if kind == "f" else np.int64)
        return np.concatenate([seen.astype(dtype), np.array(new, dtype)])
    # strings stay strings (bytes stay bytes) so that the labels keep their dtype
    encode = (lambda name: name.encode()) if kind == "S" else (lambda name: name)
    taken = set(seen.tolist())
    names, i = [], 0
    while len(names) < extra:
        if encode(f"latent{i}") not in taken:
            names.append(encode(f"latent{i}"))
        i += 1
    dtype = None if kind in "US" else object
    return np.array([*seen.tolist(), *names], dtype=dtype)


def _fit_exactly(values, dtype, taken):
    """Whether every one of the Python ints ``values`` is a value of ``dtype`` (no rounding,
    no wrapping) and none is in ``taken``."""
    if not values or any(v in taken for v in values):
        return not values
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return info.min <= min(values) and max(values) <= info.max
    with np.errstate(over="ignore"):
        cast = np.array(values, dtype=object).astype(dtype)
    return all(np.isfinite(c) and int(c) == v for c, v in zip(cast.tolist(), values))
