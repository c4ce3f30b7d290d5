"""Backend registry: a name -> a lazily imported kernel module.

The dispatch knows nothing about a backend but its name, where its arrays live, the
third-party package it needs (and the pip extra that installs it) and its module. Every
backend module exposes the same five functions with the same (already validated) arguments:

    match_switch_pool(x, templates, bias, padding, pool, stride, leak) -> (h, idx)
    match_at(x, templates, idx, padding, switches) -> z
    unpool(code, idx, plane_shape, switches) -> u
    render(code, idx, templates, input_shape, padding, switches) -> r
    template_stats(x, code, idx, kernel_size, padding, switches, gram) -> (B, s, G)

where every pair argument is a tuple of two ints, arrays are C-contiguous, floating arrays share
one dtype, index arrays are int32 and switches is None or an array of the code's dtype.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.util
import os
from dataclasses import dataclass

import numpy as np

ENV_VAR = "FASTDRMM_BACKEND"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    location: str  # "host" or "device"
    requires: tuple = ()  # importable top-level packages it needs
    extra: str | None = None  # the pip extra that installs them


BACKENDS = {
    spec.name: spec
    for spec in (
        BackendSpec("numpy", "fastdrmm.kernels.numpy", "host"),
        BackendSpec("cpu", "fastdrmm.kernels.cpu", "host", ("numba",)),
        BackendSpec("numba-cuda", "fastdrmm.kernels.numba_cuda", "device", ("numba_cuda",), "cuda"),
        BackendSpec("cupy", "fastdrmm.kernels.cuda.backend", "device", ("cupy",), "cupy"),
    )
}

_current = contextvars.ContextVar("fastdrmm_backend", default=None)
_loaded = {}


def _check_name(name, argname="backend"):
    if not isinstance(name, str):
        raise TypeError(f"{argname} must be a string, got {name!r}")
    if name != "auto" and name not in BACKENDS:
        choices = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"unknown {argname} {name!r}; choose one of: {choices}")
    return name


class set_backend:
    """Choose the default backend, globally or for a ``with`` block.

    ``fastdrmm.set_backend("numpy")`` sets it for the rest of the session (of this thread's
    context); ``with fastdrmm.set_backend("numpy"): ...`` sets it inside the block only and
    restores the previous choice on exit. ``"auto"`` goes back to choosing by array location.
    An explicit ``backend=`` argument to an op overrides this; this overrides the
    ``FASTDRMM_BACKEND`` environment variable.
    """

    def __init__(self, name):
        _check_name(name)
        self.name = name
        self._token = _current.set(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _current.reset(self._token)
        return False

    def __repr__(self):
        return f"set_backend({self.name!r})"


def get_backend():
    """The backend name in force when an op is called with ``backend="auto"``."""
    chosen = _current.get()
    if chosen is not None:
        return chosen
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, argname=f"${ENV_VAR}")
    return "auto"


def array_location(arr):
    """'device' for CUDA arrays (CUDA array interface or a CUDA DLPack device), else 'host'.

    Numba device arrays also count (``__cuda_ndarray__``): under the CUDA simulator
    (``NUMBA_ENABLE_CUDASIM=1``) they wrap host memory and have no CUDA array interface.
    """
    if type(arr) is np.ndarray:  # the common case, without the attribute probes below
        return "host"
    if hasattr(arr, "__cuda_array_interface__") or getattr(arr, "__cuda_ndarray__", False) is True:
        return "device"
    dev = getattr(arr, "__dlpack_device__", None)
    if dev is not None:
        try:
            kind = int(dev()[0])
        except Exception:
            return "host"
        # DLPack device types: 2 CUDA, 3 CUDA host (pinned: host), 13 CUDA managed.
        if kind in (2, 13):
            return "device"
    return "host"


def resolve(backend, arrays):
    """Pick a backend name for these arrays and return its loaded module."""
    name = _check_name(backend)
    if name == "auto":
        name = get_backend()
    if name == "auto":
        locations = {array_location(a) for a in arrays if a is not None}
        if len(locations) > 1:
            raise ValueError("inputs live on different devices (some on the host, some on a GPU)")
        if locations == {"device"}:
            name = "cupy" if importlib.util.find_spec("cupy") is not None else "numba-cuda"
        else:
            name = "cpu"
    return name, load(name)


def load(name):
    """Import a backend's kernel module, with an ImportError naming the extra to install."""
    _check_name(name)
    if name in _loaded:
        return _loaded[name]
    spec = BACKENDS[name]
    for package in spec.requires:
        if importlib.util.find_spec(package) is None:
            hint = f"pip install 'fastdrmm[{spec.extra}]'" if spec.extra else "pip install fastdrmm"
            raise ImportError(f"backend {name!r} needs the package {package!r}: {hint}")
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        if exc.name == spec.module:
            raise ImportError(f"backend {name!r} is not available in this build of fastdrmm") from exc
        raise
    _loaded[name] = module
    return module


def device_unavailable_reason(name):
    """Why the GPU backend ``name`` cannot run on this machine, as a short phrase ("the
    package 'cupy' is not installed (...)", "no CUDA GPU is usable on this machine (...)"),
    or None when it can (and for host backends). Imports the backend's package: call it only
    where a GPU backend was asked for."""
    spec = BACKENDS[_check_name(name)] if name != "auto" else None
    if spec is None or spec.location != "device":
        return None
    for package in spec.requires:
        if importlib.util.find_spec(package) is None:
            return (f"the package {package!r} it needs is not installed "
                    f"(pip install 'fastdrmm[{spec.extra}]')")
    try:
        count = _cuda_device_count(name)
    except Exception as exc:  # noqa: BLE001 - any failure to reach a GPU says the same
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        return f"no CUDA GPU is usable on this machine ({detail})"
    if count < 1:
        return "no CUDA GPU is usable on this machine"
    return None


def _cuda_device_count(name):
    if name == "cupy":
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    from numba import cuda

    return len(cuda.gpus) if cuda.is_available() else 0
