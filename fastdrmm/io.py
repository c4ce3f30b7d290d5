"""The on-disk format of fitted models: named arrays + JSON metadata in one checked ZIP file.

Models save through :func:`save_arrays` (their fitted arrays, and metadata such as the model
class and ``get_params()``) and load through :func:`load_arrays`; this module knows nothing of
any model. No pickle is ever written or read.

Format ``fastdrmm``, version 1
------------------------------
The file is a ZIP archive (a valid ``.npz``: :func:`numpy.load` opens it too) whose members are,
in this order:

``metadata.json``
    UTF-8 JSON, one object with exactly these fields:

    ``format`` : str
        ``"fastdrmm"``.
    ``format_version`` : int
        ``1``. A reader refuses versions it does not know (:data:`SUPPORTED_VERSIONS`).
    ``library_version`` : str
        ``fastdrmm.__version__`` of the writer (informational).
    ``metadata`` : object
        The caller's metadata, verbatim. Models put there at least ``model_class`` (str, e.g.
        ``"RMM"``) and ``params`` (the ``get_params()`` hyper-parameters); anything JSON can
        hold is allowed (see "Metadata" below).
    ``arrays`` : object
        One entry an array, in the order the arrays were given, ``name -> {"shape": [int, ...],
        "dtype": str, "sha256": str}``: the shape (``[]`` for a 0-d array), the dtype as
        ``numpy.dtype.str`` (with its byte order, e.g. ``"<f4"``, ``"<i8"``, ``"|b1"``), and
        the lower-case hex sha256 of the array's data in C order (``arr.tobytes(order="C")``).

``<name>.npy``, one an array
    The array in NumPy's ``.npy`` format (version 1.0 or 2.0, C or Fortran order), as
    :func:`numpy.lib.format.write_array` writes it with ``allow_pickle=False``.

Members are stored uncompressed unless ``compress=True`` (deflate). Array names match
``[A-Za-z0-9_][A-Za-z0-9_.-]*`` (at most 200 characters). Dtypes are numeric or boolean
(``b i u f c``) or fixed-width strings (``U S``); object and structured dtypes are refused.

Checks on load
--------------
Every one of these refuses the file with a :class:`ValueError` that names the path and what is
wrong: not a ZIP archive, truncated, or data after the archive's end; a member's CRC-32; a
missing, unreadable or malformed ``metadata.json``; a wrong ``format``, an unsupported
``format_version``, a missing or unknown field; a declared array without its member, a member
that no array declares; an array whose ``.npy`` header disagrees with the declared shape or
dtype, whose data is short or followed by extra bytes, or whose sha256 differs.

Metadata
--------
JSON types only: ``dict`` with ``str`` keys, ``list``, ``str``, ``int``, ``float``, ``bool``,
``None``. For convenience tuples are written as lists, and NumPy scalars (``np.int64``,
``np.float32``, ``np.bool_``, ...) as the equal Python ``int``/``float``/``bool``, so these come
back as lists and Python scalars. Non-finite floats are written as JSON's common extension
``NaN``/``Infinity``/``-Infinity`` (read back by Python's :mod:`json`). Anything else (sets,
arrays, objects, non-``str`` keys) is a :class:`TypeError` naming where it sits.

Atomicity
---------
:func:`save_arrays` writes a temporary file in the destination's directory, flushes and fsyncs
it, then renames it over the destination with :func:`os.replace`: a reader sees the old file or
the new one, never a part. If anything fails (or is interrupted) the temporary file is removed
and an existing file at ``path`` is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _stdio
import json
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["save_arrays", "load_arrays", "read_header", "FORMAT_NAME", "FORMAT_VERSION",
           "SUPPORTED_VERSIONS"]

FORMAT_NAME = "fastdrmm"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
METADATA_MEMBER = "metadata.json"

_HEADER_FIELDS = ("format", "format_version", "library_version", "metadata", "arrays")
_ARRAY_FIELDS = ("shape", "dtype", "sha256")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
_DTYPE_KINDS = "biufcUS"
_EOCD = b"PK\x05\x06"  # ZIP end-of-central-directory signature
_EOCD_SIZE = 22


# --------------------------------------------------------------------------------------------
# helpers


def _sha256(arr):
    return hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)).hexdigest()


def _to_json(value, where):
    """A copy of ``value`` made of JSON types only, else a TypeError naming ``where``."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"metadata{where}: key {key!r} is not a str (JSON object keys "
                                "are strings)")
            out[key] = _to_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"metadata{where}: {type(value).__name__} {value!r:.80} is not a JSON type "
                    "(dict, list, str, int, float, bool, None)")


def _check_name(name):
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 200:
        raise ValueError(f"array name {name!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]* "
                         "(at most 200 characters)")


