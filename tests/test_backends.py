"""The backend dispatch: explicit choice, set_backend, the environment, 'auto', missing extras."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import fastdrmm
from fastdrmm import _backends, ops

X = np.random.default_rng(0).standard_normal((1, 1, 6, 6))
W = np.ones((2, 1, 3, 3))
B = np.zeros(2)


def chosen(backend="auto", arrays=(X,)):
    return _backends.resolve(backend, arrays)[0]


def test_auto_picks_cpu_for_host_arrays(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    assert chosen() == "cpu"
    assert fastdrmm.get_backend() == "auto"


def test_explicit_argument_wins(monkeypatch):
    monkeypatch.setenv(_backends.ENV_VAR, "cpu")
    with fastdrmm.set_backend("cpu"):
        assert chosen("numpy") == "numpy"


def test_set_backend_as_context_manager_restores(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    with fastdrmm.set_backend("numpy"):
        assert chosen() == "numpy"
        with fastdrmm.set_backend("cpu"):
            assert chosen() == "cpu"
        assert chosen() == "numpy"
    assert chosen() == "cpu"


def test_set_backend_as_a_call_persists(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    token = fastdrmm.set_backend("numpy")
    try:
        assert chosen() == "numpy"
    finally:
        token.__exit__(None, None, None)
    assert chosen() == "cpu"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(_backends.ENV_VAR, "numpy")
    assert chosen() == "numpy"
    with fastdrmm.set_backend("cpu"):
        assert chosen() == "cpu"
    monkeypatch.setenv(_backends.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="FASTDRMM_BACKEND"):
        chosen()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        ops.match_switch_pool(X, W, B, backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        fastdrmm.set_backend("gpu")
    with pytest.raises(TypeError, match="backend must be a string"):
        ops.match_switch_pool(X, W, B, backend=None)


@pytest.mark.parametrize("name,extra,package", [("cupy", "cupy", "cupy"),
                                                ("numba-cuda", "cuda", "numba_cuda")])
def test_missing_gpu_package_names_the_extra(name, extra, package, monkeypatch):
    """Pretend the package is absent (it may well be installed here) and ask for its backend."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(_backends.importlib.util, "find_spec",
                        lambda mod, *a: None if mod == package else real_find_spec(mod, *a))
    # registered afresh, the backend is imported again on first use (not taken from a cache)
    with _backends.register(_backends.BACKENDS[name], replace=True):
        with pytest.raises(ImportError, match=rf"fastdrmm\[{extra}\]"):
            ops.match_switch_pool(X, W, B, backend=name)


class FakeDeviceArray:
    """Anything with __cuda_array_interface__ counts as living on a GPU."""

    shape, dtype, ndim = (1, 1, 6, 6), np.dtype(np.float32), 4
    __cuda_array_interface__ = {"shape": (1, 1, 6, 6), "typestr": "<f4", "data": (0, False),
                                "version": 3}


