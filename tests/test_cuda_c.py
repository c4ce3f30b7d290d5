"""The cupy backend's CUDA C kernels, without a GPU and with one.

1. NVRTC compiles every .cu for sm_80 and sm_90 (resource table, no spills).
2. The kernels run unmodified on the CPU through the host harness (tests/cuda_harness/,
   tests/cudahost.py), launched with the backend's own launch configuration (launch.py),
   against the reference and the naive oracles; a ThreadSanitizer build replays one case of
   every kernel, and catches a deliberately missing __syncthreads.
3. With CuPy and a GPU, the same comparisons run through backend="cupy" for real.
"""

import functools
import tempfile

import numpy as np
import pytest

import cudahost
import match_at_checks as mac
import naive
import nvrtc_compile_check
import runners
from checks import (DTYPES, assert_pooling_matches, check_match_geometry,
                    check_match_nan_and_inf, check_match_ties, check_render_adjoint_of_matching,
                    check_template_stats, check_unpool_and_render, tol)
from fastdrmm import _backends, ops
from fastdrmm._validation import match_geometry, units_geometry
from fastdrmm.kernels.cuda import launch, loader
from scenarios import (MATCH_GEOMETRIES, RENDER_GEOMETRIES, ROW_SHAPES, SWITCH_KINDS, latents,
                       random_layer)


GPU = runners.unavailable("cupy") is None
# the conftest's backend fixture registers the harness (runners.prepare) or skips cupy
BACKENDS = ["cuda-harness", "cupy"]


@pytest.fixture(scope="session")
def harness_lib():
    return cudahost.build(cudahost.SMALL)


def pooled(x, templates, padding, pool, stride):
    """The Geometry of a pooled matching of x by the templates (as fastdrmm.ops makes it)."""
    return match_geometry(x.shape[2:], templates.shape[2:], padding, pool, stride)


def at_units(input_hw, templates, padding, units):
    """The Geometry of the ops that read or write the positions of ``units`` (N, K, Hp, Wp)."""
    return units_geometry(input_hw, templates.shape[2:], padding, units.shape[2:])


# ---------------------------------------------------------------- 1. NVRTC compile check


def test_nvrtc_compiles_every_kernel_without_spills(capsys):
    rows, problems = nvrtc_compile_check.run()
    with capsys.disabled():
        print()
        nvrtc_compile_check.run()  # the table, in the test log
    assert not problems, "\n".join(problems)
    want = {(e, a) for f in launch.SOURCES for e in launch.name_expressions(f)
            for a in nvrtc_compile_check.ARCHS}
    assert {(e, a) for e, a, _ in rows} == want
    for _, _, rec in rows:
        assert rec["smem"] <= 48 * 1024  # static shared memory limit per block


def test_loader_inlines_the_shared_header():
    for filename in launch.SOURCES:
        src = loader.source(filename)
        assert '#include "common.cuh"' not in src and "fd_block_sum" in src
        for expr in launch.name_expressions(filename):
            assert loader.file_of(expr) == filename


# ---------------------------------------------------------------- 2. harness and 3. GPU


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", MATCH_GEOMETRIES)
def test_match_against_oracles(backend, dtype, geom, run, rng):
    check_match_geometry(functools.partial(run, "match_switch_pool"), rng, dtype, geom)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_ties_take_the_first_position(backend, dtype, run, rng):
    check_match_ties(functools.partial(run, "match_switch_pool"), rng, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_match_nan_and_inf(backend, dtype, leak, run, rng):
    check_match_nan_and_inf(functools.partial(run, "match_switch_pool"), rng, dtype, leak)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
@pytest.mark.parametrize("use_switches", [False, True])
def test_unpool_render_stats_against_oracles(backend, dtype, geom, use_switches, run, rng):
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    switches = switches if use_switches else None
    check_unpool_and_render(run, dtype, geom, code, idx, templates, switches)
    # unpool adds collisions with atomicAdd: their order, so the last bits, may vary per run
    check_template_stats(run, dtype, geom, x, code, idx, switches, repeat_exact=False)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES[:4])
def test_render_is_the_adjoint_of_matching(backend, dtype, geom, run, rng):
    check_render_adjoint_of_matching(run, rng, dtype, geom)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
@pytest.mark.parametrize("switch_kind", SWITCH_KINDS)
def test_match_at_against_oracle(backend, dtype, geom, switch_kind, run, rng):
    mac.check_geometry(run, rng, dtype, geom, switch_kind)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, kw", ROW_SHAPES)
