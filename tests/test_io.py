"""fastdrmm.io: the versioned npz + JSON model format (round trip, validation, atomic writes)."""

import json
import math
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastdrmm
from archive_tools import (alter_member, deflate_zeros, npy_bytes, raw_zip, read_members,
                           rebuild_archive, write_archive)
from fastdrmm import io as fio


def rewrite(path, **edits):
    """The archive rebuilt with valid CRCs after ``edits`` (see archive_tools.rebuild_archive):
    the ZIP layer's checks pass, the library's must not."""
    return rebuild_archive(path, **edits)


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "w32": rng.standard_normal((3, 2, 5, 5)).astype(np.float32),
        "w64": rng.standard_normal((4, 7)),
        "fortran": np.asfortranarray(rng.standard_normal((5, 3))),
        "strided": np.arange(40.0)[::3],
        "i64": np.arange(-5, 7, dtype=np.int64).reshape(3, 4),
        "i32": np.array([1, -2, 3], dtype=np.int32),
        "u8": np.arange(256, dtype=np.uint8),
        "big_endian": np.arange(6, dtype=">f8"),
        "flags": np.array([True, False, True]),
        "scalar": np.array(2.5),
        "scalar_int": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "empty_1d": np.zeros(0, dtype=np.int64),
        "classes": np.array(["cat", "dog"]),
        "special": np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324]),
        "layer.0.templates_": np.ones((2, 1, 3, 3), dtype=np.float32),
    }


METADATA = {
    "model_class": "RMM",
    "params": {"n_classes": 10, "tol": 1e-4, "inference": "soft", "random_state": None,
               "warm_start": False, "sizes": [1, 2, 3]},
    "nested": {"a": [{"b": 1.5}, [], {}], "unicode": "é ∑ 😀", "big": 2 ** 70, "neg": -3},
}


def assert_identical(saved, loaded):
    assert list(loaded) == list(saved)  # same names, same order
    for name, a in saved.items():
        b = loaded[name]
        assert isinstance(b, np.ndarray), name
        assert b.shape == a.shape and b.dtype == a.dtype, name
        assert b.dtype.str == a.dtype.str, name  # byte order too
        assert b.tobytes(order="C") == a.tobytes(order="C"), name
        assert b.flags.writeable, name
        if a.flags.f_contiguous and not a.flags.c_contiguous:
            assert b.flags.f_contiguous, name  # the memory order is kept


def no_leftovers(directory, expected):
    assert sorted(p.name for p in Path(directory).iterdir()) == sorted(expected)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.npz"
    fio.save_arrays(path, sample_arrays(), METADATA)
    return path


# --------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("as_str", [False, True])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_is_bit_identical(tmp_path, as_str, compress):
    path = tmp_path / "m.npz"
    arrays = sample_arrays()
    fio.save_arrays(str(path) if as_str else path, arrays, METADATA, compress=compress)
    loaded, metadata = fio.load_arrays(str(path) if as_str else path)
    assert_identical(arrays, loaded)
    assert metadata == METADATA
    no_leftovers(tmp_path, ["m.npz"])


def test_overwrite_and_no_metadata(tmp_path):
    path = tmp_path / "m.npz"
    fio.save_arrays(path, {"a": np.zeros(3)}, {"v": 1})
    fio.save_arrays(path, {"b": np.ones(2, dtype=np.float32)})
    arrays, metadata = fio.load_arrays(path)
    assert list(arrays) == ["b"] and metadata == {}
    fio.save_arrays(path, {})
    assert fio.load_arrays(path) == ({}, {})
    no_leftovers(tmp_path, ["m.npz"])


def test_metadata_json_types(tmp_path):
    path = tmp_path / "m.npz"
    meta = {
        "tuple": (1, (2, 3)), "np_int": np.int64(4), "np_float32": np.float32(0.5),
        "np_float64": np.float64(0.1), "np_bool": np.bool_(True), "true": True, "none": None,
        "nan": float("nan"), "inf": -math.inf, "float": 0.1, "int": 3, "str": "x",
    }
    fio.save_arrays(path, {}, meta)
    _, out = fio.load_arrays(path)
    assert out["tuple"] == [1, [2, 3]]
    assert out["np_int"] == 4 and type(out["np_int"]) is int
    assert out["np_float32"] == 0.5 and type(out["np_float32"]) is float
    assert out["np_float64"] == 0.1 and type(out["np_float64"]) is float
    assert out["np_bool"] is True and out["true"] is True and out["none"] is None
    assert math.isnan(out["nan"]) and out["inf"] == -math.inf
    assert out["float"] == 0.1 and type(out["int"]) is int and out["str"] == "x"


