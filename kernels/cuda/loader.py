"""Loads the CUDA C sources from the installed package and compiles them with
``cupy.RawModule`` once per (device, source), memoised.

``source(filename)`` inlines ``common.cuh`` so that one string compiles anywhere (no include
path, zip-safe); the NVRTC compile check in tests/ uses this function, ``compile_options``
and ``name_expressions`` too, so what is checked is what runs.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import threading

from . import launch

PACKAGE = __package__  # fastdrmm.kernels.cuda
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+\.cuh)"\s*$', re.MULTILINE)


@functools.cache
def read(filename):
    return importlib.resources.files(PACKAGE).joinpath(filename).read_text(encoding="utf-8")


@functools.cache
def source(filename):
    """The source text with the project's own headers inlined (each once)."""
    seen = set()

    def inline(match):
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return _INCLUDE.sub(inline, read(name))

    return _INCLUDE.sub(inline, read(filename))


def file_of(name_expr):
    kernel = name_expr.split("<", 1)[0]
    for filename, kernels in launch.SOURCES.items():
        if kernel in kernels:
            return filename
    raise KeyError(f"no CUDA source defines {kernel!r}")


_lock = threading.Lock()
_modules = {}


def module(filename, cfg=launch.GPU):
    """The compiled RawModule of one source on the current device (memoised)."""
    import cupy

    key = (cupy.cuda.Device().id, filename, cfg)
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                mod = cupy.RawModule(code=source(filename),
                                     options=launch.compile_options(cfg),
                                     name_expressions=launch.name_expressions(filename))
                mod.compile()
                _modules[key] = mod
    return mod


def get_function(name_expr, cfg=launch.GPU):
    return module(file_of(name_expr), cfg).get_function(name_expr)
