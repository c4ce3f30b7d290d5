"""The asv benchmark suite (benchmarks/suite) called as asv calls it: where MNIST is absent
its MNIST benchmarks are skipped cleanly (NotImplementedError from setup), not failed."""

import importlib.util
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite"


def load_suite_module(name):
    spec = importlib.util.spec_from_file_location(f"asv_suite_{name}", SUITE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def asv_setup_arguments(cache, params):
    """asv passes setup_cache's value first, but only when it is not None."""
    return ((cache,) if cache is not None else ()) + tuple(params)


@pytest.mark.parametrize("top", ["average", "full"])
def test_the_mnist_benchmark_is_skipped_where_mnist_is_absent(monkeypatch, top):
    suite = load_suite_module("bench_drmm")
    monkeypatch.setattr(suite, "_mnist", lambda subset="both": None)
    bench = suite.DRMMMnistSubset()
    assert top in bench.params[0]
    cache = bench.setup_cache()
    with pytest.raises(NotImplementedError, match="MNIST not found"):
        bench.setup(*asv_setup_arguments(cache, [top]))
