"""Every backend module meets one contract: the five ops of ``fastdrmm.ops`` with the same
leading positional parameters (``fastdrmm._backends.CONTRACT``), extras only keyword-only or
defaulted (the cpu backend's ``algorithm=``), and a device backend's array hooks.

Each built-in backend is imported in a fresh interpreter: numba-cuda under the CUDA simulator
(no GPU needed), the cupy backend with a stand-in ``cupy`` module where CuPy is absent (its
functions are inspected, never run), so that every backend is checked on every machine.
"""

import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest

import cudahost
from fastdrmm import _backends, ops

CHECK = """
import importlib, importlib.util, json, sys, types
name = sys.argv[1]
from fastdrmm import _backends
spec = _backends.BACKENDS[name]
for package in spec.requires:
    if name == "cupy" and importlib.util.find_spec(package) is None:
        sys.modules[package] = types.ModuleType(package)  # a stand-in: inspected, never run
module = importlib.import_module(spec.module)
print(json.dumps(_backends.contract_problems(module, spec.location)))
"""


def problems_in_a_fresh_interpreter(name):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    out = subprocess.run([sys.executable, "-c", CHECK, name], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(_backends.BACKENDS))
def test_every_backend_module_meets_the_contract(name):
    if name == "numba-cuda" and importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("backend 'numba-cuda' needs the numba-cuda package to be imported")
    assert problems_in_a_fresh_interpreter(name) == []


def test_the_cuda_harness_meets_the_contract():
    """The tests' host build of the cupy backend's kernels stands in for a backend too."""
    assert _backends.contract_problems(cudahost.HarnessBackend(dev=None)) == []


def test_the_contract_is_the_reference_backend_and_the_public_ops():
    """The numpy reference takes exactly the contract's parameters, nothing more; the ops of
    fastdrmm.ops are the contract's ops."""
    reference = _backends.load("numpy")
    for op, params in _backends.CONTRACT.items():
        assert tuple(inspect.signature(getattr(reference, op)).parameters) == params
    assert tuple(ops.__all__) == _backends.OPS
    assert tuple(reference.__all__) == _backends.OPS


class Backend:
    """A conforming backend, changed one function at a time below."""

    def match_switch_pool(self, x, templates, bias, geometry, leak, algorithm="auto"):
        pass

    def match_at(self, x, templates, idx, geometry, switches, *, algorithm="auto"):
        pass

    def unpool(self, code, idx, plane_shape, switches, **options):
        pass

    def render(self, code, idx, templates, geometry, switches):
        pass

    def template_stats(self, x, code, idx, geometry, switches, gram):
        pass


def with_function(op, func):
    backend = Backend()
    setattr(backend, op, func)
    return backend


def test_extras_must_be_optional_and_the_order_kept():
    assert _backends.contract_problems(Backend()) == []
    cases = {
        "a required extra": with_function(
            "render", lambda code, idx, templates, geometry, switches, scale: None),
        "swapped": with_function(
            "render", lambda code, templates, idx, geometry, switches: None),
        "one short": with_function("unpool", lambda code, idx, plane_shape: None),
        "renamed": with_function(
            "template_stats", lambda x, code, idx, geometry, switches, want_gram: None),
        "missing": with_function("match_at", None),
    }
    for case, backend in cases.items():
        assert len(_backends.contract_problems(backend)) == 1, case
