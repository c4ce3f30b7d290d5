"""fastdrmm.datasets: MNIST IDX loading (lookup, checks, download from a local URL) and digits.

Most tests run on small synthetic IDX files whose sha256 replaces the canonical one; the tests
on the real files use ../shared/data/mnist (from the repository root) and skip without it.
"""

import functools
import gzip
import hashlib
import http.server
import os
import re
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from archive_tools import peak_memory_of
from campaign import MNIST_DIR, requires_mnist

from fastdrmm import datasets

SHARED_MNIST = MNIST_DIR
NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte"]
TEST_NAMES = NAMES[2:]
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_images(pixels):
    n, rows, cols = pixels.shape
    return struct.pack(">iiii", 2051, n, rows, cols) + pixels.astype(np.uint8).tobytes()


def idx_labels(labels):
    return struct.pack(">ii", 2049, len(labels)) + np.asarray(labels, np.uint8).tobytes()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No test sees the user's data, cache or mirror settings."""
    monkeypatch.delenv("FASTDRMM_DATA", raising=False)
    monkeypatch.delenv("FASTDRMM_MNIST_MIRROR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def fake(monkeypatch):
    """Synthetic MNIST contents (train 12, test 7 images of 28x28) with their sha256 made the
    canonical ones; ``write(directory, gz=True, names=NAMES)`` writes them."""
    rng = np.random.default_rng(0)
    pixels = {"train": rng.integers(0, 256, (12, 28, 28)),
              "test": rng.integers(0, 256, (7, 28, 28))}
    pixels["train"][0, 0, :2] = [0, 255]
    labels = {"train": np.arange(12) % 10, "test": np.array([3, 1, 4, 1, 5, 9, 2])}
    contents = {
        NAMES[0]: idx_images(pixels["train"]), NAMES[1]: idx_labels(labels["train"]),
        NAMES[2]: idx_images(pixels["test"]), NAMES[3]: idx_labels(labels["test"]),
    }
    for name, data in contents.items():
        monkeypatch.setitem(datasets.MNIST_SHA256, name, hashlib.sha256(data).hexdigest())

    class Fake:
        pass

    fake = Fake()
    fake.pixels, fake.labels, fake.contents = pixels, labels, contents

    def write(directory, gz=True, names=NAMES):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            if gz:
                (directory / (name + ".gz")).write_bytes(gzip.compress(contents[name], 1))
            else:
                (directory / name).write_bytes(contents[name])
        return directory

    fake.write = write
    return fake


def check_fake(fake, X, y, split, dtype=np.float32):
    n = len(fake.labels[split])
    assert X.shape == (n, 1, 28, 28) and X.dtype == dtype and X.flags.c_contiguous
    assert y.shape == (n,) and y.dtype == np.int64
    np.testing.assert_array_equal(X[:, 0], fake.pixels[split].astype(dtype) / dtype(255))
    np.testing.assert_array_equal(y, fake.labels[split])
    assert X.min() >= 0 and X.max() <= 1


# --------------------------------------------------------------------------------------------
# reading and returning


def test_load_both_splits_from_gz_and_raw(fake, tmp_path):
    for gz in (True, False):
        directory = fake.write(tmp_path / ("gz" if gz else "raw"), gz=gz)
        data = datasets.load_mnist(directory)
        assert set(data) == {"X_train", "y_train", "X_test", "y_test", "data_dir", "DESCR"}
        assert data.data_dir == directory and "CC BY-SA" in data.DESCR
        check_fake(fake, data.X_train, data.y_train, "train")
        check_fake(fake, data.X_test, data.y_test, "test")
        assert data.X_train[0, 0, 0, 0] == 0 and data.X_train[0, 0, 0, 1] == 1
        X_train, y_train, X_test, y_test = datasets.load_mnist(str(directory), return_X_y=True)
        check_fake(fake, X_test, y_test, "test")


def test_subsets_dtype_and_mixed_files(fake, tmp_path):
    directory = fake.write(tmp_path / "d", gz=True, names=TEST_NAMES)  # the test split only
    test = datasets.load_mnist(directory, subset="test")
    assert test.subset == "test" and set(test) == {"data", "target", "subset", "data_dir", "DESCR"}
    check_fake(fake, test.data, test.target, "test")
    X, y = datasets.load_mnist(directory, subset="test", return_X_y=True, dtype=np.float64)
    check_fake(fake, X, y, "test", dtype=np.float64)
    with pytest.raises(FileNotFoundError):
        datasets.load_mnist(directory, subset="train")
    fake.write(directory, gz=False, names=NAMES[:2])  # raw train beside gz test
    check_fake(fake, *datasets.load_mnist(directory, subset="train", return_X_y=True), "train")


def test_raw_file_wins_over_gz(fake, tmp_path):
    directory = fake.write(tmp_path / "d", gz=True, names=TEST_NAMES)
    (directory / TEST_NAMES[1]).write_bytes(b"broken")  # a raw copy beside the good .gz
    with pytest.raises(ValueError, match=TEST_NAMES[1]):
        datasets.load_mnist(directory, subset="test")


def test_bad_arguments(fake, tmp_path):
    directory = fake.write(tmp_path / "d")
    with pytest.raises(ValueError, match="subset"):
        datasets.load_mnist(directory, subset="all")
    with pytest.raises(TypeError, match="dtype"):
        datasets.load_mnist(directory, dtype=np.int32)
    with pytest.raises(ValueError, match="mirror"):
        datasets.load_mnist(tmp_path / "empty", download=True, mirror=[])


# --------------------------------------------------------------------------------------------
# refusing bad files


def corrupt(fake, tmp_path, name, data, gz=False):
    directory = fake.write(tmp_path / "d", gz=True, names=TEST_NAMES)
    (directory / (name + ".gz")).unlink()
    target = directory / (name + ".gz" if gz else name)
    target.write_bytes(gzip.compress(data) if gz else data)
    return directory, target


@pytest.mark.parametrize("name, edit, message", [
    (TEST_NAMES[0], lambda d: d[:-100], r"truncated IDX file: the header declares dimensions "
                                        r"\(7, 28, 28\)"),
    (TEST_NAMES[0], lambda d: d[:10], r"truncated IDX file: 10 bytes, shorter than the 16-byte"),
    (TEST_NAMES[1], lambda d: d[:-1], r"truncated IDX file"),
    (TEST_NAMES[1], lambda d: b"", r"truncated IDX file: 0 bytes"),
    (TEST_NAMES[0], lambda d: d + b"\0\0", r"2 unexpected trailing bytes"),
    (TEST_NAMES[0], lambda d: struct.pack(">i", 2049) + d[4:], r"magic number 2049, expected 2051"),
    (TEST_NAMES[1], lambda d: struct.pack(">i", 2051) + d[4:], r"magic number 2051, expected 2049"),
    (TEST_NAMES[1], lambda d: d[:-1] + b"\x0a", r"label 10 outside 0-9"),
    (TEST_NAMES[1], lambda d: idx_labels([3, 1, 4, 1, 5, 9]), r"holds 7 images but .* holds 6"),
    (TEST_NAMES[1], lambda d: d[:-1] + b"\x08", r"sha256 .* expected the canonical"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_bad_files_are_refused_naming_the_file(fake, tmp_path, name, edit, message, gz):
    data = edit(fake.contents[name])
    directory, target = corrupt(fake, tmp_path, name, data, gz=gz)
    with pytest.raises(ValueError, match=message) as info:
        datasets.load_mnist(directory, subset="test")
    assert str(target) in str(info.value)


def test_verify_false_reads_non_canonical_files(fake, tmp_path):
    labels = idx_labels([0, 0, 0, 0, 0, 0, 0])
    directory, _ = corrupt(fake, tmp_path, TEST_NAMES[1], labels)
    with pytest.raises(ValueError, match="sha256"):
        datasets.load_mnist(directory, subset="test")
    X, y = datasets.load_mnist(directory, subset="test", verify=False, return_X_y=True)
    assert X.shape == (7, 1, 28, 28) and not y.any()
    # structure is still checked without verify
    (directory / TEST_NAMES[1]).write_bytes(labels[:-1])
    with pytest.raises(ValueError, match="truncated"):
        datasets.load_mnist(directory, subset="test", verify=False)


def test_broken_gzip_is_refused(fake, tmp_path):
    directory = fake.write(tmp_path / "d", gz=True, names=TEST_NAMES)
    path = directory / (TEST_NAMES[0] + ".gz")
    whole = path.read_bytes()
    for data in (whole[: len(whole) // 2], b"not gzip at all", whole[:-4] + b"\0\0\0\0"):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"{path}: corrupt or truncated gzip"):
            datasets.load_mnist(directory, subset="test")


# --------------------------------------------------------------------------------------------
# where the files are looked for


def test_lookup_order_and_missing_message(fake, tmp_path, monkeypatch):
    home = tmp_path / "home"
    cache = home / ".cache" / "fastdrmm" / "mnist"
    assert datasets.mnist_data_dir() == cache
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_mnist()
    message = str(info.value)
    assert str(cache) in message and "user cache" in message and "download=True" in message
    assert all(name in message for name in NAMES) and "FASTDRMM_DATA" in message

    fake.write(cache)  # the cache
    check_fake(fake, *datasets.load_mnist(subset="test", return_X_y=True), "test")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.mnist_data_dir() == tmp_path / "xdg" / "fastdrmm" / "mnist"
    with pytest.raises(FileNotFoundError, match="xdg"):
        datasets.load_mnist()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert datasets.mnist_data_dir() == cache

    monkeypatch.setenv("FASTDRMM_DATA", str(tmp_path / "root"))
    assert datasets.mnist_data_dir() == tmp_path / "root" / "mnist"
    with pytest.raises(FileNotFoundError, match=r"\$FASTDRMM_DATA="):
        datasets.load_mnist()
    fake.write(tmp_path / "root" / "mnist", gz=False)
    assert datasets.load_mnist(subset="test").data_dir == tmp_path / "root" / "mnist"

    # data_dir beats the environment
    other = fake.write(tmp_path / "other", names=TEST_NAMES)
    assert datasets.mnist_data_dir(other) == other
    assert datasets.load_mnist(other, subset="test").data_dir == other
    with pytest.raises(FileNotFoundError, match="the data_dir argument"):
        datasets.load_mnist(other)


# --------------------------------------------------------------------------------------------
# downloading (local URLs only)


@pytest.fixture
def mirror_dir(fake, tmp_path):
    return fake.write(tmp_path / "mirror", gz=True)


def assert_clean(directory, names):
    assert sorted(p.name for p in Path(directory).iterdir()) == sorted(n + ".gz" for n in names)


def test_download_from_file_url_into_the_cache(fake, tmp_path, mirror_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = tmp_path / "xdg" / "fastdrmm" / "mnist"
    data = datasets.load_mnist(download=True, mirror=mirror_dir.as_uri())
    assert data.data_dir == cache
    check_fake(fake, data.X_train, data.y_train, "train")
    check_fake(fake, data.X_test, data.y_test, "test")
    assert_clean(cache, NAMES)
    for name in NAMES:
        assert (cache / (name + ".gz")).read_bytes() == (mirror_dir / (name + ".gz")).read_bytes()
    # present files are used as they are: no mirror is asked again
    datasets.load_mnist(download=True, mirror="file:///nonexistent/mirror")


def test_download_only_what_is_missing(fake, tmp_path, mirror_dir):
    target = fake.write(tmp_path / "target", gz=False, names=NAMES[:1])
    datasets.load_mnist(target, download=True, subset="test", mirror=str(mirror_dir))  # a path
    datasets.load_mnist(target, download=True, subset="train", mirror=mirror_dir.as_uri() + "/")
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [NAMES[0]] + [n + ".gz" for n in NAMES[1:]])


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_mirror(mirror_dir):
    handler = functools.partial(QuietHandler, directory=str(mirror_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_over_http_with_the_env_mirror(fake, tmp_path, http_mirror, monkeypatch):
    monkeypatch.setenv("FASTDRMM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FASTDRMM_MNIST_MIRROR", "http://127.0.0.1:9/unreachable " + http_mirror)
    X, y = datasets.load_mnist(download=True, subset="test", return_X_y=True, timeout=5)
    check_fake(fake, X, y, "test")
    assert_clean(tmp_path / "data" / "mnist", TEST_NAMES)


def test_failed_downloads_leave_nothing(fake, tmp_path, mirror_dir, http_mirror):
    target = tmp_path / "target"
    # a mirror that serves a bad copy: checksum refused, nothing kept
    bad = fake.write(tmp_path / "bad", gz=True)
    (bad / (TEST_NAMES[1] + ".gz")).write_bytes(gzip.compress(idx_labels([0] * 7)))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.*bad copy: sha256") as info:
        datasets.load_mnist(target, download=True, subset="test", mirror=bad.as_uri())
    assert "nothing was written" in str(info.value)
    assert_clean(target, TEST_NAMES[:1])  # the good images file stays, verified
    # a truncated gzip on the mirror
    (bad / (TEST_NAMES[1] + ".gz")).write_bytes(
        (mirror_dir / (TEST_NAMES[1] + ".gz")).read_bytes()[:30])
    with pytest.raises(ValueError, match=r"bad copy: corrupt or truncated gzip"):
        datasets.load_mnist(target, download=True, subset="test", mirror=bad.as_uri())
    assert_clean(target, TEST_NAMES[:1])
    # not found (HTTP 404, and a missing file:// file): OSError naming the URL
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    with pytest.raises(OSError, match=r"404"):
        datasets.load_mnist(target, download=True, subset="test", mirror=http_mirror + "nothing/",
                            timeout=5)
    with pytest.raises(OSError, match=str(empty)):
        datasets.load_mnist(target, download=True, subset="test", mirror=empty.as_uri())
    assert_clean(target, TEST_NAMES[:1])
    # the next mirror is tried after a failure
    datasets.load_mnist(target, download=True, subset="test",
                        mirror=[empty.as_uri(), bad.as_uri(), http_mirror], timeout=5)
    assert_clean(target, TEST_NAMES)


# --------------------------------------------------------------------------------------------
# the real MNIST files (../shared/data/mnist)


@pytest.fixture(scope="module")
def mnist():
    return datasets.load_mnist(SHARED_MNIST)


@requires_mnist
def test_real_mnist_shapes_dtypes_range_counts(mnist):
    for X, y, n, counts in ((mnist.X_train, mnist.y_train, 60000, TRAIN_COUNTS),
                            (mnist.X_test, mnist.y_test, 10000, TEST_COUNTS)):
        assert X.shape == (n, 1, 28, 28) and X.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        assert X.min() == 0 and X.max() == 1
        np.testing.assert_array_equal(np.bincount(y, minlength=10), counts)


@requires_mnist
def test_real_mnist_raw_copies_and_corruption(mnist, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in TEST_NAMES:
        (raw / name).write_bytes(gzip.decompress((SHARED_MNIST / (name + ".gz")).read_bytes()))
    X, y = datasets.load_mnist(raw, subset="test", return_X_y=True)
    np.testing.assert_array_equal(X, mnist.X_test)
    np.testing.assert_array_equal(y, mnist.y_test)
    # one label changed, still a well-formed file: only the checksum sees it
    labels = raw / TEST_NAMES[1]
    data = bytearray(labels.read_bytes())
    data[8] = (data[8] + 1) % 10
    labels.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{labels}: sha256 .* expected the canonical"):
        datasets.load_mnist(raw, subset="test")
    labels.write_bytes(bytes(data[:-5]))
    with pytest.raises(ValueError, match=f"{labels}: truncated IDX file"):
        datasets.load_mnist(raw, subset="test")


@requires_mnist
def test_real_mnist_download_from_local_mirror(mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDRMM_MNIST_MIRROR", SHARED_MNIST.as_uri())
    cache = tmp_path / "home" / ".cache" / "fastdrmm" / "mnist"
    data = datasets.load_mnist(download=True, subset="test")
    assert data.data_dir == cache
    np.testing.assert_array_equal(data.data, mnist.X_test)
    assert_clean(cache, TEST_NAMES)


@pytest.mark.skipif(bool(os.environ.get("FASTDRMM_DATA", "").strip()),
                    reason="$FASTDRMM_DATA names the MNIST directory")
def test_shared_path_is_next_to_the_repository():
    repo = Path(__file__).resolve().parents[1]
    assert SHARED_MNIST.resolve() == (repo / ".." / "shared" / "data" / "mnist").resolve()


# --------------------------------------------------------------------------------------------
# digits


def test_load_digits():
    from sklearn.datasets import load_digits as sk_digits

    data = datasets.load_digits()
    X, y = data.data, data.target
    assert X.shape == (1797, 1, 8, 8) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0 and X.max() == 1
    reference = sk_digits()
    np.testing.assert_array_equal(X[:, 0], (reference.images / 16).astype(np.float32))
    np.testing.assert_array_equal(y, reference.target)
    X64, y64 = datasets.load_digits(return_X_y=True, dtype=np.float64)
    assert X64.dtype == np.float64 and np.array_equal(X64[:, 0], reference.images / 16)
    with pytest.raises(TypeError):
        datasets.load_digits(dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# gzip bombs: refused after bounded work, in bounded memory


BOMB_ZEROS = 256 << 20  # what the bombs inflate to beyond their declared contents
PEAK_LIMIT = 24 << 20


def gzip_bomb(prefix, n_zeros):
    """A gzip file of ``prefix`` followed by ``n_zeros`` zero bytes, built in bounded memory."""
    import zlib
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(prefix)]
    block = bytes(1 << 20)
    for _ in range(n_zeros // len(block)):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(bytes(n_zeros % len(block))))
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.mark.parametrize("verify", [True, False])
def test_a_gz_that_inflates_past_its_declared_size_is_refused_in_bounded_memory(
        fake, tmp_path, verify):
    directory = fake.write(tmp_path / "d", gz=True, names=TEST_NAMES)
    path = directory / (TEST_NAMES[0] + ".gz")
    path.write_bytes(gzip_bomb(fake.contents[TEST_NAMES[0]], BOMB_ZEROS))
    assert path.stat().st_size < 1 << 20
    raised, peak = peak_memory_of(
        lambda: datasets.load_mnist(directory, subset="test", verify=verify))
    assert isinstance(raised, ValueError), raised
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.0f} MiB"
    assert str(raised).startswith(f"{path}: more than 1048576 unexpected trailing bytes after "
                                  "the 5504 bytes")


def test_a_header_larger_than_the_canonical_file_is_refused_before_reading(fake, tmp_path):
    """Verified files cannot be larger than the canonical ones: a header declaring more is
    refused before the data are read (the bomb's zeros are never inflated)."""
    directory = fake.write(tmp_path / "d", gz=True, names=TEST_NAMES)
    path = directory / (TEST_NAMES[0] + ".gz")
    header = struct.pack(">iiii", 2051, 400_000, 28, 28)
    path.write_bytes(gzip_bomb(header, BOMB_ZEROS))
    raised, peak = peak_memory_of(lambda: datasets.load_mnist(directory, subset="test"))
    assert isinstance(raised, ValueError), raised
    assert str(raised).startswith(
        f"{path}: the header declares dimensions (400000, 28, 28) (313600016 bytes), more than "
        "the 7840016 bytes of the canonical t10k-images-idx3-ubyte")
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.0f} MiB"
    assert datasets.MNIST_SIZES[TEST_NAMES[0]] == 7840016


def test_a_mirror_serving_a_gzip_bomb_leaves_nothing(fake, tmp_path, mirror_dir):
    path = mirror_dir / (TEST_NAMES[1] + ".gz")
    path.write_bytes(gzip_bomb(fake.contents[TEST_NAMES[1]], BOMB_ZEROS))
    target = tmp_path / "target"
    raised, peak = peak_memory_of(lambda: datasets.load_mnist(
        target, download=True, subset="test", mirror=mirror_dir.as_uri()))
    assert isinstance(raised, ValueError), raised
    assert re.search(r"t10k-labels-idx1-ubyte.*bad copy: more than 1048576 unexpected trailing",
                     str(raised))
    assert peak < PEAK_LIMIT, f"peak {peak / 2**20:.0f} MiB"
    assert_clean(target, TEST_NAMES[:1])
