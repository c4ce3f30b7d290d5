"""Data sets: MNIST (IDX files, checksummed, optionally downloaded) and scikit-learn's digits.

Images come as float arrays in [0, 1] of shape ``(N, 1, H, W)`` (one channel, the layout of
:mod:`fastdrmm.ops`) and labels as int64 arrays of shape ``(N,)``.

MNIST
-----
:func:`load_mnist` reads the four canonical IDX files, each either raw or gzip-compressed
(``name`` or ``name.gz``; the raw file wins where both are present)::

    train-images-idx3-ubyte   60,000 images 28x28      t10k-images-idx3-ubyte   10,000 images
    train-labels-idx1-ubyte   60,000 labels 0-9        t10k-labels-idx1-ubyte   10,000 labels

IDX layout (big-endian int32 header, then one unsigned byte an item): images ``magic 2051,
count, rows, cols, pixels``; labels ``magic 2049, count, labels``. Every file is parsed
strictly (magic, header, exact length, labels in 0-9, as many labels as images) and, unless
``verify=False``, its UNCOMPRESSED contents must have the canonical sha256 of
:data:`MNIST_SHA256`; any failure is a :class:`ValueError` that names the file.

Files are read in chunks, the header first: no more is read (or inflated, for a .gz) than
the size the header declares, and with ``verify`` (and for downloads) no more than the
canonical size of :data:`MNIST_SIZES`; content beyond the declared size is counted, without
being kept, up to 1 MiB. A .gz that inflates past its declared size (a gzip bomb) is thus a
:class:`ValueError` naming the file, after a bounded amount of work and memory.

The files are looked for in ONE directory, the first of:

1. ``data_dir``, the argument: the directory that holds the files;
2. ``$FASTDRMM_DATA/mnist``: ``FASTDRMM_DATA`` names a data root (from this repository,
   ``FASTDRMM_DATA=../shared/data`` points at the shared copy);
3. the user cache, ``$XDG_CACHE_HOME/fastdrmm/mnist``, by default ``~/.cache/fastdrmm/mnist``.

With ``download=True`` the missing files are fetched as ``<mirror>/<name>.gz`` into that
directory: each is streamed to a temporary file beside its destination, its sha256 verified,
and only then renamed into place (atomically), so that a failed or corrupt download leaves
nothing behind. The mirror is the ``mirror`` argument, else ``$FASTDRMM_MNIST_MIRROR``, else
:data:`DEFAULT_MNIST_MIRRORS`; several mirrors (a sequence, or whitespace-separated in the
environment variable) are tried in order. Any URL that :func:`urllib.request.urlopen` reads
will do, ``file://`` included; a plain local directory is taken as its ``file://`` URL.

The MNIST data are (c) Yann LeCun and Corinna Cortes, licensed CC BY-SA 3.0.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import math
import os
import shutil
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

from ._atomic import atomic_write

__all__ = [
    "load_mnist",
    "load_digits",
    "mnist_data_dir",
    "MNIST_SHA256",
    "MNIST_SIZES",
    "DEFAULT_MNIST_MIRRORS",
]

#: sha256 of the canonical, uncompressed MNIST files
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: size in bytes of the canonical, uncompressed MNIST files (header + one byte an item)
MNIST_SIZES = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}

#: tried in order when neither the ``mirror`` argument nor ``$FASTDRMM_MNIST_MIRROR`` is set
DEFAULT_MNIST_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)

DATA_ENV = "FASTDRMM_DATA"
MIRROR_ENV = "FASTDRMM_MNIST_MIRROR"

_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_CHUNK = 1 << 20
_TRAILING_COUNTED = 1 << 20  # trailing bytes counted (not kept) before giving up

_MNIST_DESCR = """MNIST handwritten digits (LeCun, Cortes & Burges): 60,000 training and
10,000 test images, 28x28 grey levels scaled to [0, 1], labels 0-9.
Data (c) Yann LeCun and Corinna Cortes, licensed CC BY-SA 3.0."""


# --------------------------------------------------------------------------------------------
# where the files are


def _env(name):
    value = os.environ.get(name, "").strip()
    return value or None


def _cache_root():
    xdg = _env("XDG_CACHE_HOME")
    if xdg is not None and os.path.isabs(xdg):  # the XDG spec says: ignore a relative path
        return Path(xdg)
    return Path.home() / ".cache"


def _resolve_dir(data_dir):
    """(directory, how it was chosen) by the precedence of the module docstring."""
    if data_dir is not None:
        return Path(os.fspath(data_dir)).expanduser(), "the data_dir argument"
    root = _env(DATA_ENV)
    if root is not None:
        return Path(root).expanduser() / "mnist", f"${DATA_ENV}={root}"
    return _cache_root() / "fastdrmm" / "mnist", f"the user cache (no data_dir, no ${DATA_ENV})"


def mnist_data_dir(data_dir=None):
    """The directory :func:`load_mnist` reads (and downloads into) for this ``data_dir``.

    ``data_dir`` if given, else ``$FASTDRMM_DATA/mnist``, else
    ``$XDG_CACHE_HOME/fastdrmm/mnist`` (default ``~/.cache/fastdrmm/mnist``). The directory
    need not exist.
    """
    return _resolve_dir(data_dir)[0]


def _find(directory, name):
    """The existing raw or .gz file for ``name`` in ``directory`` (raw first), else None."""
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _mirrors(mirror):
    if mirror is None:
        env = _env(MIRROR_ENV)
        mirrors = env.split() if env is not None else list(DEFAULT_MNIST_MIRRORS)
    elif isinstance(mirror, (str, os.PathLike)):
        mirrors = [os.fspath(mirror)]
    else:
        mirrors = [os.fspath(m) for m in mirror]
    mirrors = [m.strip() for m in mirrors if m and m.strip()]
    if not mirrors:
        raise ValueError("no MNIST mirror URL given (empty mirror list)")
    # a plain local directory is taken as its file:// URL
    return [m if "://" in m else Path(m).expanduser().resolve().as_uri() for m in mirrors]


# --------------------------------------------------------------------------------------------
# reading and checking one file


def _idx_kind(name):
    """(magic, number of dimensions) of the IDX file ``name``."""
    return (_IMAGES_MAGIC, 3) if "images" in name else (_LABELS_MAGIC, 1)


def _read_up_to(f, n, into):
    """Append up to ``n`` bytes of stream ``f`` to bytearray ``into``, in bounded chunks."""
    while n > 0:
        chunk = f.read(min(n, _CHUNK))
        if not chunk:
            return
        into += chunk
        n -= len(chunk)


def _count_trailing(f):
    """Bytes left in ``f`` (read and dropped), or None past :data:`_TRAILING_COUNTED`."""
    total = 0
    while total <= _TRAILING_COUNTED:
        chunk = f.read(min(_CHUNK, _TRAILING_COUNTED + 1 - total))
        if not chunk:
            return total
        total += len(chunk)
    return None


def _read_idx(path, name, cap=None, gz=None):
    """The uncompressed contents of the IDX file ``path`` (raw, or gzip: by default when the
    name ends in .gz), checked against its header as they are read.

    The header is read first; then exactly the bytes it declares, refused without reading
    when they are more than ``cap``; then the end of the stream must follow. A broken gzip
    stream, a truncated file, trailing data and a file that inflates past its declared size
    are ValueErrors naming ``path``."""
    magic, n_dims = _idx_kind(name)
    n_header = 4 * (1 + n_dims)
    gz = path.suffix == ".gz" if gz is None else gz
    data = bytearray()
    try:
        with open(path, "rb") as raw, \
                (gzip.GzipFile(fileobj=raw, mode="rb") if gz else contextlib.nullcontext(raw)) as f:
            _read_up_to(f, n_header, data)
            dims, expected = _declared(path, data, magic, n_dims)
            if cap is not None and expected > cap:
                raise ValueError(
                    f"{path}: the header declares dimensions {dims} ({expected} bytes), more than "
                    f"the {cap} bytes of the canonical {name}: not the canonical MNIST file "
                    "(verify=False reads other IDX files)")
            _read_up_to(f, expected - len(data), data)
            if len(data) < expected:
                raise ValueError(f"{path}: truncated IDX file: the header declares dimensions "
                                 f"{dims} ({expected} bytes in all) but the file holds "
                                 f"{len(data)} bytes")
            trailing = _count_trailing(f)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    except MemoryError:
        raise ValueError(f"{path}: the IDX file does not fit in memory") from None
    if trailing is None:
        raise ValueError(f"{path}: more than {_TRAILING_COUNTED} unexpected trailing bytes "
                         f"after the {expected} bytes that the header (dimensions {dims}) "
                         "declares: the file holds (or inflates to) more than it declares")
    if trailing:
        raise ValueError(f"{path}: {trailing} unexpected trailing bytes after the "
                         f"{expected} bytes that the header (dimensions {dims}) declares")
    return data


def _declared(path, head, magic, n_dims):
    """(dimensions, total size in bytes) that an IDX header declares."""
    n_header = 4 * (1 + n_dims)
    if len(head) < n_header:
        raise ValueError(f"{path}: truncated IDX file: {len(head)} bytes, shorter than the "
                         f"{n_header}-byte header")
    fields = np.frombuffer(bytes(head[:n_header]), dtype=">u4").astype(np.int64)
    if fields[0] != magic:
        raise ValueError(f"{path}: not an IDX {'image' if magic == _IMAGES_MAGIC else 'label'} "
                         f"file: magic number {int(fields[0])}, expected {magic}")
    dims = tuple(int(d) for d in fields[1:])
    return dims, n_header + math.prod(dims)


def _check_sha256(path, name, data):
    expected = MNIST_SHA256[name]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{path}: sha256 of the uncompressed contents is {actual}, expected the canonical "
            f"{expected} for {name}: the file is corrupt or not the canonical MNIST file; "
            "delete it and copy or download it again (load_mnist(..., download=True)), or pass "
            "verify=False to read a non-canonical IDX file"
        )


def _header(path, data, magic, n_dims):
    """(header size, dimensions) of IDX contents read by :func:`_read_idx`."""
    dims, expected = _declared(path, data, magic, n_dims)
    if len(data) != expected:  # _read_idx reads exactly this much
        raise ValueError(f"{path}: holds {len(data)} bytes, its header declares {expected}")
    return 4 * (1 + n_dims), dims


def _parse_images(path, data, dtype):
    offset, (n, rows, cols) = _header(path, data, _IMAGES_MAGIC, 3)
    if rows < 1 or cols < 1:
        raise ValueError(f"{path}: images of {rows}x{cols} pixels")
    pixels = np.frombuffer(data, dtype=np.uint8, count=n * rows * cols, offset=offset)
    try:
        images = pixels.astype(dtype).reshape(n, 1, rows, cols)
    except MemoryError:
        raise ValueError(f"{path}: {n} images of {rows}x{cols} pixels do not fit in memory as "
                         f"{np.dtype(dtype)}") from None
    np.divide(images, 255, out=images)
    return images


def _parse_labels(path, data):
    offset, (n,) = _header(path, data, _LABELS_MAGIC, 1)
    labels = np.frombuffer(data, dtype=np.uint8, count=n, offset=offset)
    if n and labels.max() > 9:
        raise ValueError(f"{path}: label {int(labels.max())} outside 0-9")
    return labels.astype(np.int64)


def _load_split(directory, split, dtype, verify):
    """(images, labels) of one split: structure checked first (clearer messages), then the
    sha256 of both files."""
    images_name, labels_name = _SPLITS[split]
    images_path, labels_path = _find(directory, images_name), _find(directory, labels_name)
    # verified files cannot be larger than the canonical ones: read no more than those
    images_data = _read_idx(images_path, images_name,
                            cap=MNIST_SIZES[images_name] if verify else None)
    labels_data = _read_idx(labels_path, labels_name,
                            cap=MNIST_SIZES[labels_name] if verify else None)
    y = _parse_labels(labels_path, labels_data)
    n_images = int(np.frombuffer(bytes(images_data[:8]), dtype=">u4", count=2)[1])
    if n_images != len(y):
        raise ValueError(f"{images_path} holds {n_images} images but {labels_path} holds "
                         f"{len(y)} labels")
    if verify:
        _check_sha256(images_path, images_name, images_data)
        _check_sha256(labels_path, labels_name, labels_data)
    return _parse_images(images_path, images_data, dtype), y


# --------------------------------------------------------------------------------------------
# download


class _FetchError(Exception):
    """A mirror could not be reached or broke off (as opposed to serving a bad copy)."""


def _download(name, directory, mirrors, timeout):
    """Fetch ``name``.gz from the first mirror that serves a verified copy; return its path."""
    destination = directory / (name + ".gz")
    failures = []
    bad_copies_only = True
    for base in mirrors:
        url = base.rstrip("/") + "/" + name + ".gz"
        try:
            # the copy is renamed into place only once its checksum is right
            with atomic_write(destination, suffix=".part") as (f, tmp):
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as r:
                        shutil.copyfileobj(r, f, _CHUNK)
                    f.flush()
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    # URLError/HTTPError/timeouts are OSErrors; a cut transfer an HTTPException
                    raise _FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc
                data = _read_idx(Path(tmp), name, cap=MNIST_SIZES[name], gz=True)
                actual = hashlib.sha256(data).hexdigest()
                del data
                if actual != MNIST_SHA256[name]:
                    raise ValueError(f"{tmp}: sha256 of the uncompressed contents is {actual}, "
                                     f"expected {MNIST_SHA256[name]}")
        except _FetchError as exc:
            bad_copies_only = False
            failures.append(str(exc))
            continue
        except ValueError as exc:
            failures.append(f"{url}: bad copy: {str(exc).replace(str(tmp) + ': ', '')}")
            continue
        return destination
    message = (f"could not download {name} into {directory} (nothing was written there):\n  "
               + "\n  ".join(failures))
    raise (ValueError if bad_copies_only else OSError)(message)


# --------------------------------------------------------------------------------------------
# public loaders


def load_mnist(data_dir=None, download=False, *, subset="both", return_X_y=False,
               dtype=np.float32, verify=True, mirror=None, timeout=60.0):
    """Load MNIST from its four IDX files (raw or .gz), verified against the canonical sha256.

    Parameters
    ----------
    data_dir : str or path-like, optional
        The directory holding the files. Default: ``$FASTDRMM_DATA/mnist``, else the user cache
        ``$XDG_CACHE_HOME/fastdrmm/mnist`` (``~/.cache/fastdrmm/mnist``); see
        :func:`mnist_data_dir`.
    download : bool, default False
        Fetch the missing files from the mirror into that directory (created if needed), each
        checked against its sha256 before it is renamed into place. Files already present are
        never downloaded again nor overwritten.
    subset : {"both", "train", "test"}, default "both"
        Which split(s) to load; only the files of the chosen split(s) are needed.
    return_X_y : bool, default False
        Return plain tuples instead of a :class:`sklearn.utils.Bunch` (see Returns).
    dtype : float32 or float64, default float32
        The images' dtype.
    verify : bool, default True
        Check the sha256 of the files read. ``False`` reads any well-formed IDX files of the
        same names (e.g. Fashion-MNIST); downloads are verified whatever ``verify`` says.
    mirror : str or sequence of str, optional
        Base URL(s) of the files (``<mirror>/<name>.gz``), tried in order. Default:
        ``$FASTDRMM_MNIST_MIRROR`` (whitespace-separated URLs), else
        :data:`DEFAULT_MNIST_MIRRORS`.
    timeout : float, default 60
        Seconds a download may stall before it fails.

    Returns
    -------
    subset="both": ``Bunch(X_train, y_train, X_test, y_test, data_dir, DESCR)``, or with
        ``return_X_y`` the tuple ``(X_train, y_train, X_test, y_test)``;
    subset="train" or "test": ``Bunch(data, target, subset, data_dir, DESCR)``, or with
        ``return_X_y`` the tuple ``(X, y)``.

    Images ``X`` are ``dtype`` arrays of shape ``(N, 1, 28, 28)`` holding ``pixel / 255`` in
    [0, 1]; labels ``y`` are int64 arrays of shape ``(N,)`` in 0-9. N is 60,000 (train) and
    10,000 (test).

    Raises
    ------
    FileNotFoundError
        A file is missing and ``download`` is False; the message says where it looked.
    ValueError
        A file is corrupt, truncated, not IDX, or fails its checksum (the message names it); or
        every mirror served a bad copy.
    OSError
        A download failed (network error, HTTP error) on every mirror.
    """
    if subset not in ("both", "train", "test"):
        raise ValueError(f"subset must be 'both', 'train' or 'test', got {subset!r}")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    splits = ("train", "test") if subset == "both" else (subset,)
    names = [name for split in splits for name in _SPLITS[split]]

    directory, how = _resolve_dir(data_dir)
    missing = [name for name in names if _find(directory, name) is None]
    if missing and not download:
        try:
            source = _mirrors(mirror)[0]
        except ValueError:
            source = "a mirror"
        raise FileNotFoundError(
            f"MNIST file(s) {', '.join(missing)} not found in {directory} (chosen by {how}; "
            f"each looked for raw and as .gz). To get them: pass download=True to fetch them "
            f"from {source} (mirror=... or ${MIRROR_ENV} picks another), or copy the IDX "
            f"files there, or point data_dir=... or ${DATA_ENV} (a data root holding mnist/) at "
            "a copy"
        )
    if missing:
        mirrors = _mirrors(mirror)
        directory.mkdir(parents=True, exist_ok=True)
        for name in missing:
            _download(name, directory, mirrors, timeout)

    loaded = {split: _load_split(directory, split, dtype, verify) for split in splits}
    if subset == "both":
        (X_train, y_train), (X_test, y_test) = loaded["train"], loaded["test"]
        if return_X_y:
            return X_train, y_train, X_test, y_test
        return Bunch(X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test,
                     data_dir=directory, DESCR=_MNIST_DESCR)
    X, y = loaded[subset]
    if return_X_y:
        return X, y
    return Bunch(data=X, target=y, subset=subset, data_dir=directory, DESCR=_MNIST_DESCR)


def load_digits(*, return_X_y=False, dtype=np.float32):
    """scikit-learn's bundled 8x8 digits as ``(N, 1, 8, 8)`` images in [0, 1].

    The 1,797 images' grey levels 0-16 are divided by 16. Returns
    ``Bunch(data, target, target_names, DESCR)`` with ``data`` of ``dtype`` (float32 or
    float64), shape (1797, 1, 8, 8), and ``target`` int64 labels 0-9 of shape (1797,); with
    ``return_X_y`` the tuple ``(data, target)``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    digits = _sk_load_digits()
    X = (np.asarray(digits.images, dtype=np.float64) / 16.0).astype(dtype)
    X = X.reshape(-1, 1, 8, 8)
    y = np.asarray(digits.target, dtype=np.int64)
    if return_X_y:
        return X, y
    return Bunch(data=X, target=y, target_names=np.arange(10), DESCR=digits.DESCR)