def _check_array(name, arr):
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"arrays[{name!r}] must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype.kind not in _DTYPE_KINDS or arr.dtype.fields is not None:
        raise TypeError(f"arrays[{name!r}] has dtype {arr.dtype}: only numeric, boolean and "
                        "fixed-width string dtypes are stored (no object or structured dtypes)")


def _umask():
    """The process umask, read without changing it where Linux allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory):
    """Make the rename durable where the platform allows (POSIX); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, suffix=".tmp"):
    """Write ``path`` all or nothing: yields ``(file, temp_path)`` for a temp file beside it.

    When the block ends normally the file is flushed, fsynced, given the usual mode of a new
    file and renamed over ``path`` (then the directory is fsynced). When the block raises, the
    temp file is removed and ``path`` is left exactly as it was. The block may read the temp
    file by its path (e.g. to verify a download) after flushing.
    """
    path = Path(os.fspath(path))
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> the usual mode of a new file
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    _fsync_dir(directory)


# --------------------------------------------------------------------------------------------
# writing


def save_arrays(path, arrays, metadata=None, *, compress=False):
    """Write ``arrays`` and ``metadata`` to ``path`` atomically, in the format of this module.

    Parameters
    ----------
    path : str or path-like
        The destination file, written exactly there (no extension added; ``.npz`` is the
        convention). Its directory must exist. An existing file is replaced only once the new
        one is complete on disk.
    arrays : dict[str, numpy.ndarray]
        Named arrays (names ``[A-Za-z0-9_][A-Za-z0-9_.-]*``); numeric, boolean or fixed-width
        string dtypes, any shape (0-d and empty included), any memory layout.
    metadata : dict, optional
        JSON-compatible metadata (see the module docstring), returned as is by
        :func:`load_arrays`. Models store ``model_class`` and ``params`` here.
    compress : bool, default False
        Deflate the members.

    Raises
    ------
    TypeError, ValueError
        Bad names, dtypes or metadata, before anything is written.
    OSError
        The file could not be written; nothing is left behind, ``path`` is untouched.
    """
    from . import __version__

    path = Path(os.fspath(path))
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict of name -> numpy.ndarray, got "
                        f"{type(arrays).__name__}")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    for name, arr in arrays.items():
        _check_name(name)
        _check_array(name, arr)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": str(__version__),
        "metadata": _to_json(metadata, ""),
        "arrays": {name: {"shape": list(arr.shape), "dtype": arr.dtype.str,
                          "sha256": _sha256(arr)}
                   for name, arr in arrays.items()},
    }
    header_bytes = json.dumps(header, indent=1, allow_nan=True).encode("utf-8")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED

    with atomic_write(path) as (f, _):
        with zipfile.ZipFile(f, "w", compression=method, allowZip64=True) as zf:
            zf.writestr(METADATA_MEMBER, header_bytes)
            for name, arr in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=arr.nbytes >= (1 << 31)) as m:
                    np.lib.format.write_array(m, arr, allow_pickle=False)


# --------------------------------------------------------------------------------------------
# reading


class _Bad(Exception):
    """A format violation found by this module (its message is the reason)."""


def _check_container(f, size):
    """The file is one ZIP archive from its first byte to its last (no junk, no truncation)."""
    if size < _EOCD_SIZE + 4:
        raise _Bad(f"truncated or not a ZIP archive ({size} bytes)")
    f.seek(0)
    if f.read(4) != b"PK\x03\x04":
        raise _Bad("not a ZIP archive (no local file header at offset 0)")
    f.seek(size - _EOCD_SIZE)
    tail = f.read(_EOCD_SIZE)
    if tail[:4] != _EOCD or tail[20:22] != b"\x00\x00":
        raise _Bad("truncated, or data after the end of the ZIP archive (no end-of-archive "
                   "record in the last 22 bytes)")


