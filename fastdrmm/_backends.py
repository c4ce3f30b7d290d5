"""Backend registry: a name -> a lazily imported kernel module.

The dispatch knows nothing about a backend but its name, where its arrays live, the
third-party package it needs (and the pip extra that installs it) and its module. Every
backend module exposes the same five functions (``OPS``) with the same (already validated)
positional arguments (``CONTRACT``):

    match_switch_pool(x, templates, bias, geometry, leak) -> (h, idx)
    match_at(x, templates, idx, geometry, switches) -> z
    unpool(code, idx, plane_shape, switches) -> u
    render(code, idx, templates, geometry, switches) -> r
    template_stats(x, code, idx, geometry, switches, gram) -> (B, s, G)

where ``geometry`` is the op's ``fastdrmm.kernels.geometry.Geometry`` (every size, computed
and checked once by ``fastdrmm.ops``), ``plane_shape`` a tuple of two ints, arrays are
C-contiguous, floating arrays share one dtype, index arrays are int32 and switches is None or
an array of the code's dtype. A backend may add keyword-only or defaulted parameters (the
cpu backend's ``algorithm=``). A device backend also exposes ``DEVICE_HOOKS``: ``asarray``
(wrap a CUDA array without a copy), ``ascontiguousarray(arr, dtype)`` and ``index_range(idx)``
(its (min, max) as Python ints).

The built-in backends are listed in ``BACKENDS``; ``register`` adds another (or stands in for
one, e.g. in tests) and undoes that on request.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass

import numpy as np

ENV_VAR = "FASTDRMM_BACKEND"

CONTRACT = {
    "match_switch_pool": ("x", "templates", "bias", "geometry", "leak"),
    "match_at": ("x", "templates", "idx", "geometry", "switches"),
    "unpool": ("code", "idx", "plane_shape", "switches"),
    "render": ("code", "idx", "templates", "geometry", "switches"),
    "template_stats": ("x", "code", "idx", "geometry", "switches", "gram"),
}
OPS = tuple(CONTRACT)
DEVICE_HOOKS = ("asarray", "ascontiguousarray", "index_range")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str  # the dotted path imported on first use ("" for a module given to register)
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
    """A backend's kernel module, imported on first use with an ImportError naming the extra
    to install (or the module given to ``register``)."""
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


def contract_problems(module, location="host"):
    """How ``module`` breaks the backend contract, as a list of phrases (empty: it conforms).

    Each of ``OPS`` must be a callable whose leading positional parameters are exactly those
    of ``CONTRACT`` (names and order); any further parameter must be keyword-only or have a
    default. A device backend must also have the ``DEVICE_HOOKS``.
    """
    problems = []
    for op, expected in CONTRACT.items():
        func = getattr(module, op, None)
        if not callable(func):
            problems.append(f"it has no function {op}")
            continue
        try:
            params = list(inspect.signature(func).parameters.values())
        except (TypeError, ValueError):  # a callable without a signature: cannot be checked
            continue
        positional = [p for p in params
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = tuple(p.name for p in positional[:len(expected)])
        required = [p.name for p in positional[len(expected):] if p.default is p.empty]
        if names != expected or required:
            problems.append(f"{op}{inspect.signature(func)} does not take "
                            f"({', '.join(expected)}) with only optional parameters after")
    if location == "device":
        problems += [f"it has no function {hook} (a device backend needs it)"
                     for hook in DEVICE_HOOKS if not callable(getattr(module, hook, None))]
    return problems


class register:
    """Add the backend ``spec`` (a ``BackendSpec``, or a name for a backend of
    ``location``) to the registry, with its kernel ``module`` or, when ``module`` is None,
    imported from ``spec.module`` on first use (its ImportError naming ``spec.extra``).

    ``replace=True`` lets it stand in for a backend of that name (a built-in one included);
    else a name in use is a ValueError. A module given here must meet the contract
    (``contract_problems``), else a TypeError. Like ``set_backend``, the registration holds
    from the call on; ``with register(...):`` holds it inside the block only and restores the
    name's previous backend (or none) on exit::

        with _backends.register("cuda-harness", harness_module):
            ops.render(..., backend="cuda-harness")
    """

    def __init__(self, spec, module=None, *, location="host", replace=False):
        if isinstance(spec, str):
            spec = BackendSpec(spec, "", location)
        if not isinstance(spec, BackendSpec):
            raise TypeError(f"spec must be a BackendSpec or a name, got {spec!r}")
        if not spec.name or spec.name == "auto":
            raise ValueError(f"a backend cannot be named {spec.name!r}")
        if spec.location not in ("host", "device"):
            raise ValueError(f"location must be 'host' or 'device', got {spec.location!r}")
        if spec.name in BACKENDS and not replace:
            raise ValueError(f"a backend named {spec.name!r} exists; pass replace=True to "
                             "stand in for it")
        if module is None and not spec.module:
            raise ValueError(f"backend {spec.name!r} needs a module or a module path")
        if module is not None:
            problems = contract_problems(module, spec.location)
            if problems:
                raise TypeError(f"backend {spec.name!r} does not meet the backend contract: "
                                + "; ".join(problems))
        self.name = spec.name
        self._previous = (BACKENDS.get(spec.name), _loaded.get(spec.name))
        BACKENDS[spec.name] = spec
        _loaded.pop(spec.name, None)
        if module is not None:
            _loaded[spec.name] = module

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        spec, module = self._previous
        if spec is None:
            BACKENDS.pop(self.name, None)
        else:
            BACKENDS[self.name] = spec  # in its old place: the order of the names stays
        _loaded.pop(self.name, None)
        if module is not None:
            _loaded[self.name] = module
        return False

    def __repr__(self):
        return f"register({self.name!r})"


register_backend = register  # the public name (``fastdrmm.register_backend``)


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
