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
from archive_tools import (alter_member, deflate_zeros, npy_bytes, npy_data_offset,
                           peak_memory_of, raw_zip, read_members, rebuild_archive,
                           write_archive)
from fastdrmm import _atomic
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


# --------------------------------------------------------------------------------------------
# what is not a regular file


def load_in_thread(load, path, timeout=20.0):
    """Run ``load(path)`` in a thread; (returned value or exception, whether it blocked)."""
    import threading
    result = []

    def run():
        try:
            result.append(load(path))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return (result[0] if result else None), thread.is_alive()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize("load", [fio.load_arrays, fio.read_header, fastdrmm.load])
def test_a_fifo_is_refused_without_blocking(tmp_path, load):
    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)
    outcome, blocked = load_in_thread(load, fifo)
    if blocked:  # unblock the reader (a writer appears, then leaves) before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not blocked, "loading a FIFO blocked"
    assert isinstance(outcome, ValueError), outcome
    assert re.search(r"model\.npz: not a regular file \(a FIFO\)", str(outcome))


@pytest.mark.parametrize("load", [fio.load_arrays, fastdrmm.load])
def test_directories_and_devices_are_refused(tmp_path, load):
    with pytest.raises(ValueError, match=r"not a regular file \(a directory\)"):
        load(tmp_path)
    if os.path.exists("/dev/zero"):
        with pytest.raises(ValueError, match=r"/dev/zero: not a regular file \(a character "):
            load("/dev/zero")


def test_a_symlink_to_a_model_file_loads(saved, tmp_path):
    link = tmp_path / "link.npz"
    link.symlink_to(saved)
    assert_identical(sample_arrays(), fio.load_arrays(link)[0])


# --------------------------------------------------------------------------------------------
# many members


def test_too_many_arrays_are_refused_on_save_and_on_load(tmp_path, monkeypatch):
    assert 1000 <= fio.MAX_ARRAYS <= 100_000
    monkeypatch.setattr(fio, "MAX_ARRAYS", 20)
    path = tmp_path / "m.npz"
    arrays = {f"a{i}": np.full(2, i) for i in range(20)}
    fio.save_arrays(path, arrays)
    assert len(fio.load_arrays(path)[0]) == 20
    with pytest.raises(ValueError, match=r"21 arrays; a file holds at most 20"):
        fio.save_arrays(path, dict(arrays, a20=np.zeros(1)))
    assert len(fio.load_arrays(path)[0]) == 20  # the refused save changed nothing
    # 21 arrays (22 members) written by someone else: refused from the archive's directory
    members = read_members(path)
    members["a20.npy"] = npy_bytes(np.zeros(1))
    over = write_archive(tmp_path / "over.npz", members)
    with pytest.raises(ValueError, match=r"over\.npz: .*holds 22 members; .*at most 20 arrays"):
        fio.read_header(over)
    # a header declaring more arrays than allowed, the members within the cap
    declared = rebuild_archive(path, edit_header=lambda h: h["arrays"].update(
        {f"x{i}": h["arrays"]["a0"] for i in range(5)}))
    with pytest.raises(ValueError, match=r"25 arrays declared; .*at most 20"):
        fio.read_header(declared)


def test_the_default_cap_refuses_a_file_of_many_empty_members(tmp_path):
    """10,001 declared arrays: refused from the archive's end record, before zipfile parses
    its directory or the metadata is read."""
    entries = [{"name": "metadata.json", "data": b"{}"}]
    entries += [{"name": f"a{i}.npy", "data": b""} for i in range(fio.MAX_ARRAYS + 1)]
    path = tmp_path / "many.npz"
    path.write_bytes(raw_zip(entries))
    with pytest.raises(ValueError, match=rf"holds {fio.MAX_ARRAYS + 2} members"):
        fio.read_header(path)


class CountingList(list):
    """A list that counts membership tests and full scans (a quadratic check's signature)."""
    scans = 0

    def __contains__(self, item):
        CountingList.scans += 1
        return super().__contains__(item)

    def index(self, *args):
        CountingList.scans += 1
        return super().index(*args)

    def count(self, item):
        CountingList.scans += 1
        return super().count(item)