@pytest.mark.parametrize("bad, where", [
    ({"s": {1, 2}}, "['s']"),
    ({"a": np.zeros(2)}, "['a']"),
    ({"p": {"deep": [object()]}}, "['p']['deep'][0]"),
    ({"k": {1: "int key"}}, "['k']"),
])
def test_metadata_that_json_cannot_hold_is_refused_before_writing(tmp_path, bad, where):
    with pytest.raises(TypeError, match=re.escape("metadata" + where)):
        fio.save_arrays(tmp_path / "m.npz", {"a": np.zeros(1)}, bad)
    no_leftovers(tmp_path, [])


@pytest.mark.parametrize("arrays, exc", [
    ({"o": np.array([1, "a", None], dtype=object)}, TypeError),
    ({"rec": np.zeros(2, dtype=[("x", "f4"), ("y", "i4")])}, TypeError),
    ({"lst": [1.0, 2.0]}, TypeError),
    ({"a/b": np.zeros(1)}, ValueError),
    ({"": np.zeros(1)}, ValueError),
    ({".hidden": np.zeros(1)}, ValueError),
    ({"x" * 201: np.zeros(1)}, ValueError),
])
def test_bad_arrays_are_refused_before_writing(tmp_path, arrays, exc):
    with pytest.raises(exc):
        fio.save_arrays(tmp_path / "m.npz", arrays, {})
    no_leftovers(tmp_path, [])


def test_containers_of_the_wrong_type_are_refused(tmp_path):
    with pytest.raises(TypeError, match="arrays must be a dict"):
        fio.save_arrays(tmp_path / "m.npz", [np.zeros(1)], {})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        fio.save_arrays(tmp_path / "m.npz", {}, [("a", 1)])
    no_leftovers(tmp_path, [])


def test_header_and_numpy_compatibility(saved):
    header = fio.read_header(saved)
    assert header["format"] == "fastdrmm" and header["format_version"] == fio.FORMAT_VERSION
    assert header["library_version"] == fastdrmm.__version__
    assert header["metadata"] == METADATA
    arrays = sample_arrays()
    assert list(header["arrays"]) == list(arrays)
    spec = header["arrays"]["w32"]
    assert spec["shape"] == [3, 2, 5, 5] and spec["dtype"] == "<f4"
    import hashlib
    assert spec["sha256"] == hashlib.sha256(arrays["w32"].tobytes()).hexdigest()
    assert header["arrays"]["scalar"]["shape"] == []
    assert header["arrays"]["big_endian"]["dtype"] == ">f8"
    # a plain npz too: numpy reads the arrays without pickle
    with np.load(saved, allow_pickle=False) as npz:
        assert np.array_equal(npz["w64"], arrays["w64"])
        assert set(npz.files) == set(arrays) | {"metadata.json"}
    with zipfile.ZipFile(saved) as zf:
        assert zf.namelist()[0] == "metadata.json"
        assert json.loads(zf.read("metadata.json")) == header


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_new_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        fio.save_arrays(tmp_path / "m.npz", {"a": np.zeros(1)})
    finally:
        os.umask(old)
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------------------------
# refusing damaged files


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fio.load_arrays(tmp_path / "nope.npz")


def test_every_truncation_is_refused(saved):
    data = saved.read_bytes()
    cut = saved.with_name("cut.npz")
    for n in list(range(0, len(data), 13)) + [len(data) - 1, len(data) - 22, 4]:
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match="cut.npz"):
            fio.load_arrays(cut)


def test_every_flipped_byte_of_the_file_is_refused_or_harmless(tmp_path):
    """Flip each byte of a small file: the load fails with a ValueError naming the file, or
    returns exactly what was saved (a flip in a field nobody reads, e.g. a ZIP timestamp).
    Most of these are caught by the ZIP layer (CRC-32, headers); the next test reaches the
    library's own checks."""
    path = tmp_path / "m.npz"
    arrays, meta = small_arrays(), SMALL_META
    fio.save_arrays(path, arrays, meta)
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.npz"
    refused = 0
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        bad.write_bytes(flipped)
        try:
            loaded, out = fio.load_arrays(bad)
        except ValueError as exc:
            assert "bad.npz" in str(exc)
            refused += 1
            continue
        assert_identical(arrays, loaded)
        assert out == meta
    assert refused > 0.8 * len(data)


