"""Helpers of the command line: data sets and their splits, label selection, layer specs and
output paths. Every user error is a :class:`CLIError` (or a ValueError/OSError from the
library) whose message is one line that names the option at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# NumPy is imported inside the functions: importing this module (and so the command line)
# must stay instant, so that Ctrl-C during start-up is answered at once.

__all__ = ["CLIError", "DATASETS", "DIGITS_TEST_FRACTION", "LAYER_LIMITS", "MAX_LAYERS",
           "MAX_LAYER_SPEC", "MAX_PARAMETERS", "load_split", "dataset_for_shape",
           "take_subset", "select_labels", "parse_layers", "layers_label", "check_layer_sizes",
           "check_output_path", "check_distinct_outputs", "data_identity",
           "check_resume_data", "write_data_identity"]

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
    import numpy as np

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
    import numpy as np

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

#: the largest value the command line accepts for each Layer field (larger models are built
#: through the Python API, where the caller sizes the memory)
LAYER_LIMITS = {"n_templates": 1024, "kernel_size": 32, "padding": 32, "pool": 32}
#: at most this many layers, and this many characters of --layers
MAX_LAYERS = 16
MAX_LAYER_SPEC = 10_000
#: at most this many template entries in all (64 MB in float32)
MAX_PARAMETERS = 16_000_000

_LAYER_FORM = ("the form is K:k[:padding[:pool[:leak]]] per layer, comma-separated, or a JSON "
               "list of Layer fields")


def parse_layers(spec):
    """Layers from a spec: a JSON list of Layer fields, e.g.
    ``[{"n_templates": 8, "kernel_size": 3, "padding": 1, "pool": 2}]``, or the compact
    ``K:k[:padding[:pool[:leak]]]`` per layer, comma-separated, bottom first, e.g.
    ``8:3:1:2,16:3:1:2``. Every field is bounded by :data:`LAYER_LIMITS`, the number of layers
    by :data:`MAX_LAYERS`, the spec's length by :data:`MAX_LAYER_SPEC`."""
    from .layers import resolve_layers

    text = spec.strip()
    if not text:
        raise CLIError(f"--layers: empty ({_LAYER_FORM})")
    if len(text) > MAX_LAYER_SPEC:
        raise CLIError(f"--layers: {len(text)} characters, more than the {MAX_LAYER_SPEC} "
                       "a layer spec may have")
    if text.startswith("["):
        try:
            items = json.loads(text)
        except RecursionError:  # deeply nested brackets
            raise CLIError("--layers: not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # JSONDecodeError, and numbers with too many digits
            raise CLIError(f"--layers: not valid JSON ({_one_line(exc)})") from None
        if not isinstance(items, list):
            raise CLIError(f"--layers: expected a JSON list of Layer fields ({_LAYER_FORM})")
        _check_layer_count(len(items))
        for i, item in enumerate(items):
            if isinstance(item, dict):
                _check_layer_fields(i, item)
        try:
            return resolve_layers(items)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise CLIError(f"--layers: {_one_line(exc)}") from None
    parts = text.split(",")
    _check_layer_count(len(parts))
    return tuple(_compact_layer(i, part.strip()) for i, part in enumerate(parts))


def _compact_layer(i, part):
    """One ``K:k[:padding[:pool[:leak]]]`` layer."""
    from .layers import Layer

    fields = part.split(":")
    try:
        if not 2 <= len(fields) <= 5:
            raise ValueError("expected K:k[:padding[:pool[:leak]]]")
        numbers = [int(f) for f in fields[:4]]
        names = ("n_templates", "kernel_size", "padding", "pool")
        _check_layer_fields(i, dict(zip(names, numbers)))
        pool = numbers[3] if len(numbers) > 3 else None
        leak = float(fields[4]) if len(fields) > 4 else 0.0
        return Layer(numbers[0], numbers[1], padding=numbers[2] if len(numbers) > 2 else 0,
                     pool=pool, leak=leak)
    except CLIError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CLIError(f"--layers: layer {i} {part[:40]!r}: {_one_line(exc)} "
                       f"({_LAYER_FORM})") from None


def _check_layer_count(n):
    if n > MAX_LAYERS:
        raise CLIError(f"--layers: {n} layers, more than the {MAX_LAYERS} the command line "
                       "accepts")


def _check_layer_fields(i, fields):
    """Bound the integer fields of layer ``i`` (ints or pairs of ints) by LAYER_LIMITS."""
    for name, limit in LAYER_LIMITS.items():
        value = fields.get(name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and v > limit:
                raise CLIError(f"--layers: layer {i}: {name} {v} exceeds the command line's "
                               f"maximum of {limit}")


def layers_label(layers):
    """Layers as the command line prints them: a preset's name, or ``K:k,...`` (custom)."""
    if isinstance(layers, str):
        return layers
    return ",".join(f"{la.n_templates}:{la.kernel_size[0]}" for la in layers) + " (custom)"


def check_layer_sizes(shapes, layers):
    """Refuse a model with more than :data:`MAX_PARAMETERS` template entries (``shapes``
    from :func:`fastdrmm.layers.layer_shapes`)."""
    total = 0
    for shape, layer in zip(shapes, layers):
        kh, kw = layer.kernel_size
        total += layer.n_templates * shape.channels_in * kh * kw
    if total > MAX_PARAMETERS:
        raise CLIError(f"--layers: the templates have {total:,} entries, more than the "
                       f"{MAX_PARAMETERS:,} the command line accepts")
    return total


def _one_line(exc):
    return " ".join(str(exc).split())[:300] or type(exc).__name__


# --------------------------------------------------------------------------------------------
# files


def _path_text(path, what, hint=""):
    """``path`` as text, refused (naming ``what``) when empty or holding a NUL character."""
    text = os.fspath(path)
    if not text.strip():
        raise CLIError(f"{what}: empty path{hint}")
    if "\0" in text:
        raise CLIError(f"{what}: the path contains a NUL character")
    return text


def check_output_path(path, option):
    """Fail early (before any work) when ``path`` cannot be written: it must be a non-empty
    path whose directory exists and is writable, and not a directory."""
    text = _path_text(path, option, " (give a file name)")
    target = Path(text)
    if target.is_dir():
        raise CLIError(f"{option} {path}: is a directory (give a file name)")
    if text.endswith(os.sep):
        raise CLIError(f"{option} {path}: ends with {os.sep!r}, a directory's name (give a "
                       "file name)")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CLIError(f"{option} {path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path}: the directory {directory} is not writable")
    if target.exists() and not target.is_file():
        raise CLIError(f"{option} {path}: not a regular file (a FIFO, socket or device)")
    return target


def _same_file(a, b):
    """Whether two paths name one file: equal after resolving links, or (when both exist)
    the same inode (hard links, bind mounts)."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # a missing file, or a path no file can have (NUL)
        return False


def check_distinct_outputs(*named_paths):
    """Refuse two output options naming the same file: ``(option, path)`` pairs, None paths
    skipped. Without this the second write would silently replace the first."""
    given = [(option, os.fspath(path)) for option, path in named_paths if path is not None]
    for i, (option_a, a) in enumerate(given):
        for option_b, b in given[i + 1:]:
            if _same_file(a, b):
                raise CLIError(f"{option_a} and {option_b} name the same file ({b}): give "
                               "two different paths")


def check_input_file(path, what="model file"):
    """The path of an existing regular file to read, else a CLIError (before opening it, so
    that a FIFO cannot block)."""
    target = Path(_path_text(path, what))
    if not target.exists():
        raise CLIError(f"{what} not found: {path}")
    if target.is_dir():
        raise CLIError(f"{what} {path} is a directory")
    if not target.is_file():
        raise CLIError(f"{what} {path} is not a regular file (a FIFO, socket or device)")
    return target


# --------------------------------------------------------------------------------------------
# the training data a checkpoint belongs to

#: the data options recorded beside a checkpoint; a resumed run must repeat them
DATA_OPTIONS = ("dataset", "train_size", "labels_per_class", "labels", "seed")


def data_identity(args, X, y_fit):
    """What identifies a run's training data: its command-line options and a sha256 of the
    images and of the labels as fitted (unlabeled marked -1)."""
    import numpy as np

    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(X), np.ascontiguousarray(y_fit, np.int64)):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(memoryview(array).cast("B"))
    identity = {name: getattr(args, name) for name in DATA_OPTIONS}
    identity.update(n_samples=int(X.shape[0]), n_labeled=int(np.sum(np.asarray(y_fit) >= 0)),
                    sha256=digest.hexdigest())
    return identity


def data_identity_path(checkpoint):
    """The file beside a checkpoint that records its training data."""
    return Path(os.fspath(checkpoint) + ".data.json")


def read_data_identity(checkpoint):
    """The recorded data identity of a checkpoint, or None (none recorded or unreadable)."""
    path = data_identity_path(checkpoint)
    try:
        if not path.is_file() or path.stat().st_size > 65536:
            return None
        recorded = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return recorded if isinstance(recorded, dict) else None


def write_data_identity(checkpoint, identity):
    """Record (atomically) the data identity beside ``checkpoint``; None removes it."""
    from ._atomic import atomic_write

    path = data_identity_path(checkpoint)
    if identity is None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return
    with atomic_write(path) as (f, _):
        f.write(json.dumps(identity, sort_keys=True).encode())


def _option_text(name, value):
    flag = "--" + name.replace("_", "-")
    return f"{flag} {'(not given)' if value is None else value}"


def check_resume_data(checkpoint, identity):
    """Refuse to resume ``checkpoint`` with other training data than it was written for."""
    recorded = read_data_identity(checkpoint)
    if recorded is None or recorded.get("sha256") == identity["sha256"]:
        return
    differ = [name for name in DATA_OPTIONS if recorded.get(name) != identity[name]]
    if differ:
        detail = "; ".join(f"{_option_text(n, identity[n])} now, "
                           f"{_option_text(n, recorded.get(n))} then" for n in differ)
    else:
        detail = "the same options, but the data files differ"
    raise CLIError(f"--resume: {checkpoint} was written for other training data ({detail}); "
                   "repeat the original data options, or run without --resume to start afresh")