def test_matching_members_to_arrays_scans_no_list(tmp_path, monkeypatch):
    """The members are matched to the declared arrays by hashing: no membership test on a
    list (one per member made the check quadratic in the number of arrays)."""
    path = tmp_path / "m.npz"
    fio.save_arrays(path, {f"a{i}": np.zeros(1) for i in range(300)})
    real_namelist, real_infolist = zipfile.ZipFile.namelist, zipfile.ZipFile.infolist
    monkeypatch.setattr(zipfile.ZipFile, "namelist", lambda zf: CountingList(real_namelist(zf)))
    monkeypatch.setattr(zipfile.ZipFile, "infolist", lambda zf: CountingList(real_infolist(zf)))
    CountingList.scans = 0
    assert len(fio.read_header(path)["arrays"]) == 300
    assert len(fio.load_arrays(path)[0]) == 300
    assert CountingList.scans == 0


# --------------------------------------------------------------------------------------------
# zip bombs: refused before inflating, in bounded memory


BOMB_BYTES = 256 << 20  # what the bomb members inflate to
PEAK_LIMIT = 16 << 20   # what a refusal may cost


def bomb_archive(path, member, prefix, n_zeros, declared=None, crc_of=None, header=None):
    """A fastdrmm file whose ``member`` is ``prefix`` + ``n_zeros`` zero bytes, deflated,
    declaring ``declared`` uncompressed bytes (default: the truth) and a CRC (default: of the
    whole content). ``header``: the metadata.json document (default: one array ``w``, 4
    float64)."""
    import hashlib
    import zlib
    if header is None:
        header = {"format": "fastdrmm", "format_version": 1, "library_version": "0",
                  "metadata": {}, "arrays": {"w": {
                      "shape": [4], "dtype": "<f8",
                      "sha256": hashlib.sha256(bytes(32)).hexdigest()}}}
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros, crc = deflate_zeros(n_zeros)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = head + zeros  # a raw deflate stream may continue after a full flush
    crc = zlib.crc32(bytes(n_zeros), zlib.crc32(prefix)) if crc_of is None else crc_of
    entries = []
    meta_bytes = json.dumps(header).encode()
    if member != "metadata.json":
        entries.append({"name": "metadata.json", "data": meta_bytes})
    entries.append({"name": member, "data": stream, "method": 8, "crc": crc,
                    "file_size": len(prefix) + n_zeros if declared is None else declared})
    path.write_bytes(raw_zip(entries))
    return path


def test_bomb_helper_builds_a_valid_member(tmp_path):
    """The crafted deflate stream inflates to what it claims (a check of the test's tool)."""
    prefix = npy_bytes(np.zeros(4))
    path = bomb_archive(tmp_path / "ok.npz", "w.npy", prefix, 1000)
    with zipfile.ZipFile(path) as zf:
        assert zf.read("w.npy") == prefix + bytes(1000)


@pytest.mark.parametrize("lie", [False, True])
def test_an_array_member_that_inflates_hugely_is_refused_in_bounded_memory(tmp_path, lie):
    """A .npy member declaring a 4-value array followed by 256 MiB of zeros: with its true
    size declared it is refused before inflating; declaring the 4 values only (and the CRC of
    the whole) it is read up to the declared size and refused by its CRC."""
    header_npy = npy_bytes(np.zeros(4))
    path = bomb_archive(tmp_path / "bomb.npz", "w.npy", header_npy, BOMB_BYTES,
                        declared=len(header_npy) if lie else None)
    raised, peak = peak_memory_of(lambda: fio.load_arrays(path))
    assert isinstance(raised, ValueError) and "bomb.npz" in str(raised), raised
    if not lie:
        assert re.search(r"'w': the \.npy member has \d+ bytes, its header declares", str(raised))
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("lie", [False, True])
def test_a_metadata_json_padded_past_the_cap_is_refused_in_bounded_memory(tmp_path, lie):
    doc = json.dumps({"format": "fastdrmm", "format_version": 1, "library_version": "0",
                      "metadata": {}, "arrays": {}}).encode()
    path = tmp_path / "padded.npz"
    bomb_archive(path, "metadata.json", doc + b" " * 0, BOMB_BYTES,
                 declared=len(doc) if lie else None)
    raised, peak = peak_memory_of(lambda: fio.read_header(path))
    assert isinstance(raised, ValueError) and "padded.npz" in str(raised), raised
    if not lie:
        assert re.search(r"metadata\.json: the archive declares 26\d+ uncompressed bytes, more "
                         rf"than the {fio.MAX_METADATA_BYTES} allowed", str(raised))
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.0f} MiB"


def test_a_metadata_json_just_within_the_cap_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(fio, "MAX_METADATA_BYTES", 4096)
    path = tmp_path / "m.npz"
    fio.save_arrays(path, {"a": np.zeros(2)}, {"pad": "x" * 3000})
    assert fio.load_arrays(path)[1] == {"pad": "x" * 3000}
    with pytest.raises(ValueError, match=r"take \d+ bytes as JSON; a file holds at most 4096"):
        fio.save_arrays(path, {"a": np.zeros(2)}, {"pad": "x" * 5000})
    assert fio.load_arrays(path)[1] == {"pad": "x" * 3000}  # the refused save changed nothing
    monkeypatch.setattr(fio, "MAX_METADATA_BYTES", 8 << 20)
    fio.save_arrays(path, {"a": np.zeros(2)}, {"pad": "x" * 5000})
    monkeypatch.setattr(fio, "MAX_METADATA_BYTES", 4096)
    with pytest.raises(ValueError, match=r"metadata\.json: the archive declares \d+ "
                                         r"uncompressed bytes, more than the 4096 allowed"):
        fio.load_arrays(path)


def test_sizes_the_compression_cannot_hold_are_refused(tmp_path):
    """A stored member declaring more bytes than it stores, a deflated one more than 1032
    times its compressed size: refused before anything is allocated."""
    meta = json.dumps({"format": "fastdrmm", "format_version": 1, "library_version": "0",
                       "metadata": {}, "arrays": {}}).encode()
    path = tmp_path / "lying.npz"
    path.write_bytes(raw_zip([{"name": "metadata.json", "data": meta,
                               "file_size": len(meta) + 1}]))
    with pytest.raises(ValueError, match=r"more than the compression can hold"):
        fio.read_header(path)
    n = 3 << 30  # a 3 GiB array from a few compressed bytes
    big = dict(json.loads(meta), arrays={"w": {"shape": [n], "dtype": "|u1",
                                               "sha256": "0" * 64}})
    import io
    prefix = io.BytesIO()
    np.lib.format.write_array_header_1_0(prefix, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (n,)})
    prefix = prefix.getvalue()
    bomb_archive(path, "w.npy", prefix, 10, declared=len(prefix) + n, header=big)
    raised, peak = peak_memory_of(lambda: fio.load_arrays(path))
    assert isinstance(raised, ValueError) and "compression can hold" in str(raised), raised
    assert peak < PEAK_LIMIT


def test_deep_or_huge_json_is_a_value_error(tmp_path):
    for name, doc in [("deep.npz", b"[" * 200_000 + b"]" * 200_000),
                      ("bigint.npz", b'{"format": ' + b"9" * 5000 + b"}")]:
        path = write_archive(tmp_path / name, {"metadata.json": doc})
        with pytest.raises(ValueError, match=re.escape(name) + r".*metadata\.json"):
            fio.read_header(path)


# --------------------------------------------------------------------------------------------
# saving over files: mode, symbolic links, stale temp files


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_saving_over_a_file_keeps_its_mode(tmp_path, mode):
    path = tmp_path / "m.npz"
    fio.save_arrays(path, {"a": np.zeros(1)})
    os.chmod(path, mode)
    fio.save_arrays(path, {"a": np.ones(1)})
    assert path.stat().st_mode & 0o777 == mode
    assert fio.load_arrays(path)[0]["a"][0] == 1
    no_leftovers(tmp_path, ["m.npz"])


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX symbolic links")
def test_saving_to_a_symlink_writes_its_target(tmp_path):
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    target = real_dir / "m.npz"
    fio.save_arrays(target, {"a": np.zeros(1)})
    os.chmod(target, 0o600)
    link = link_dir / "m.npz"
    link.symlink_to(os.path.relpath(target, link_dir))
    fio.save_arrays(link, {"a": np.ones(1)})
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert fio.load_arrays(target)[0]["a"][0] == 1
    assert target.stat().st_mode & 0o777 == 0o600
    no_leftovers(real_dir, ["m.npz"])
    no_leftovers(link_dir, ["m.npz"])
    dangling = link_dir / "new.npz"  # a link to a file not yet there: the file is created
    dangling.symlink_to(real_dir / "new.npz")
    fio.save_arrays(dangling, {"b": np.zeros(2)})
    assert dangling.is_symlink() and list(fio.load_arrays(real_dir / "new.npz")[0]) == ["b"]


def test_saving_over_a_directory_or_into_a_missing_one_names_the_destination(tmp_path):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError, match=r"d\.npz"):
        fio.save_arrays(tmp_path / "d.npz", {"a": np.zeros(1)})
    with pytest.raises(FileNotFoundError, match=r"cannot write .*m\.npz: its directory"):
        fio.save_arrays(tmp_path / "missing" / "m.npz", {"a": np.zeros(1)})
    no_leftovers(tmp_path, ["d.npz"])
    assert list((tmp_path / "d.npz").iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_saving_over_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "f.npz")
    with pytest.raises(ValueError, match=r"f\.npz: cannot write a file there: .*a FIFO"):
        fio.save_arrays(tmp_path / "f.npz", {"a": np.zeros(1)})


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(os.name != "posix", reason="pids probed with os.kill(pid, 0)")
def test_stale_temp_files_of_the_destination_are_removed_on_the_next_save(tmp_path):
    path = tmp_path / "m.npz"
    tag = _atomic._host_tag()
    other = "0" * 6 if tag != "0" * 6 else "1" * 6
    hour_ago = __import__("time").time() - 2 * 3600

    def temp(name, old=False, kind="file"):
        p = tmp_path / name
        if kind == "dir":
            p.mkdir()
        elif kind == "link":
            p.symlink_to(tmp_path / "elsewhere")
        else:
            p.write_bytes(b"partial")
        if old:
            os.utime(p, (hour_ago, hour_ago), follow_symlinks=False)
        return name

    gone = dead_pid()
    removed = [temp(f".m.npz.{tag}-{gone}.0123456789ab.tmp"),                 # writer gone
               temp(f".m.npz.{other}-{gone}.0123456789ab.tmp", old=True),     # old, elsewhere
               temp(f".m.npz.{tag}-{os.getpid()}.0123456789ab.tmp", old=True),  # old
               temp(".m.npz.abcd_123.tmp", old=True)]                         # older name
    kept = [temp(f".m.npz.{tag}-{os.getpid()}.aaaaaaaaaaaa.tmp"),  # a live writer's
            temp(f".m.npz.{other}-{gone}.bbbbbbbbbbbb.tmp"),       # another host's, recent
            temp(".m.npz.abcd_123x.tmp", old=True),                # not our pattern
            temp(".m.npz.abcd_124.tmp"),                           # older name, recent
            temp(f".n.npz.{tag}-{gone}.0123456789ab.tmp"),         # another destination's
            temp(f".m.npz.{tag}-{gone}.0123456789ab.part"),        # another suffix
            temp(f".m.npz.{tag}-{gone}.cccccccccccc.tmp", kind="dir"),
            temp(f".m.npz.{tag}-{gone}.dddddddddddd.tmp", kind="link", old=True)]
    fio.save_arrays(path, {"a": np.zeros(1)})
    no_leftovers(tmp_path, ["m.npz"] + kept)
    assert not any((tmp_path / name).exists() for name in removed)


def test_temp_files_are_named_with_host_and_pid(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_replace(src, dst)
    monkeypatch.setattr(fio.os, "replace", spy)
    fio.save_arrays(tmp_path / "m.npz", {"a": np.zeros(1)})
    assert re.fullmatch(rf"\.m\.npz\.{_atomic._host_tag()}-{os.getpid()}\.[0-9a-f]{{12}}\.tmp",
                        seen[0])


# --------------------------------------------------------------------------------------------
# fastdrmm.load: a well-formed file whose contents make no model


@pytest.mark.parametrize("checkpoint", [[], "x", None, 3, {"epoch": 1}])
def test_load_refuses_contents_that_make_no_model_with_a_value_error(tmp_path, checkpoint):
    path = tmp_path / "ckpt.npz"
    fio.save_arrays(path, {"W0": np.zeros(1)}, {"model_class": "DRMM", "checkpoint": checkpoint})
    with pytest.raises(ValueError, match=r"ckpt\.npz: "):
        fastdrmm.load(path)


@pytest.mark.parametrize("error", [KeyError("params"), IndexError("list index out of range"),
                                   AttributeError("'list' object has no attribute 'get'"),
                                   OverflowError("cannot convert float infinity to integer")])
def test_load_names_the_file_for_any_error_of_its_contents(tmp_path, monkeypatch, error):
    def broken(cls, arrays, meta, path):
        raise error
    monkeypatch.setattr(fastdrmm.RMM, "_from_saved", classmethod(broken))
    path = tmp_path / "m.npz"
    fio.save_arrays(path, {}, {"model_class": "RMM"})
    with pytest.raises(ValueError, match=rf"m\.npz: not a valid fastdrmm model file: its "
                                         rf"contents do not make a model \({type(error).__name__}"):
        fastdrmm.load(path)
