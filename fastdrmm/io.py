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
wrong: not a regular file (a directory, FIFO, device or socket is refused before it is opened
for reading, so a FIFO cannot block the reader); not a ZIP archive, truncated, or data after
the archive's end; more than :data:`MAX_ARRAYS` arrays (counted from the archive's directory
before it is parsed); a member's CRC-32; a compression method other than stored or deflate; a
missing, unreadable or malformed ``metadata.json``, or one larger than
:data:`MAX_METADATA_BYTES`; a wrong ``format``, an unsupported ``format_version``, a missing or
unknown field; a declared array without its member, a member that no array declares; an array
whose ``.npy`` header disagrees with the declared shape or dtype, whose data is short or
followed by extra bytes, or whose sha256 differs.

Sizes are checked before anything large is inflated: a member's declared uncompressed size
must be what its content needs (``metadata.json``: at most :data:`MAX_METADATA_BYTES`; an
array: exactly its ``.npy`` header, itself at most 10,000 bytes, plus shape x itemsize) and no
more than its compressed size allows (stored: equal; deflate: at most 1,032 times, deflate's
limit). Members are then
read in chunks that stop at the declared size, so a file that lies about its sizes cannot make
the reader inflate more than the arrays it declares, and each array is read straight into its
own buffer (the peak memory of a load is about the arrays' size).

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
:func:`save_arrays` writes through :func:`fastdrmm._atomic.atomic_write`: a temporary file in
the destination's directory, flushed, fsynced and renamed over the destination, so that a
reader sees the old file or the new one, never a part; on any failure (or interrupt) the
temporary file is removed and an existing file is left as it was. Saving over an existing file
keeps its permission bits; saving to a symbolic link writes the file it points to. The
destination must be a regular file or absent: a directory, FIFO or device is refused before
anything is written, as is more than :data:`MAX_ARRAYS` arrays.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np

from ._atomic import atomic_write, file_kind

__all__ = ["save_arrays", "load_arrays", "read_header", "FORMAT_NAME", "FORMAT_VERSION",
           "SUPPORTED_VERSIONS", "MAX_ARRAYS", "MAX_METADATA_BYTES"]

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
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"

#: the most arrays one file may hold (more is refused on save and on load)
MAX_ARRAYS = 10_000
#: the largest ``metadata.json`` a reader accepts (bytes, uncompressed)
MAX_METADATA_BYTES = 8 << 20
# one central-directory entry: 46 fixed bytes, a name of at most 204 bytes, ZIP64 extras
_MAX_DIRECTORY_ENTRY = 1024
# deflate cannot expand more than about 1032:1; the slack covers tiny members
_MAX_DEFLATE_RATIO = 1032
_DEFLATE_SLACK = 1024
_CHUNK = 1 << 20


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


# --------------------------------------------------------------------------------------------
# writing


def save_arrays(path, arrays, metadata=None, *, compress=False):
    """Write ``arrays`` and ``metadata`` to ``path`` atomically, in the format of this module.

    Parameters
    ----------
    path : str or path-like
        The destination file, written exactly there (no extension added; ``.npz`` is the
        convention). Its directory must exist. An existing file is replaced only once the new
        one is complete on disk, and keeps its permission bits; a symbolic link is written
        through (the file it points to is replaced, the link stays).
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
        Bad names, dtypes or metadata, more than :data:`MAX_ARRAYS` arrays, metadata larger
        than :data:`MAX_METADATA_BYTES` as JSON, or a destination
        that is not a regular file (a FIFO, a device), before anything is written.
    OSError
        The file could not be written (``IsADirectoryError``: ``path`` is a directory;
        ``FileNotFoundError``: its directory does not exist); nothing is left behind, ``path``
        is untouched.
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
    if len(arrays) > MAX_ARRAYS:
        raise ValueError(f"arrays holds {len(arrays)} arrays; a file holds at most "
                         f"{MAX_ARRAYS}")
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
    if len(header_bytes) > MAX_METADATA_BYTES:  # a file no reader would accept
        raise ValueError(f"the metadata and array list take {len(header_bytes)} bytes as JSON; "
                         f"a file holds at most {MAX_METADATA_BYTES} (store large data as "
                         "arrays)")
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


def _open_regular(path):
    """``path`` opened for reading, refused unless it is a regular file.

    The type is checked before opening (a FIFO would block ``open``) and again on the open
    descriptor (the name may have been replaced in between); ``O_NONBLOCK`` keeps even that
    second open from blocking."""
    info = os.stat(path)  # a missing or unreadable path: the OSError as it is
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file ({file_kind(info.st_mode)}); a fastdrmm "
                         "model file is a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file ({file_kind(info.st_mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _directory_extent(f, size, tail):
    """(number of entries, bytes) of the archive's central directory, from its end records."""
    entries, directory_bytes = struct.unpack("<H I", tail[10:16])
    if entries != 0xFFFF and directory_bytes != 0xFFFFFFFF:
        return entries, directory_bytes
    locator_at = size - _EOCD_SIZE - 20  # a ZIP64 archive: its own end record holds them
    if locator_at < 0:
        raise _Bad("truncated ZIP64 end records")
    f.seek(locator_at)
    locator = f.read(20)
    if locator[:4] != _ZIP64_LOCATOR:
        return entries, directory_bytes
    (record_at,) = struct.unpack("<Q", locator[8:16])
    if record_at > locator_at - 56:
        raise _Bad("corrupt ZIP64 end records")
    f.seek(record_at)
    record = f.read(56)
    if record[:4] != _ZIP64_EOCD:
        raise _Bad("corrupt ZIP64 end records")
    return struct.unpack("<Q Q", record[32:48])


def _check_container(f, size):
    """The file is one ZIP archive from its first byte to its last (no junk, no truncation),
    with a central directory small enough for :data:`MAX_ARRAYS` arrays."""
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
    entries, directory_bytes = _directory_extent(f, size, tail)
    _check_member_count(entries)
    if directory_bytes > (MAX_ARRAYS + 1) * _MAX_DIRECTORY_ENTRY or directory_bytes > size:
        raise _Bad(f"the ZIP directory is {directory_bytes} bytes, more than "
                   f"{MAX_ARRAYS} arrays need (or than the file holds)")


def _check_member_count(n_members):
    if n_members > MAX_ARRAYS + 1:
        raise _Bad(f"the archive holds {n_members} members; a fastdrmm file holds at most "
                   f"{MAX_ARRAYS} arrays and {METADATA_MEMBER}")


def _check_header(header):
    if not isinstance(header, dict):
        raise _Bad(f"{METADATA_MEMBER} is not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise _Bad(f"format is {header.get('format')!r:.200}, expected {FORMAT_NAME!r}")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _Bad(f"format_version {version!r:.200} is not an int")
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
    if len(arrays) > MAX_ARRAYS:
        raise _Bad(f"{len(arrays)} arrays declared; a fastdrmm file holds at most {MAX_ARRAYS}")
    for name, spec in arrays.items():
        _check_array_spec(name, spec)


def _check_array_spec(name, spec):
    if not _NAME_RE.match(name) or len(name) > 200:
        raise _Bad(f"invalid array name {name!r:.220}")
    if not isinstance(spec, dict) or sorted(spec) != sorted(_ARRAY_FIELDS):
        raise _Bad(f"array {name!r}: the entry must hold exactly {list(_ARRAY_FIELDS)}")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > 64 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _Bad(f"array {name!r}: invalid shape {shape!r:.200}")
    try:
        dtype = np.dtype(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    except (TypeError, ValueError, SyntaxError):
        dtype = None
    if dtype is None or dtype.str != spec["dtype"] or dtype.kind not in _DTYPE_KINDS \
            or dtype.fields is not None:
        raise _Bad(f"array {name!r}: invalid dtype {spec['dtype']!r:.200}")
    if not isinstance(spec["sha256"], str) or not _SHA256_RE.match(spec["sha256"]):
        raise _Bad(f"array {name!r}: invalid sha256 {spec['sha256']!r:.200}")


def _check_declared_size(zf, info, what, most=None):
    """Refuse a member before inflating it when its declared uncompressed size is more than
    ``most`` or than its compressed size (itself within the file) can hold."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _Bad(f"{what}: compression method {info.compress_type} (fastdrmm files are "
                   "stored or deflated)")
    if most is not None and info.file_size > most:
        raise _Bad(f"{what}: the archive declares {info.file_size} uncompressed bytes, more "
                   f"than the {most} allowed; refused before inflating")
    if info.header_offset + info.compress_size > zf.start_dir:
        raise _Bad(f"{what}: the archive declares {info.compress_size} compressed bytes, "
                   "more than the file holds")
    limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else \
        info.compress_size * _MAX_DEFLATE_RATIO + _DEFLATE_SLACK
    if info.file_size > limit:
        raise _Bad(f"{what}: the archive declares {info.file_size} uncompressed bytes from "
                   f"{info.compress_size} compressed bytes, more than the compression can "
                   "hold")


def _read_exactly(member, view):
    """Fill ``view`` (a writable byte memoryview) from ``member`` in bounded chunks."""
    done = 0
    while done < len(view):
        chunk = member.read(min(_CHUNK, len(view) - done))
        if not chunk:
            break
        view[done:done + len(chunk)] = chunk
        done += len(chunk)
    return done


def _read_metadata(zf, info):
    _check_declared_size(zf, info, METADATA_MEMBER, MAX_METADATA_BYTES)
    buffer = bytearray(info.file_size + 1)  # one byte more: a stream longer than declared
    with zf.open(info) as member:
        n = _read_exactly(member, memoryview(buffer))
    if n != info.file_size:
        raise _Bad(f"{METADATA_MEMBER}: {n} bytes read, {info.file_size} declared")
    try:
        return json.loads(bytes(buffer[:n]).decode("utf-8"))
    except RecursionError:
        raise _Bad(f"{METADATA_MEMBER} nests too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, too long an int
        raise _Bad(f"{METADATA_MEMBER} is not valid UTF-8 JSON ({exc})") from None


def _read_npy_header(member, name):
    """(shape, fortran_order, dtype) from the start of a ``.npy`` member."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise _Bad(f"array {name!r}: unsupported .npy version {version}")


def _read_member_array(zf, info, name, spec):
    """The checked array of member ``info``, read straight into its own buffer."""
    dtype = np.dtype(spec["dtype"])
    count = math.prod(spec["shape"])
    nbytes = count * dtype.itemsize
    _check_declared_size(zf, info, f"array {name!r}")
    with zf.open(info) as member:
        # the header is at most 10,000 bytes (numpy's limit): reading it inflates no more
        shape, fortran, found = _read_npy_header(member, name)
        if list(shape) != spec["shape"] or found.str != spec["dtype"]:
            raise _Bad(f"array {name!r}: the .npy member holds shape {tuple(shape)} dtype "
                       f"{found.str}, the metadata declares shape {tuple(spec['shape'])} "
                       f"dtype {spec['dtype']}")
        expected = member.tell() + nbytes
        if info.file_size != expected:  # before the data are inflated or allocated
            raise _Bad(f"array {name!r}: the .npy member has {info.file_size} bytes, its "
                       f"header declares {expected}")
        flat = np.empty(count, dtype=dtype)
        n = _read_exactly(member, memoryview(flat).cast("B"))
        if n != nbytes or member.read(1):
            raise _Bad(f"array {name!r}: the .npy member has {member.tell()} bytes, its "
                       f"header declares {expected}")
    arr = flat.reshape(shape, order="F" if fortran else "C")
    if _sha256(arr) != spec["sha256"]:
        raise _Bad(f"array {name!r}: sha256 mismatch (the data are corrupt)")
    return arr


def _members(zf):
    """The archive's ZipInfo by name, in order, refused when duplicated or too many."""
    infos = zf.infolist()
    _check_member_count(len(infos))
    by_name = {info.filename: info for info in infos}
    if len(by_name) != len(infos):
        raise _Bad("duplicate ZIP members")
    if not infos or infos[0].filename != METADATA_MEMBER:
        raise _Bad(f"{METADATA_MEMBER} is not the first member: not a fastdrmm model file")
    return by_name


def _match_members(by_name, header):
    """Every member declared, every declared array present (set lookups: linear)."""
    declared = {name + ".npy" for name in header["arrays"]}
    extra = [m for m in by_name if m != METADATA_MEMBER and m not in declared]
    if extra:
        raise _Bad(f"member(s) {extra[:20]}{' ...' if len(extra) > 20 else ''} not declared "
                   f"in {METADATA_MEMBER}")
    absent = [name for name in header["arrays"] if name + ".npy" not in by_name]
    if absent:
        raise _Bad(f"array(s) {absent[:20]}{' ...' if len(absent) > 20 else ''} declared but "
                   "missing from the archive")


def _open_checked(path, load):
    """(header, arrays or None) of a checked file; a _Bad or parsing error -> ValueError."""
    path = Path(os.fspath(path))
    with _open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            _check_container(f, size)
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                by_name = _members(zf)
                header = _read_metadata(zf, by_name[METADATA_MEMBER])
                _check_header(header)
                _match_members(by_name, header)
                if not load:
                    return header, None
                arrays = {name: _read_member_array(zf, by_name[name + ".npy"], name, spec)
                          for name, spec in header["arrays"].items()}
                return header, arrays
        except _Bad as exc:
            raise ValueError(f"{path}: invalid fastdrmm model file: {exc}") from None
        except MemoryError:
            raise ValueError(f"{path}: the arrays it declares do not fit in memory") from None
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
        ``path`` does not exist or cannot be opened.
    ValueError
        ``path`` is not a regular file (refused before it is opened: a FIFO cannot block), or
        anything is wrong with the file (see the module docstring, sizes and caps included);
        the message names ``path`` and the problem.
    """
    header, arrays = _open_checked(path, load=True)
    return arrays, header["metadata"]
