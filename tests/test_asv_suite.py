"""The asv benchmark suite (benchmarks/suite) called as asv calls it: where MNIST is absent
its MNIST benchmarks are skipped cleanly (NotImplementedError from setup), not failed."""

import pytest
from benchmark_scripts import BENCHMARKS, load_script

SUITE = BENCHMARKS / "suite"


def load_suite_module(name):
    return load_script(SUITE / f"{name}.py", f"asv_suite_{name}")


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