def test_match_at_any_positions_and_row_lengths(backend, dtype, c, kw, run, rng):
    mac.check_any_positions(run, rng, dtype, c, kw)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, kw", [(1, 5), (20, 3)])
def test_match_at_nan_and_inf_stay_in_their_patches(backend, dtype, c, kw, run, rng):
    mac.check_nan_and_inf(run, rng, dtype, c, kw)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_at_zeros_and_ties(backend, dtype, run, rng):
    mac.check_zeros_and_ties(run, rng, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_match_at_non_contiguous_inputs(backend, dtype, run, rng):
    mac.check_non_contiguous(run, rng, dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES[:4])
def test_match_at_is_the_adjoint_of_render(backend, dtype, geom, run, rng):
    mac.check_adjoint_of_render(run, rng, dtype, geom)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", [RENDER_GEOMETRIES[0], RENDER_GEOMETRIES[2]])
def test_match_at_is_the_full_matching_gathered(backend, dtype, geom, run, rng):
    mac.check_full_matching_gathered(run, rng, dtype, geom)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_unpool_sums_collisions(backend, run):
    code = np.array([[[[1.0, 2.0, 4.0]]]])
    idx = np.array([[[[1, 1, 3]]]], dtype=np.int32)
    np.testing.assert_array_equal(run("unpool", code, idx, (1, 4)), [[[[0.0, 3.0, 0.0, 4.0]]]])
    u = run("unpool", code, idx, (1, 4), switches=np.array([[[[True, False, True]]]]))
    np.testing.assert_array_equal(u, [[[[0.0, 1.0, 0.0, 4.0]]]])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(backend, dtype, run):
    h, idx = run("match_switch_pool", np.zeros((0, 2, 6, 6), dtype), np.ones((3, 2, 3, 3), dtype),
                 np.zeros(3, dtype))
    assert h.shape == idx.shape == (0, 3, 2, 2) and h.dtype == dtype and idx.dtype == np.int32
    code, idx = np.zeros((0, 3, 2, 2), dtype), np.zeros((0, 3, 2, 2), np.int32)
    assert run("unpool", code, idx, (4, 4)).shape == (0, 3, 4, 4)
    assert run("render", code, idx, np.ones((3, 2, 3, 3), dtype), (6, 6)).shape == (0, 2, 6, 6)
    big_b, s, big_g = run("template_stats", np.zeros((0, 2, 6, 6), dtype), code, idx, (3, 3))
    assert (big_b == 0).all() and (s == 0).all() and (big_g == 0).all()
    assert big_b.shape == (3, 2, 3, 3) and big_g.shape == (27, 27)
    z = run("match_at", np.zeros((0, 2, 6, 6), dtype), np.ones((3, 2, 3, 3), dtype), idx)
    assert z.shape == (0, 3, 2, 2) and z.dtype == dtype


def test_both_code_paths_and_the_gpu_configuration_run(harness_lib, rng):
    """The tiled kernels, the direct fallbacks and the GPU's own tile constants."""
    small = cudahost.HostDevice(harness_lib, cudahost.SMALL)
    be = cudahost.backend(small)
    x, t, b = random_layer(rng, np.float64, 1, 2, 9, 9, 3, 7, 7)    # 2*49 > ws_cap: direct paths
    h, idx = be.match_switch_pool(x, t, b, pooled(x, t, 1, 2, 2), 0.0)
    assert_pooling_matches(h, idx, x, t, b, padding=(1, 1), pool=(2, 2))
    r = be.render(h, idx, t, at_units((9, 9), t, 1, h), None)
    np.testing.assert_allclose(r, naive.render(h, idx, t, (9, 9), 1), rtol=1e-10, atol=1e-12)
    names = {name for name, _, _ in small.launches}
    assert {"match_pool_direct<double>", "render_direct<double>"} <= names
    gpu = cudahost.HostDevice(cudahost.build(launch.GPU), launch.GPU)
    be = cudahost.backend(gpu)
    for dtype in DTYPES:
        x, t, b = random_layer(rng, dtype, 2, 5, 23, 19, 6, 3, 3)
        h, idx = be.match_switch_pool(x, t, b, pooled(x, t, 2, 2, 2), 0.0)
        assert_pooling_matches(h, idx, x, t, b, padding=(2, 2), pool=(2, 2), dtype=dtype)
        r = be.render(h, idx, t, at_units((23, 19), t, 2, h), None)
        rtol, atol = tol(dtype)
        np.testing.assert_allclose(r, naive.render(h, idx, t, (23, 19), 2), rtol=rtol,
                                   atol=atol * 10)
        sw = (rng.random(h.shape) < 0.7).astype(dtype)  # 2*6*12*10 units: a partial last block
        z = be.match_at(x, t, idx, at_units((23, 19), t, 2, h), sw)
        np.testing.assert_allclose(z, naive.match_at(x, t, idx, 2, sw), rtol=rtol,
                                   atol=atol * 10)
    assert all(block == (256, 1, 1) for _, _, block in gpu.launches)
    assert {"match_pool_tiled<float>", "render_tiled<double>",
            "match_at<float>"} <= {n for n, _, _ in gpu.launches}


# ---------------------------------------------------------------- ThreadSanitizer


@pytest.fixture(scope="session")
def tsan_exe():
    return cudahost.build(cudahost.SMALL, tsan=True)


def test_tsan_finds_no_race_in_any_kernel(harness_lib, tsan_exe, rng):
    dev = cudahost.RecordingDevice(harness_lib, cudahost.SMALL)
    be = cudahost.backend(dev)
    for dtype in DTYPES:
        x, t, b = random_layer(rng, dtype, 2, 3, 9, 8, 3, 3, 2)         # tiled, 2 channel chunks
        h, idx = be.match_switch_pool(x, t, b, pooled(x, t, 1, 2, 1), 0.1)
        sw = (rng.random(h.shape) < 0.7).astype(dtype)
        units = at_units((9, 8), t, 1, h)
        be.render(h, idx, t, units, sw)
        be.template_stats(x, h, idx, units, sw, True)
        be.match_at(x, t, idx, units, sw)
        be.match_at(x, t, idx, units, None)
        x, t, b = random_layer(rng, dtype, 1, 1, 8, 8, 2, 6, 6)         # direct fallbacks
        h, idx = be.match_switch_pool(x, t, b, pooled(x, t, 0, 2, 2), 0.0)
        be.render(h, idx, t, at_units((8, 8), t, 0, h), None)
    kernels = {name.split("<")[0] for name, _, _ in dev.launches}
    assert kernels == {k for ks in launch.SOURCES.values() for k in ks}
    with tempfile.TemporaryDirectory() as d:
        rc, err, outs = dev.replay(tsan_exe, d)
    assert "ThreadSanitizer" not in err and rc == 0, err[-4000:]
    for host, replayed in zip(dev.buffers, outs):  # the replay computed the same results
        np.testing.assert_allclose(replayed, host, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sync", [True, False])
def test_tsan_catches_a_missing_syncthreads(harness_lib, tsan_exe, sync):
    dev = cudahost.RecordingDevice(harness_lib, cudahost.SMALL)
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    dev.launch(f"neighbour_sum<{'true' if sync else 'false'}>", (2, 1, 1), (32, 1, 1), (x, out))
    with tempfile.TemporaryDirectory() as d:
        rc, err, _ = dev.replay(tsan_exe, d)
    if sync:
        assert rc == 0 and "ThreadSanitizer" not in err, err[-4000:]
    else:
        assert rc != 0 and "WARNING: ThreadSanitizer: data race" in err


# ---------------------------------------------------------------- real GPU only


@pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA GPU (none here)")
def test_cupy_arrays_in_and_out_without_copies(rng):
    import cupy

    x = cupy.asarray(rng.standard_normal((2, 3, 9, 8)).astype(np.float32))
    t = cupy.asarray(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    b = cupy.zeros(4, np.float32)
    be = _backends.load("cupy")
    assert be.asarray(x).data.ptr == x.data.ptr
    assert be.ascontiguousarray(x, np.float32).data.ptr == x.data.ptr
    h, idx = ops.match_switch_pool(x, t, b, padding=1)   # auto -> cupy
    assert isinstance(h, cupy.ndarray) and h.device == x.device and h.dtype == np.float32
    r = ops.render(h, idx, t, (9, 8), padding=1)
    assert isinstance(r, cupy.ndarray)
    with pytest.raises(TypeError, match="host array"):
        ops.match_switch_pool(cupy.asnumpy(x), t, b, backend="cupy")