SMALL_META = {"model_class": "RMM", "params": {"tol": 0.001}}


def small_arrays():
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.array(3),
            "e": np.zeros((0, 2))}


def npy_data_offset(data):
    """Where the array data start in a .npy member."""
    import io
    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    (np.lib.format.read_array_header_1_0 if version == (1, 0)
     else np.lib.format.read_array_header_2_0)(fp)
    return fp.tell()


@pytest.mark.parametrize("xor", [0x01, 0x80])
def test_every_flipped_member_byte_reaches_the_library_checks(tmp_path, xor):
    """Flip each byte of each member and rebuild the archive with valid CRCs, so that the ZIP
    layer cannot see it: a flip in an array's data must be refused by the sha256 check, any
    other flip is refused with a ValueError naming the file or leaves the arrays as saved
    (the caller's metadata is the caller's to check)."""
    path = tmp_path / "m.npz"
    arrays = small_arrays()
    fio.save_arrays(path, arrays, SMALL_META)
    members = read_members(path)
    bad = tmp_path / "bad.npz"
    data_bytes = by_sha256 = 0
    for member, content in members.items():
        data_start = npy_data_offset(content) if member.endswith(".npy") else len(content)
        for offset in range(len(content)):
            alter_member(path, member, offset, xor=xor, out=bad)
            try:
                loaded, _ = fio.load_arrays(bad)
            except ValueError as exc:
                assert "bad.npz" in str(exc)
                by_sha256 += "sha256 mismatch" in str(exc)
                if offset >= data_start:
                    assert f"array {member[:-4]!r}: sha256 mismatch" in str(exc)
                continue
            assert offset < data_start, f"{member} byte {offset}: a changed array loaded"
            assert_identical(arrays, loaded)
        data_bytes += len(content) - data_start
    assert data_bytes == 12 * 4 + 8  # each of these was flipped and refused by the sha256
    assert by_sha256 >= data_bytes


def set_key(*keys_and_value):
    *keys, value = keys_and_value

    def edit(header):
        target = header
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (set_key("format_version", 2), r"format_version 2 is not supported.*newer fastdrmm"),
    (set_key("format_version", 0), r"format_version 0 is not supported"),
    (set_key("format_version", "1"), r"format_version '1' is not an int"),
    (set_key("format", "other"), r"format is 'other'"),
    (set_key("extra_field", 1), r"unknown fields \['extra_field'\]"),
    (lambda h: h.pop("library_version"), r"missing fields \['library_version'\]"),
    (set_key("arrays", "w32", "shape", [3, 2, 5, 4]), r"'w32'.*shape \(3, 2, 5, 5\)"),
    (set_key("arrays", "w32", "dtype", "<f8"), r"'w32'.*dtype <f4.*declares.*<f8"),
    (set_key("arrays", "w32", "dtype", "O"), r"'w32': invalid dtype"),
    (set_key("arrays", "w32", "shape", [-1]), r"'w32': invalid shape"),
    (set_key("arrays", "w32", "sha256", "0" * 64), r"'w32': sha256 mismatch"),
    (set_key("arrays", "w32", "sha256", "xyz"), r"'w32': invalid sha256"),
    (set_key("arrays", "w32", "extra", 1), r"'w32': the entry must hold exactly"),
    (set_key("metadata", [1]), r"metadata is not a JSON object"),
    (set_key("arrays", "ghost", {"shape": [1], "dtype": "<f8", "sha256": "0" * 64}),
     r"\['ghost'\] declared but missing"),
])
def test_header_problems_are_refused(saved, edit, message):
    bad = rewrite(saved, edit_header=edit)
    with pytest.raises(ValueError, match=r"edited\.npz: invalid fastdrmm model file: .*" + message):
        fio.load_arrays(bad)