def _check_header(header):
    if not isinstance(header, dict):
        raise _Bad(f"{METADATA_MEMBER} is not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise _Bad(f"format is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Bad(f"format_version {version!r} is not an int")
    if version not in SUPPORTED_VERSIONS:
        newer = " (written by a newer fastdrmm: upgrade to read it)" if version > max(
            SUPPORTED_VERSIONS) else ""
        raise _Bad(f"format_version {version} is not supported; this fastdrmm reads "
                   f"{', '.join(map(str, SUPPORTED_VERSIONS))}{newer}")
    missing = [k for k in _HEADER_FIELDS if k not in header]
    unknown = [k for k in header if k not in _HEADER_FIELDS]
    if missing or unknown:
        raise _Bad(f"{METADATA_MEMBER}: missing fields {missing}, unknown fields {unknown}")
    if not isinstance(header["library_version"], str):
        raise _Bad("library_version is not a str")
    if not isinstance(header["metadata"], dict):
        raise _Bad("metadata is not a JSON object")
    arrays = header["arrays"]
    if not isinstance(arrays, dict):
        raise _Bad("arrays is not a JSON object")
    for name, spec in arrays.items():
        if not _NAME_RE.match(name) or len(name) > 200:
            raise _Bad(f"invalid array name {name!r}")
        if not isinstance(spec, dict) or sorted(spec) != sorted(_ARRAY_FIELDS):
            raise _Bad(f"array {name!r}: the entry must hold exactly {list(_ARRAY_FIELDS)}")
        shape = spec["shape"]
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _Bad(f"array {name!r}: invalid shape {shape!r}")
        try:
            dtype = np.dtype(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.str != spec["dtype"] or dtype.kind not in _DTYPE_KINDS \
                or dtype.fields is not None:
            raise _Bad(f"array {name!r}: invalid dtype {spec['dtype']!r}")
        if not isinstance(spec["sha256"], str) or not _SHA256_RE.match(spec["sha256"]):
            raise _Bad(f"array {name!r}: invalid sha256 {spec['sha256']!r}")


def _read_member_array(data, name, spec):
    fp = _stdio.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise _Bad(f"array {name!r}: unsupported .npy version {version}")
    if list(shape) != spec["shape"] or dtype.str != spec["dtype"]:
        raise _Bad(f"array {name!r}: the .npy member holds shape {tuple(shape)} dtype "
                   f"{dtype.str}, the metadata declares shape {tuple(spec['shape'])} dtype "
                   f"{spec['dtype']}")
    count = math.prod(shape)
    expected = fp.tell() + count * dtype.itemsize
    if len(data) != expected:
        raise _Bad(f"array {name!r}: the .npy member has {len(data)} bytes, its header "
                   f"declares {expected}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=fp.tell())
    arr = flat.reshape(shape, order="F" if fortran else "C").copy(order="K")
    if _sha256(arr) != spec["sha256"]:
        raise _Bad(f"array {name!r}: sha256 mismatch (the data are corrupt)")
    return arr


def _open_checked(path, load):
    """(header, arrays or None) of a checked file; a _Bad or parsing error -> ValueError."""
    path = Path(os.fspath(path))
    with open(path, "rb") as f:  # a missing or unreadable file: the OSError as it is
        try:
            size = os.fstat(f.fileno()).st_size
            _check_container(f, size)
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                members = zf.namelist()
                if len(set(members)) != len(members):
                    raise _Bad("duplicate ZIP members")
                if not members or members[0] != METADATA_MEMBER:
                    raise _Bad(f"{METADATA_MEMBER} is not the first member: not a fastdrmm "
                               "model file")
                raw = zf.read(METADATA_MEMBER)
                try:
                    header = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise _Bad(f"{METADATA_MEMBER} is not valid UTF-8 JSON ({exc})") from None
                _check_header(header)
                declared = {name + ".npy": name for name in header["arrays"]}
                extra = [m for m in members[1:] if m not in declared]
                if extra:
                    raise _Bad(f"member(s) {extra} not declared in {METADATA_MEMBER}")
                absent = [name for m, name in declared.items() if m not in members]
                if absent:
                    raise _Bad(f"array(s) {absent} declared but missing from the archive")
                if not load:
                    return header, None
                arrays = {name: _read_member_array(zf.read(name + ".npy"), name, spec)
                          for name, spec in header["arrays"].items()}
                return header, arrays
        except _Bad as exc:
            raise ValueError(f"{path}: invalid fastdrmm model file: {exc}") from None
        except Exception as exc:  # zipfile/zlib/npy parsing of a damaged file
            raise ValueError(f"{path}: corrupt or truncated fastdrmm model file "
                             f"({type(exc).__name__}: {exc})") from exc


def read_header(path):
    """The checked ``metadata.json`` document of ``path`` (see the module docstring), without
    reading the arrays: ``format``, ``format_version``, ``library_version``, ``metadata`` and
    ``arrays`` (name -> shape, dtype, sha256). Raises ValueError like :func:`load_arrays`.
    """
    return _open_checked(path, load=False)[0]


def load_arrays(path):
    """Read and fully check a file written by :func:`save_arrays`.

    Returns
    -------
    (arrays, metadata) : (dict[str, numpy.ndarray], dict)
        The arrays, bit-identical to those saved (same shape, dtype and memory order), in the
        order they were saved, and the caller's metadata as saved (tuples as lists, NumPy
        scalars as Python scalars).

    Raises
    ------
    FileNotFoundError, OSError
        ``path`` cannot be opened.
    ValueError
        Anything wrong with the file (see the module docstring); the message names ``path`` and
        the problem.
    """
    header, arrays = _open_checked(path, load=True)
    return arrays, header["metadata"]
