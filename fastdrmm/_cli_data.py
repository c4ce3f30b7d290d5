"""Helpers of the command line: data sets and their splits, label selection, layer specs and
output paths. Every user error is a :class:`CLIError` (or a ValueError/OSError from the
library) whose message is one line that names the option at fault.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["CLIError", "DATASETS", "DIGITS_TEST_FRACTION", "load_split", "dataset_for_shape",
           "take_subset", "select_labels", "parse_layers", "check_output_path"]

#: the data sets the CLI knows, and the image shape of each
DATASETS = {"mnist": (1, 28, 28), "digits": (1, 8, 8)}
#: scikit-learn's digits have no test split: a fixed stratified 30% (seed 0) serves as one,
#: the same for every command (and the same as ``fastdrmm demo`` with its default seed)
DIGITS_TEST_FRACTION = 0.3


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


# --------------------------------------------------------------------------------------------
# data


def load_split(dataset, split, data_dir=None, download=False):
    """(X, y) of one split ("train" or "test") of a data set, X float32 (N, 1, H, W)."""
    from .datasets import load_digits, load_mnist

    if dataset == "digits":
        if data_dir is not None:
            raise CLIError("--data-dir applies to --dataset mnist only (the digits come with "
                           "scikit-learn)")
        from sklearn.model_selection import train_test_split

        X, y = load_digits(return_X_y=True)
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=DIGITS_TEST_FRACTION, random_state=0, stratify=y)
        return (X_train, y_train) if split == "train" else (X_test, y_test)
    if dataset == "mnist":
        try:
            return load_mnist(data_dir, subset=split, return_X_y=True, download=download)
        except FileNotFoundError as exc:
            raise CLIError(f"{exc} [on the command line: --data-dir DIR names the directory "
                           "holding the files, --download fetches them]") from None
    raise CLIError(f"--dataset must be one of {sorted(DATASETS)}, got {dataset!r}")


def dataset_for_shape(shape):
    """The data set whose images have ``shape`` (C, H, W), or None."""
    for name, known in DATASETS.items():
        if shape is not None and tuple(shape) == known:
            return name
    return None


def take_subset(X, y, size, seed):
    """A seeded random subset of ``size`` samples (kept in their original order)."""
    if size is None:
        return X, y
    if size > X.shape[0]:
        raise CLIError(f"--train-size {size} exceeds the {X.shape[0]} training images")
    rows = np.sort(np.random.default_rng([seed, 101]).permutation(X.shape[0])[:size])
    return X[rows], y[rows]


def select_labels(y, n_classes, seed, per_class=None, total=None):
    """A copy of ``y`` that keeps a balanced, seeded choice of labels and marks the rest -1.

    ``per_class`` keeps that many labels of every class; ``total`` keeps ``total`` labels in
    all, ``total // n_classes`` per class and one more for ``total % n_classes`` classes drawn
    at random. Neither: every label is kept. A class with too few samples is an error.
    """
    y = np.asarray(y).copy()
    if per_class is None and total is None:
        return y
    rng = np.random.default_rng([seed, 102])
    if per_class is not None:
        quota = np.full(n_classes, per_class)
        option = f"--labels-per-class {per_class}"
    else:
        if total > y.size:
            raise CLIError(f"--labels {total} exceeds the {y.size} training images")
        quota = np.full(n_classes, total // n_classes)
        quota[rng.permutation(n_classes)[:total % n_classes]] += 1
        option = f"--labels {total}"
    keep = np.zeros(y.size, bool)
    for c in range(n_classes):
        members = np.flatnonzero(y == c)
        if members.size < quota[c]:
            raise CLIError(f"{option} asks for {quota[c]} labels of class {c}, which has only "
                           f"{members.size} training images")
        keep[rng.permutation(members)[:quota[c]]] = True
    y[~keep] = -1
    return y


# --------------------------------------------------------------------------------------------
# layers


def parse_layers(spec):
    """Layers from a spec: a JSON list of Layer fields, e.g.
    ``[{"n_templates": 8, "kernel_size": 3, "padding": 1, "pool": 2}]``, or the compact
    ``K:k[:padding[:pool[:leak]]]`` per layer, comma-separated, bottom first, e.g.
    ``8:3:1:2,16:3:1:2``."""
    from .layers import Layer, resolve_layers

    text = spec.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--layers: not valid JSON ({exc})") from None
        try:
            return resolve_layers(items)
        except (TypeError, ValueError) as exc:
            raise CLIError(f"--layers: {exc}") from None
    layers = []
    for i, part in enumerate(text.split(",")):
        fields = part.strip().split(":")
        try:
            if not 2 <= len(fields) <= 5:
                raise ValueError("expected K:k[:padding[:pool[:leak]]]")
            numbers = [int(f) for f in fields[:4]]
            pool = numbers[3] if len(numbers) > 3 else None
            leak = float(fields[4]) if len(fields) > 4 else 0.0
            layers.append(Layer(numbers[0], numbers[1],
                                padding=numbers[2] if len(numbers) > 2 else 0,
                                pool=pool, leak=leak))
        except (TypeError, ValueError) as exc:
            raise CLIError(f"--layers: layer {i} {part.strip()!r}: {exc} (the form is "
                           "K:k[:padding[:pool[:leak]]] per layer, comma-separated, or a "
                           "JSON list of Layer fields)") from None
    return tuple(layers)


# --------------------------------------------------------------------------------------------
# files


def check_output_path(path, option):
    """Fail early (before any work) when ``path`` cannot be written: its directory must
    exist and be writable, and it must not be a directory."""
    target = Path(os.fspath(path))
    directory = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise CLIError(f"{option} {path}: is a directory")
    if not directory.is_dir():
        raise CLIError(f"{option} {path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path}: the directory {directory} is not writable")
    return target


def check_input_file(path, what="model file"):
    target = Path(os.fspath(path))
    if not target.exists():
        raise CLIError(f"{what} not found: {path}")
    if target.is_dir():
        raise CLIError(f"{what} {path} is a directory")
    return target