def test_missing_extra_and_altered_members_are_refused(saved):
    with pytest.raises(ValueError, match=r"\['w64'\] declared but missing"):
        fio.load_arrays(rewrite(saved, drop=["w64.npy"]))
    with pytest.raises(ValueError, match=r"\['junk.bin'\] not declared"):
        fio.load_arrays(rewrite(saved, add={"junk.bin": b"hello"}))
    with pytest.raises(ValueError, match=r"not declared"):
        fio.load_arrays(rewrite(saved, add={"extra.npy": npy_bytes(np.zeros(2))}))
    # same shape and dtype, other values, CRC recomputed: only the sha256 sees it
    with pytest.raises(ValueError, match=r"'i64': sha256 mismatch"):
        fio.load_arrays(rewrite(saved, replace={"i64.npy": npy_bytes(np.zeros((3, 4), np.int64))}))
    with pytest.raises(ValueError, match=r"'i64'.*has \d+ bytes, its header declares"):
        member = npy_bytes(np.arange(-5, 7, dtype=np.int64).reshape(3, 4))
        fio.load_arrays(rewrite(saved, replace={"i64.npy": member + b"\0" * 8}))
    with pytest.raises(ValueError, match=r"'i64'.*has \d+ bytes, its header declares"):
        member = npy_bytes(np.arange(-5, 7, dtype=np.int64).reshape(3, 4))
        fio.load_arrays(rewrite(saved, replace={"i64.npy": member[:-8]}))
    order = ["w32.npy", "metadata.json"]
    with pytest.raises(ValueError, match=r"metadata.json is not the first member"):
        fio.load_arrays(rewrite(saved, order=order + [m for m in zipfile.ZipFile(saved).namelist()
                                                      if m not in order]))
    with pytest.raises(ValueError, match=r"not valid UTF-8 JSON"):
        fio.load_arrays(_bad_json(saved))


def _bad_json(path):
    out = path.with_name("badjson.npz")
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("metadata.json", b"{not json")
    return out


def test_junk_around_the_archive_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    junk = tmp_path / "junk.npz"
    junk.write_bytes(data + b"extra junk")
    with pytest.raises(ValueError, match=r"junk.npz.*data after the end"):
        fio.load_arrays(junk)
    junk.write_bytes(b"junk" + data)
    with pytest.raises(ValueError, match=r"junk.npz.*not a ZIP archive"):
        fio.load_arrays(junk)
    junk.write_bytes(b"plain text, not a model at all\n" * 3)
    with pytest.raises(ValueError, match=r"junk.npz.*not a ZIP archive"):
        fio.load_arrays(junk)
    junk.write_bytes(b"")
    with pytest.raises(ValueError, match=r"junk.npz.*truncated"):
        fio.read_header(junk)
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))  # an npz, but not ours
    with pytest.raises(ValueError, match=r"plain.npz.*metadata.json is not the first member"):
        fio.load_arrays(tmp_path / "plain.npz")


# --------------------------------------------------------------------------------------------
# atomic writes


class Boom(Exception):
    pass


def failing_after(n_calls, real):
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) > n_calls:
            raise Boom("simulated failure mid-write")
        return real(*args, **kwargs)
    return fake


@pytest.mark.parametrize("target, n_ok, exc", [
    ("write_array", 2, Boom),          # after two arrays were written
    ("write_array", 0, KeyboardInterrupt),
    ("fsync", 0, OSError),
    ("replace", 0, OSError),
])
def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, monkeypatch, target, n_ok,
                                                            exc):
    path = tmp_path / "model.npz"
    fio.save_arrays(path, {"old": np.arange(3.0)}, {"v": "old"})
    before = path.read_bytes()
    if target == "write_array":
        real = np.lib.format.write_array
        if exc is KeyboardInterrupt:
            def fake(*args, **kwargs):
                raise KeyboardInterrupt
        else:
            fake = failing_after(n_ok, real)
        monkeypatch.setattr(np.lib.format, "write_array", fake)
    else:
        def fake(*args, **kwargs):
            raise OSError(f"simulated {target} failure")
        monkeypatch.setattr(fio.os, target, fake)
    with pytest.raises(exc):
        fio.save_arrays(path, sample_arrays(), {"v": "new"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    arrays, meta = fio.load_arrays(path)
    assert meta == {"v": "old"} and np.array_equal(arrays["old"], np.arange(3.0))
    no_leftovers(tmp_path, ["model.npz"])


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(np.lib.format, "write_array", failing_after(1, np.lib.format.write_array))
    with pytest.raises(Boom):
        fio.save_arrays(tmp_path / "new.npz", sample_arrays(), {})
    no_leftovers(tmp_path, [])


def test_write_into_missing_directory_fails_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError):
        fio.save_arrays(tmp_path / "no" / "such" / "m.npz", {"a": np.zeros(1)})
    no_leftovers(tmp_path, [])