def test_auto_sends_device_arrays_to_a_gpu_backend(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    assert _backends.array_location(FakeDeviceArray()) == "device"
    assert _backends.array_location(X) == "host"
    if importlib.util.find_spec("cupy") is None and importlib.util.find_spec("numba_cuda") is None:
        with pytest.raises(ImportError, match="fastdrmm\\["):
            _backends.resolve("auto", (FakeDeviceArray(), FakeDeviceArray()))


def test_mixed_locations_are_refused(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="different devices"):
        ops.match_switch_pool(FakeDeviceArray(), W, B)


def test_device_array_on_a_host_backend_is_not_moved_silently():
    with pytest.raises(TypeError, match="lives on a GPU"):
        ops.match_switch_pool(FakeDeviceArray(), W, B, backend="numpy")


def test_host_dlpack_arrays_come_in_without_a_copy():
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(X.copy())
    h_torch = ops.match_switch_pool(t, torch.from_numpy(W), torch.from_numpy(B), backend="cpu")
    h_numpy = ops.match_switch_pool(X, W, B, backend="cpu")
    np.testing.assert_array_equal(h_torch[0], h_numpy[0])
    from fastdrmm._validation import as_array
    assert np.shares_memory(as_array(t, "x"), t.numpy())


def test_import_is_light():
    """Importing fastdrmm loads no kernel backend and compiles nothing."""
    code = ("import sys, fastdrmm; "
            "assert 'fastdrmm.kernels.cpu' not in sys.modules; "
            "assert 'fastdrmm.kernels.numpy' not in sys.modules; "
            "assert 'cupy' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_why_a_gpu_backend_cannot_run_is_said_plainly(monkeypatch):
    assert _backends.device_unavailable_reason("cpu") is None
    assert _backends.device_unavailable_reason("numpy") is None
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):  # the package of each GPU backend is absent
        return None if name in ("cupy", "numba_cuda") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert "pip install 'fastdrmm[cupy]'" in _backends.device_unavailable_reason("cupy")
    assert "pip install 'fastdrmm[cuda]'" in _backends.device_unavailable_reason("numba-cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())

    def no_driver(name):
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    monkeypatch.setattr(_backends, "_cuda_device_count", no_driver)
    reason = _backends.device_unavailable_reason("cupy")
    assert reason.startswith("no CUDA GPU is usable on this machine")
    assert "cudaErrorInsufficientDriver" in reason and "asarray" not in reason
    monkeypatch.setattr(_backends, "_cuda_device_count", lambda name: 0)
    assert _backends.device_unavailable_reason("numba-cuda") == \
        "no CUDA GPU is usable on this machine"
    monkeypatch.setattr(_backends, "_cuda_device_count", lambda name: 1)
    assert _backends.device_unavailable_reason("cupy") is None


class Recorder:
    """A backend that answers every op with the numpy backend's result and records the call."""

    def __init__(self):
        self.calls = []
        self.reference = _backends.load("numpy")

    def _call(self, op, *args):
        self.calls.append(op)
        return getattr(self.reference, op)(*args)

    def match_switch_pool(self, x, templates, bias, geometry, leak):
        return self._call("match_switch_pool", x, templates, bias, geometry, leak)

    def match_at(self, x, templates, idx, geometry, switches):
        return self._call("match_at", x, templates, idx, geometry, switches)

    def unpool(self, code, idx, plane_shape, switches):
        return self._call("unpool", code, idx, plane_shape, switches)

    def render(self, code, idx, templates, geometry, switches):
        return self._call("render", code, idx, templates, geometry, switches)

    def template_stats(self, x, code, idx, geometry, switches, gram, *, note=None):
        return self._call("template_stats", x, code, idx, geometry, switches, gram)


def test_register_adds_a_backend_for_a_block():
    recorder = Recorder()
    with _backends.register("recorder", recorder) as registration:
        assert "recorder" in _backends.BACKENDS and registration.name == "recorder"
        h, idx = ops.match_switch_pool(X, W, B, backend="recorder")
        np.testing.assert_array_equal(h, ops.match_switch_pool(X, W, B, backend="numpy")[0])
        with fastdrmm.set_backend("recorder"):
            ops.render(h, idx, W, (6, 6))
        assert recorder.calls == ["match_switch_pool", "render"]
    assert "recorder" not in _backends.BACKENDS
    with pytest.raises(ValueError, match="unknown backend 'recorder'"):
        ops.match_switch_pool(X, W, B, backend="recorder")


def test_register_backend_is_the_public_plug_in_point():
    recorder = Recorder()
    assert "register_backend" in fastdrmm.__all__
    with fastdrmm.register_backend("recorder", recorder):
        ops.unpool(np.ones((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int32), (3, 3),
                   backend="recorder")
    assert recorder.calls == ["unpool"] and "recorder" not in _backends.BACKENDS


def test_register_as_a_call_holds_until_undone():
    registration = _backends.register("recorder", Recorder())
    try:
        assert _backends.resolve("recorder", (X,))[0] == "recorder"
    finally:
        registration.__exit__(None, None, None)
    assert "recorder" not in _backends.BACKENDS


def test_register_stands_in_for_a_backend_and_restores_it():
    names = list(_backends.BACKENDS)
    numpy_module = _backends.load("numpy")
    with pytest.raises(ValueError, match="replace=True"):
        _backends.register("numpy", Recorder())
    recorder = Recorder()
    with _backends.register("numpy", recorder, replace=True):
        ops.match_switch_pool(X, W, B, backend="numpy")
        assert recorder.calls == ["match_switch_pool"]
    assert _backends.load("numpy") is numpy_module
    assert list(_backends.BACKENDS) == names  # in their order: error messages list them


def test_register_lazily_imports_a_module_path_naming_the_extra():
    spec = _backends.BackendSpec("lazy", "fastdrmm.kernels.numpy", "host")
    with _backends.register(spec):
        assert "lazy" in _backends.BACKENDS
        assert _backends.load("lazy") is _backends.load("numpy")
    spec = _backends.BackendSpec("absent", "fastdrmm.kernels.numpy", "host",
                                 ("no_such_package_here",), "absent-extra")
    with _backends.register(spec):
        with pytest.raises(ImportError, match=r"fastdrmm\[absent-extra\]"):
            ops.match_switch_pool(X, W, B, backend="absent")


class Incomplete:
    def match_switch_pool(self, x, templates, bias, padding, pool, stride, leak):
        raise AssertionError("never called")


@pytest.mark.parametrize("spec,module,error,message", [
    ("auto", Recorder(), ValueError, "cannot be named 'auto'"),
    ("", Recorder(), ValueError, "cannot be named ''"),
    (("numpy",), Recorder(), TypeError, "BackendSpec or a name"),
    ("bare", None, ValueError, "needs a module or a module path"),
    ("old", Incomplete(), TypeError,
     r"match_switch_pool\(x, templates, bias, padding, pool, stride, leak\) does not take "
     r"\(x, templates, bias, geometry, leak\).*no function render"),
])
def test_register_refuses_what_cannot_work(spec, module, error, message):
    with pytest.raises(error, match=message):
        _backends.register(spec, module)
    assert set(_backends.BACKENDS) == {"numpy", "cpu", "numba-cuda", "cupy"}


def test_a_device_backend_needs_the_device_hooks():
    with pytest.raises(TypeError, match="no function asarray"):
        _backends.register("gpu-recorder", Recorder(), location="device")
