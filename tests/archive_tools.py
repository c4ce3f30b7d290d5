"""Build and alter fastdrmm model files (ZIP archives) below the ZIP layer, for tests.

A flipped byte in a saved file is almost always caught by zipfile's CRC-32 first; to test the
library's own checks (sha256 of the arrays, the header checks, model-side validation) the
archive must be rebuilt with valid CRCs after the edit. :func:`rebuild_archive` does that;
:func:`alter_member` flips one byte of one member and rebuilds; :func:`raw_zip` writes an
archive whose declared sizes and CRCs are whatever the test says (zip bombs, lying sizes).

Typical use::

    from archive_tools import alter_member, member_names
    for member in member_names(path):
        bad = alter_member(path, member, offset=200, out=tmp_path / "bad.npz")
        with pytest.raises(ValueError, match="sha256|..."):
            fastdrmm.load(bad)
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_members", "member_names", "write_archive", "rebuild_archive", "alter_member",
           "npy_bytes", "npy_array", "raw_zip", "deflate_zeros", "rehash_arrays"]


def read_members(path):
    """The members of a ZIP archive, ``name -> uncompressed bytes``, in archive order."""
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def member_names(path):
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


def write_archive(out, members, *, compress=False):
    """Write ``members`` (``name -> bytes``, in order) as a ZIP archive with valid CRCs."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return Path(out)


def npy_bytes(arr):
    """``arr`` in the ``.npy`` format, as ``numpy.save`` writes it (no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_array(data):
    """The array of ``.npy`` bytes."""
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def npy_data_offset(data):
    """Where the array data start in ``.npy`` bytes (the header's size)."""
    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    (np.lib.format.read_array_header_1_0 if version == (1, 0)
     else np.lib.format.read_array_header_2_0)(fp)
    return fp.tell()


def rehash_arrays(members):
    """Set every declared array's shape, dtype and sha256 in ``metadata.json`` to those of its
    ``.npy`` member, so that only checks of the VALUES can refuse an altered array."""
    header = json.loads(members["metadata.json"])
    for name, spec in header.get("arrays", {}).items():
        data = members.get(name + ".npy")
        if data is None:
            continue
        arr = npy_array(data)
        spec["shape"] = list(arr.shape)
        spec["dtype"] = arr.dtype.str
        spec["sha256"] = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    members["metadata.json"] = json.dumps(header).encode()
    return members


def rebuild_archive(path, out=None, *, edit_header=None, replace=None, drop=(), add=None,
                    order=None, rehash=False, compress=False):
    """Rebuild the archive at ``path`` into ``out`` (default: ``edited.npz`` beside it) with
    valid CRCs, after these edits, in this order:

    ``edit_header(header)``: change the parsed ``metadata.json`` in place (it is written back
    as JSON; non-finite floats as ``NaN``/``Infinity``);
    ``replace``: ``name -> bytes`` of members to overwrite (raw bytes, e.g. a flipped copy);
    ``drop``: member names to remove; ``add``: ``name -> bytes`` to append;
    ``rehash``: recompute the declared shapes, dtypes and sha256 from the ``.npy`` members;
    ``order``: the member names to write, in order (default: all, in the archive's order).
    """
    members = read_members(path)
    if edit_header is not None:
        header = json.loads(members["metadata.json"])
        edit_header(header)
        members["metadata.json"] = json.dumps(header).encode()
    if replace:
        members.update(replace)
    for name in drop:
        del members[name]
    if add:
        members.update(add)
    if rehash:
        rehash_arrays(members)
    out = Path(out) if out is not None else Path(path).with_name("edited.npz")
    chosen = order if order is not None else list(members)
    return write_archive(out, {name: members[name] for name in chosen}, compress=compress)


def alter_member(path, member, offset, xor=0xFF, out=None, *, rehash=False):
    """A copy of the archive at ``path`` whose ``member`` has byte ``offset`` XORed with
    ``xor``, rebuilt with valid CRCs (so zipfile's own check passes and only the library's can
    refuse it). ``rehash=True`` also recomputes the declared sha256 of the arrays."""
    data = bytearray(read_members(path)[member])
    data[offset] ^= xor
    return rebuild_archive(path, out, replace={member: bytes(data)}, rehash=rehash)


# --------------------------------------------------------------------------------------------
# archives with chosen declared sizes (zip bombs)


def deflate_zeros(n_bytes, chunk=1 << 20):
    """(raw deflate stream, crc32) of ``n_bytes`` zero bytes, built in bounded memory."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(chunk)
    parts, crc, left = [], 0, n_bytes
    while left > 0:
        block = zeros if left >= chunk else zeros[:left]
        parts.append(compressor.compress(block))
        crc = zlib.crc32(block, crc)
        left -= len(block)
    parts.append(compressor.flush())
    return b"".join(parts), crc


def raw_zip(entries):
    """A ZIP archive (bytes) from ``entries``: dicts with ``name``, ``data`` (the bytes stored,
    already compressed when ``method`` is 8, deflate), and optionally ``method`` (0 stored,
    default), ``crc`` and ``file_size`` (the declared uncompressed size; default: those of
    ``data``, which only fits stored members)."""
    body, directory = bytearray(), bytearray()
    for entry in entries:
        name = entry["name"].encode()
        data = entry["data"]
        method = entry.get("method", 0)
        crc = entry.get("crc", zlib.crc32(data))
        size = entry.get("file_size", len(data))
        offset = len(body)
        fields = (20, 0, method, 0, 0x21, crc, len(data), size, len(name))
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields, 0) + name + data
        directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, 0,
                                 offset) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                      len(directory), len(body), 0)
    return bytes(body + directory + end)


def peak_memory_of(call):
    """(the exception ``call()`` raised or None, the peak bytes traced meanwhile)."""
    import tracemalloc
    tracemalloc.start()
    try:
        call()
        raised = None
    except Exception as exc:  # noqa: BLE001 - handed back to the test
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak
