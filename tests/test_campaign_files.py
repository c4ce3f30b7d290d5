"""Campaign: saved model files under attack, and saves killed outright.

Mutated files: a small fitted RMM, a small fitted DRMM and a DRMM training checkpoint are
saved once per module; hypothesis then alters them (byte flips, truncations, appended bytes,
members altered and rebuilt with valid CRCs, metadata values changed, arrays replaced by
arrays of the same shape holding NaN/inf/1e300, by other dtypes or other shapes, with their
sha256 recomputed so that only the models' own checks can refuse them). The property:
:func:`fastdrmm.load` raises ValueError or TypeError (no other exception, no hang), or returns
a model whose ``predict_proba`` on a few inputs is finite, in [0, 1], and sums to 1 a row.
Changes below the library's integrity checks (bytes of the file, bytes of an array's data)
must always be refused, or leave the model exactly as saved.

Kill during save: a subprocess saves two contents alternately and is SIGKILLed at random
moments; the destination must load as one of the two every time, temporary files must not
accumulate, and the next save removes the last one.

``FASTDRMM_CAMPAIGN=long`` multiplies the number of cases (see ``campaign.py``).
"""

from __future__ import annotations

import json
import math
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from archive_tools import (npy_array, npy_bytes, npy_data_offset, read_members,
                           rebuild_archive)
from campaign import BASE_SEED, LONG, SCALE, campaign
from hypothesis import Phase, given, note
from hypothesis import strategies as st

import fastdrmm
from fastdrmm import io as fio

REPO = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 60  # a load + predict that takes longer counts as a hang
# the bounded profile does not shrink a failure (the case is printed as found)
PHASES = dict(phases=[Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if LONG
                                                                       else []))


# --------------------------------------------------------------------------------------------
# the models under attack


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"rmm" | "drmm" | "checkpoint": (path, inputs, predict_proba of the saved model)}."""
    return fit_and_save(tmp_path_factory.mktemp("saved"))


def fit_and_save(directory):
    """Fit the small models, save them in ``directory``; see the ``saved`` fixture."""
    X, y = fastdrmm.datasets.load_digits(return_X_y=True)
    keep = y < 3
    X, y = X[keep][:60], y[keep][:60]
    rmm = fastdrmm.RMM(3, random_state=0).fit(X, y)
    rmm.save(directory / "rmm.npz")
    images = np.zeros((len(X), 1, 12, 12), np.float32)
    images[:, :, 2:10, 2:10] = X
    drmm = fastdrmm.DRMM(layers=[fastdrmm.Layer(4, 3, padding=1, pool=2)], n_classes=3,
                         max_iter=1, random_state=0, checkpoint=directory / "checkpoint.npz")
    drmm.fit(images, y)
    drmm.save(directory / "drmm.npz")
    out = {}
    for kind, inputs in (("rmm", X[:4]), ("drmm", images[:4]), ("checkpoint", images[:4])):
        path = directory / f"{kind}.npz"
        out[kind] = (path, inputs, fastdrmm.load(path).predict_proba(inputs))
    out["dir"] = directory
    return out


KINDS = ["rmm", "drmm", "checkpoint"]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"load or predict_proba took more than {CASE_TIMEOUT_S} s")


def load_and_predict(path, inputs, like):
    """("refused", exception) or ("loaded", probabilities); raises on anything else.

    ``inputs`` are used when the loaded model takes inputs of their shape (else inputs of its
    own declared shape, when small, are drawn; ``like`` is the saved model's output)."""
    previous = signal.signal(signal.SIGALRM, _alarm) if hasattr(signal, "SIGALRM") else None
    if previous is not None:
        signal.alarm(CASE_TIMEOUT_S)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                model = fastdrmm.load(path)
            except (ValueError, TypeError) as exc:
                return "refused", exc
            assert isinstance(model, (fastdrmm.RMM, fastdrmm.DRMM)), type(model)
            X = inputs_for(model, inputs)
            if X is None:
                return "loaded", None
            return "loaded", model.predict_proba(X)
    finally:
        if previous is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


def inputs_for(model, inputs):
    shape = tuple(getattr(model, "input_shape_", getattr(model, "feature_shape_", ())))
    if shape == inputs.shape[1:]:
        return inputs
    if not shape or math.prod(shape) > 10_000:
        note(f"the loaded model declares inputs of shape {shape}: not predicted")
        return None
    return np.random.default_rng(0).random((3, *shape)).astype(inputs.dtype)


def assert_valid_probabilities(p):
    assert p.ndim == 2 and p.shape[1] >= 1, p.shape
    assert np.isfinite(p).all(), f"non-finite probabilities {p}"
    assert (p >= 0).all() and (p <= 1).all(), f"probabilities outside [0, 1]: {p}"
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-5)


def check_property(path, inputs, like):
    outcome, value = load_and_predict(path, inputs, like)
    note(f"{outcome}: {value!r:.300}")
    if outcome == "loaded" and value is not None:
        assert_valid_probabilities(value)
    return outcome, value


# --------------------------------------------------------------------------------------------
# below the integrity checks: always refused, or the model exactly as saved


MUTATIONS = st.sampled_from(["flip", "truncate", "append"])


@pytest.mark.parametrize("kind", KINDS)
@campaign(40, **PHASES)
@given(data=st.data())
def test_campaign_file_bytes_are_refused_or_harmless(saved, kind, data):
    path, inputs, like = saved[kind]
    original = path.read_bytes()
    how = data.draw(MUTATIONS, label="mutation")
    if how == "flip":
        offset = data.draw(st.integers(0, len(original) - 1), label="offset")
        xor = data.draw(st.integers(1, 255), label="xor")
        mutated = bytearray(original)
        mutated[offset] ^= xor
    elif how == "truncate":
        mutated = original[:data.draw(st.integers(0, len(original) - 1), label="length")]
    else:
        mutated = original + data.draw(st.binary(min_size=1, max_size=64), label="appended")
    case = saved["dir"] / f"case-{kind}.npz"
    case.write_bytes(bytes(mutated))
    outcome, p = check_property(case, inputs, like)
    if outcome == "refused":
        assert isinstance(p, ValueError) and str(case) in str(p), p
    else:  # a flip nobody reads (a ZIP timestamp): the very model that was saved
        np.testing.assert_array_equal(p, like)


@pytest.mark.parametrize("kind", KINDS)
@campaign(40, **PHASES)
@given(data=st.data())
def test_campaign_member_bytes_are_refused_or_harmless(saved, kind, data):
    """A member's byte altered, the archive rebuilt with valid CRCs: the data of an array is
    refused by its sha256; a changed metadata.json is refused, or loads a valid model."""
    path, inputs, like = saved[kind]
    members = read_members(path)
    member = data.draw(st.sampled_from(sorted(members)), label="member")
    content = members[member]
    offset = data.draw(st.integers(0, len(content) - 1), label="offset")
    xor = data.draw(st.integers(1, 255), label="xor")
    altered = bytearray(content)
    altered[offset] ^= xor
    case = rebuild_archive(path, saved["dir"] / f"case-{kind}.npz",
                           replace={member: bytes(altered)})
    outcome, p = check_property(case, inputs, like)
    if member.endswith(".npy") and offset >= npy_data_offset(content):
        assert outcome == "refused" and "sha256 mismatch" in str(p), p


# --------------------------------------------------------------------------------------------
# consistent-but-corrupt files: the models' own checks


ODD_VALUES = st.sampled_from([
    None, True, False, 0, -1, 1, 2 ** 31, 10 ** 30, -10 ** 30, 0.0, -0.0, 0.5, 1e-300, 1e300,
    -1e300, math.nan, math.inf, -math.inf, "", "x", "auto", [], [0], [1, 2, 3], [-1, 5],
    [math.nan], {}, {"a": 1}])


def metadata_paths(node, prefix=()):
    """Every (key path) in the caller's metadata, parents before children."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from metadata_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from metadata_paths(value, prefix + (i,))


def edit_metadata(path_keys, action, value):
    def edit(header):
        target = header["metadata"]
        for key in path_keys[:-1]:
            target = target[key]
        last = path_keys[-1]
        if action == "delete":
            del target[last]
        else:
            target[last] = value
    return edit


@pytest.mark.parametrize("kind", KINDS)
@campaign(60, **PHASES)
@given(data=st.data())
def test_campaign_metadata_values(saved, kind, data):
    """metadata.json's values changed (types, NaN, huge numbers, missing keys; the arrays and
    their sha256 untouched): refused with ValueError/TypeError, or a valid model."""
    path, inputs, like = saved[kind]
    header = json.loads(read_members(path)["metadata.json"])
    paths = list(metadata_paths(header["metadata"]))
    extra = [p for p in [("checkpoint",), ("user",), ("fitted", "extra"), ("params", "extra")]
             if p not in paths and (len(p) == 1 or p[:-1] in paths)]
    key_path = data.draw(st.sampled_from(paths + extra), label="key path")
    action = data.draw(st.sampled_from(["set", "set", "delete"]), label="action")
    if action == "delete" and key_path not in paths:
        action = "set"
    value = data.draw(ODD_VALUES, label="value") if action == "set" else None
    case = rebuild_archive(path, saved["dir"] / f"case-{kind}.npz",
                           edit_header=edit_metadata(key_path, action, value))
    check_property(case, inputs, like)


def odd_array(arr, how, fill, rng):
    """A replacement for ``arr``: same shape and dtype holding ``fill`` at some places, or
    another dtype, or another shape."""
    if how == "values":
        mask = rng.random(arr.shape) < 0.5
        mask.flat[0] = True
        if arr.dtype.kind == "f":
            out = arr.astype(np.float64)
            out[mask] = fill
            too_big = np.isfinite(fill) and abs(fill) > float(np.finfo(arr.dtype).max)
            return out if too_big else out.astype(arr.dtype)  # 1e300 stays float64
        out = arr.copy()
        info = np.iinfo(arr.dtype) if arr.dtype.kind in "iu" else None
        if info is not None:
            out[mask] = (-1 if math.isnan(fill) or info.min == 0 and fill < 0 else
                         info.max if fill > info.max else info.min if fill < info.min
                         else int(fill))
        return out
    if how == "dtype":
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return arr.astype(fill)
    # how == "shape"
    if fill == "drop" and arr.ndim:
        return arr[:-1] if len(arr) > 1 else arr[:0]
    if fill == "extra":
        return arr[..., None]
    return np.concatenate([arr.reshape(-1), arr.reshape(-1)[:1]]) if arr.size else \
        np.zeros(1, arr.dtype)


ARRAY_EDITS = st.one_of(
    st.tuples(st.just("values"), st.sampled_from([math.nan, math.inf, -math.inf, 1e300,
                                                  -1e300, 0.0, -1.0, 1e-45, 3e38])),
    st.tuples(st.just("dtype"), st.sampled_from(["<f2", "<f4", "<f8", ">f8", "<i8", "<u1",
                                                 "|b1", "<c16", "<U3"])),
    st.tuples(st.just("shape"), st.sampled_from(["drop", "extra", "flat"])))


@pytest.mark.parametrize("kind", KINDS)
@campaign(60, **PHASES)
@given(data=st.data())
def test_campaign_array_values(saved, kind, data):
    """An array replaced (same shape with NaN/inf/1e300..., another dtype, another shape),
    its declared shape, dtype and sha256 recomputed: refused, or a valid model."""
    path, inputs, like = saved[kind]
    members = read_members(path)
    arrays = sorted(m for m in members if m.endswith(".npy"))
    member = data.draw(st.sampled_from(arrays), label="array")
    how, fill = data.draw(ARRAY_EDITS, label="edit")
    seed = data.draw(st.integers(0, 2 ** 32 - 1), label="seed")
    replacement = odd_array(npy_array(members[member]), how, fill, np.random.default_rng(seed))
    note(f"{member} -> {replacement.dtype} {replacement.shape}: {replacement.ravel()[:6]}")
    case = rebuild_archive(path, saved["dir"] / f"case-{kind}.npz",
                           replace={member: npy_bytes(replacement)}, rehash=True)
    check_property(case, inputs, like)


# --------------------------------------------------------------------------------------------
# SIGKILL during save


CHILD = r"""
import sys, types
package = types.ModuleType("fastdrmm")  # fastdrmm.io alone: no kernels to import
package.__path__ = [sys.argv[1] + "/fastdrmm"]
package.__version__ = "0"
sys.modules["fastdrmm"] = package
import numpy as np
import fastdrmm.io as fio
target = sys.argv[2]
contents = [({"w": np.full(1 << 19, float(v))}, {"version": v}) for v in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    fio.save_arrays(target, *contents[i % 2])
    i += 1
"""


def temp_files_of(path):
    pattern = re.compile(rf"\.{re.escape(path.name)}\..*\.tmp\Z")
    return sorted(p.name for p in path.parent.iterdir() if pattern.match(p.name))


def assert_old_or_new(path):
    arrays, meta = fio.load_arrays(path)
    assert meta["version"] in (1, 2), meta
    assert list(arrays) == ["w"] and (arrays["w"] == meta["version"]).all()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_campaign_kill_during_save(tmp_path):
    """A writer SIGKILLed at random moments of its saves: the destination always loads as the
    old or the new content, at most one temp file (the last killed writer's) is ever left,
    and the next save removes it."""
    path = tmp_path / "model.npz"
    fio.save_arrays(path, {"w": np.full(1 << 19, 1.0)}, {"version": 1})
    rng = random.Random(BASE_SEED)
    n_kills, left_behind = 8 * SCALE, 0
    for _ in range(n_kills):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(path)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        assert_old_or_new(path)
        temps = temp_files_of(path)
        assert len(temps) <= 1, f"temp files accumulate: {temps}"
        left_behind += len(temps)
    fio.save_arrays(path, {"w": np.full(1 << 19, 2.0)}, {"version": 2})
    assert temp_files_of(path) == []
    assert_old_or_new(path)
    print(f"{n_kills} kills during save, {left_behind} left a temp file behind")
