"""The numba-cuda backend: every op, both dtypes, against the oracles; device-array plumbing;
the compile/resource check for sm_80 and sm_90.

Without a GPU, tests/conftest.py turns on the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) and these
same tests run the kernels on the CPU with tiny blocks (the simulator costs milliseconds per
block barrier, so shapes are tiny and the launch config is patched small). With a GPU they run
for real. Nothing here skips on a machine with numba-cuda installed.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import match_at_checks as mac
import naive
import runners
from checks import (DTYPES, assert_pooling_matches, check_match_geometry,
                    check_match_nan_and_inf, check_match_ties, check_render_adjoint_of_matching,
                    check_template_stats, check_unpool_and_render, tol)
from fastdrmm import _backends, ops
from scenarios import (MATCH_GEOMETRIES, RENDER_GEOMETRIES, ROW_SHAPES, SWITCH_KINDS, latents,
                       random_layer)

pytest.importorskip("numba_cuda", reason="the numba-cuda backend needs the numba-cuda package")
from numba import cuda  # noqa: E402

from fastdrmm.kernels import numba_cuda as nc  # noqa: E402
from fastdrmm.kernels.numba_cuda import config  # noqa: E402

B = "numba-cuda"
SMALL = runners.NUMBA_CUDA_SMALL  # the op tests' settings too
# several tiles per plane and template groups per block (tiling boundaries) ...
MULTI_TILE = {**SMALL, "k_block": 2, "tile": (2, 3), "threads": 4}
# ... and capacities too small for any tile: the direct (global memory) kernels
DIRECT = {**SMALL, "x_smem": 2, "w_smem": 2, "z_smem": 2}
CONFIGS = {"small": SMALL, "multi_tile": MULTI_TILE, "direct": DIRECT}


@pytest.fixture(autouse=True)
def small_launch(monkeypatch):
    for key, value in SMALL.items():
        monkeypatch.setitem(config.LAUNCH, key, value)


def use(monkeypatch, name):
    for key, value in CONFIGS[name].items():
        monkeypatch.setitem(config.LAUNCH, key, value)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    assert nc.arrays.is_device_array(a), f"expected a numba device array, got {type(a)}"
    return a.copy_to_host()


# fastdrmm.ops.<name> on this backend, host arrays in and out (device arrays on the way)
device_run = runners.runner(B)
device_match = functools.partial(device_run, "match_switch_pool")


# ------------------------------------------------------------------------- matching
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", MATCH_GEOMETRIES)
def test_match_matches_oracles(dtype, geom, rng):
    check_match_geometry(device_match, rng, dtype, geom)


@pytest.mark.parametrize("launch", ["multi_tile", "direct"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", [MATCH_GEOMETRIES[0], MATCH_GEOMETRIES[2]])
def test_match_tiling_and_direct_kernels(launch, dtype, geom, rng, monkeypatch):
    use(monkeypatch, launch)
    check_match_geometry(device_match, rng, dtype, geom)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_first_position(dtype, rng):
    check_match_ties(device_match, rng, dtype, shape=(1, 2, 5, 6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_nan_and_inf_propagate(dtype, leak, rng):
    check_match_nan_and_inf(device_match, rng, dtype, leak, size=7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_match_non_contiguous_views_and_casts(dtype, rng):
    big = rng.standard_normal((3, 8, 14, 16))
    x = cuda.to_device(big.astype(dtype))[::2, 1::3, ::2, 1::2]  # strided device view
    t_big = rng.standard_normal((3, 5, 3, 4))                     # float64 templates
    templates = cuda.to_device(np.ascontiguousarray(np.moveaxis(t_big, 0, 1)))[:, :3, :, :3]
    bias = cuda.to_device(rng.standard_normal(10))[::2]
    assert not x.is_c_contiguous() and not templates.is_c_contiguous()
    h, idx = ops.match_switch_pool(x, templates, bias, padding=1, pool=2, backend=B)
    assert h.dtype == dtype
    xh = big.astype(dtype)[::2, 1::3, ::2, 1::2]
    th = np.moveaxis(t_big, 0, 1)[:, :3, :, :3].astype(dtype)
    want = ops.match_switch_pool(xh, th, host(bias).astype(dtype), padding=1, pool=2,
                                 backend="numpy")
    assert_pooling_matches(host(h), host(idx), xh, th, host(bias), padding=(1, 1), pool=(2, 2),
                           dtype=dtype)
    np.testing.assert_array_equal(host(idx)[want[0] != 0], want[1][want[0] != 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    h, idx = ops.match_switch_pool(dev(np.zeros((0, 2, 6, 6), dtype)),
                                   dev(np.ones((3, 2, 3, 3), dtype)), dev(np.zeros(3, dtype)),
                                   backend=B)
    assert h.shape == (0, 3, 2, 2) and idx.shape == (0, 3, 2, 2)
    assert h.dtype == dtype and idx.dtype == np.int32
    code, idx = dev(np.zeros((0, 3, 2, 2), dtype)), dev(np.zeros((0, 3, 2, 2), np.int32))
    assert ops.unpool(code, idx, (4, 4), backend=B).shape == (0, 3, 4, 4)
    r = ops.render(code, idx, dev(np.ones((3, 2, 3, 3), dtype)), (6, 6), backend=B)
    assert r.shape == (0, 2, 6, 6) and r.dtype == dtype
    big_b, s, big_g = ops.template_stats(dev(np.zeros((0, 2, 6, 6), dtype)), code, idx, (3, 3),
                                         backend=B)
    assert (host(big_b) == 0).all() and (host(s) == 0).all() and (host(big_g) == 0).all()
    assert big_g.shape == (27, 27) and big_b.dtype == dtype
    z = ops.match_at(dev(np.zeros((0, 2, 6, 6), dtype)), dev(np.ones((3, 2, 3, 3), dtype)), idx,
                     backend=B)
    assert z.shape == (0, 3, 2, 2) and z.dtype == dtype


# ------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gi", range(len(RENDER_GEOMETRIES)))
def test_unpool_and_render_match_naive(dtype, gi, rng):
    geom = RENDER_GEOMETRIES[gi]
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    check_unpool_and_render(device_run, dtype, geom, code, idx, templates,
                            switches if gi % 2 else None)


@pytest.mark.parametrize("launch", ["multi_tile", "direct"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_render_tiling_and_direct_kernels(launch, dtype, rng, monkeypatch):
    use(monkeypatch, launch)
    geom = RENDER_GEOMETRIES[0]
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    r = ops.render(dev(code), dev(idx), dev(templates), (9, 8), padding=1,
                   switches=dev(switches), backend=B)
    want = naive.render(code, idx, templates, (9, 8), 1, switches)
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(host(r), want, rtol=rtol, atol=atol * 10)


def test_unpool_sums_collisions():
    code = dev(np.array([[[[1.0, 2.0, 4.0]]]]))
    idx = dev(np.array([[[[1, 1, 3]]]], dtype=np.int32))
    np.testing.assert_array_equal(host(ops.unpool(code, idx, (1, 4), backend=B)),
                                  [[[[0.0, 3.0, 0.0, 4.0]]]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gi", [0, 1, 6])
def test_render_is_the_adjoint_of_matching(dtype, gi, rng):
    """<match(x) at the fixed latents, code> == <x, render(code)>, both on the device."""
    check_render_adjoint_of_matching(device_run, rng, dtype, RENDER_GEOMETRIES[gi])


@pytest.mark.parametrize("dtype", DTYPES)
def test_render_non_contiguous_int64_idx_and_bool_switches(dtype, rng):
    geom = RENDER_GEOMETRIES[0]
    _, templates, code, idx, switches = latents(rng, dtype, geom)
    t_dev = cuda.to_device(np.ascontiguousarray(templates.transpose(1, 0, 2, 3)))
    t_view = t_dev.transpose((1, 0, 2, 3))
    assert not t_view.is_c_contiguous()
    code_view = cuda.to_device(np.repeat(code, 2, axis=3))[:, :, :, ::2]
    got = ops.render(code_view, dev(idx.astype(np.int64)), t_view, (9, 8), padding=1,
                     switches=dev(switches), backend=B)
    want = ops.render(dev(code), dev(idx), dev(templates), (9, 8), padding=1,
                      switches=dev(switches.astype(dtype)), backend=B)
    np.testing.assert_array_equal(host(got), host(want))


def test_nan_in_code_stays_local():
    code = np.zeros((1, 1, 2, 2))
    code[0, 0, 0, 0] = np.nan
    idx = np.array([[[[0, 2], [8, 10]]]], dtype=np.int32)
    r = host(ops.render(dev(code), dev(idx), dev(np.ones((1, 1, 2, 2))), (5, 5), backend=B))
    assert np.isnan(r[0, 0, :2, :2]).all()
    assert np.isfinite(r[0, 0, 2:, :]).all() and np.isfinite(r[0, 0, :, 2:]).all()


# ------------------------------------------------------------------------- match_at
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
@pytest.mark.parametrize("switch_kind", SWITCH_KINDS)
def test_match_at_matches_naive(dtype, geom, switch_kind, rng):
    mac.check_geometry(device_run, rng, dtype, geom, switch_kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, kw", ROW_SHAPES)
def test_match_at_any_positions_and_row_lengths(dtype, c, kw, rng):
    mac.check_any_positions(device_run, rng, dtype, c, kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, kw", [(1, 5), (20, 3)])
def test_match_at_nan_and_inf_stay_in_their_patches(dtype, c, kw, rng):
    mac.check_nan_and_inf(device_run, rng, dtype, c, kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_match_at_zeros_and_ties(dtype, rng):
    mac.check_zeros_and_ties(device_run, rng, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gi", [0, 1, 6])
def test_match_at_is_the_adjoint_of_render(dtype, gi, rng):
    mac.check_adjoint_of_render(device_run, rng, dtype, RENDER_GEOMETRIES[gi])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gi", [0, 2])
def test_match_at_is_the_full_matching_gathered(dtype, gi, rng):
    mac.check_full_matching_gathered(device_run, rng, dtype, RENDER_GEOMETRIES[gi])


@pytest.mark.parametrize("threads", [4, 64])
def test_match_at_grid_stride_and_idle_threads(threads, rng, monkeypatch):
    """Fewer threads in the (capped) grid than units, so threads loop; and more, so some
    threads have no unit at all."""
    monkeypatch.setitem(config.LAUNCH, "threads", threads)
    geom = RENDER_GEOMETRIES[0]  # 2 * 4 * 4 * 4 = 128 units
    units = 128
    assert (threads * SMALL["max_blocks"] < units) == (threads == 4)
    mac.check_geometry(device_run, rng, np.float64, geom, "real")


@pytest.mark.parametrize("dtype", DTYPES)
def test_match_at_non_contiguous_device_views(dtype, rng):
    """Strided device views, a transposed template view, strided int64 idx and bool switches:
    converted on the device (ascontiguousarray), equal to the contiguous call bit for bit."""
    big = rng.standard_normal((3, 8, 20, 22)).astype(dtype)
    t_host = rng.standard_normal((4, 3, 2, 3)).astype(dtype)
    idx_big = rng.integers(0, 11 * 11, (2, 4, 5, 6)).astype(np.int64)
    sw_big = rng.random((2, 4, 6, 6)) < 0.5
    x = cuda.to_device(big)[::2, 1::3, ::2, 1::2]
    templates = cuda.to_device(np.ascontiguousarray(t_host.transpose(0, 1, 3, 2)))
    templates = templates.transpose((0, 1, 3, 2))
    idx = cuda.to_device(idx_big)[:, :, ::2, ::2]
    switches = cuda.to_device(sw_big)[:, :, ::2, 1::2]
    assert not any(a.is_c_contiguous() for a in (x, templates, idx, switches))
    got = host(ops.match_at(x, templates, idx, padding=1, switches=switches, backend=B))
    xh, ih, sh = (big[::2, 1::3, ::2, 1::2], idx_big[:, :, ::2, ::2], sw_big[:, :, ::2, 1::2])
    want = device_run("match_at", xh, t_host, ih, padding=1, switches=sh)
    np.testing.assert_array_equal(got, want)
    mac.check_match_at(device_run, dtype, xh, t_host, ih, 1, sh)


# ------------------------------------------------------------------------- statistics
STATS_GEOMETRIES = [  # K*kh*kw kept small: G takes one block per upper-triangle entry
    (2, 2, 6, 5, 2, 2, 2, 1, 2, None),
    (1, 2, 7, 6, 1, 3, 2, 0, 3, 1),          # overlapping windows: collisions summed first
    (2, 1, 7, 8, 2, 1, 3, 2, (2, 1), (3, 2)),  # gaps, padding > kernel - 1
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gi", range(len(STATS_GEOMETRIES)))
def test_stats_match_naive(dtype, gi, rng):
    geom = STATS_GEOMETRIES[gi]
    x, _, code, idx, switches = latents(rng, dtype, geom)
    check_template_stats(device_run, dtype, geom, x, code, idx, switches if gi != 0 else None)


def test_stats_with_more_threads_than_a_warp(monkeypatch, rng):
    """The two-level block sum with threads > 32 and not a multiple of 32."""
    monkeypatch.setitem(config.LAUNCH, "threads", 40)
    x, _, code, idx, switches = latents(rng, np.float64, STATS_GEOMETRIES[1])
    big_b, s, big_g = ops.template_stats(dev(x), dev(code), dev(idx), (3, 2),
                                         switches=dev(switches), backend=B)
    want_b, want_s, want_g = naive.template_stats(x, code, idx, (3, 2), 0, switches)
    np.testing.assert_allclose(host(big_b), want_b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(host(s), want_s, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(host(big_g), want_g, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------- plumbing
def test_results_are_device_arrays_on_the_device(rng):
    x, templates, bias = random_layer(rng, np.float32, 1, 1, 5, 5, 1, 2, 2)
    h, idx = ops.match_switch_pool(dev(x), dev(templates), dev(bias), backend=B)
    assert nc.arrays.is_device_array(h) and nc.arrays.is_device_array(idx)
    assert h.dtype == np.float32 and idx.dtype == np.int32
    if not nc.SIMULATOR:
        assert "data" in h.__cuda_array_interface__
    # "auto" sends device arrays to a GPU backend, never to the host ones
    name = _backends.resolve("auto", (h,))[0] if _has_gpu_backend() else "numba-cuda"
    assert name in ("numba-cuda", "cupy")


def _has_gpu_backend():
    """resolve("auto") imports cupy when it is installed; CuPy needs a real GPU."""
    import importlib.util

    return importlib.util.find_spec("cupy") is None or not nc.SIMULATOR


def _pointer(arr):
    if nc.SIMULATOR:
        return arr._ary.__array_interface__["data"][0]
    return arr.__cuda_array_interface__["data"][0]


def test_asarray_and_ascontiguousarray_do_not_copy(rng):
    a = dev(rng.standard_normal((2, 3, 4, 5)))
    assert _pointer(nc.asarray(a)) == _pointer(a)
    assert nc.ascontiguousarray(a, np.float64) is a
    view = a[:, 1:, :, ::2]
    conv = nc.ascontiguousarray(view, np.float32)
    assert conv.is_c_contiguous() and conv.dtype == np.float32
    np.testing.assert_array_equal(host(conv), host(a)[:, 1:, :, ::2].astype(np.float32))
    if not nc.SIMULATOR:
        class Foreign:  # any producer of __cuda_array_interface__ (CuPy, PyTorch, ...)
            def __init__(self, arr):
                self.__cuda_array_interface__ = arr.__cuda_array_interface__

        wrapped = nc.asarray(Foreign(a))
        assert _pointer(wrapped) == _pointer(a) and wrapped.shape == a.shape
    else:
        with pytest.raises(TypeError, match="simulator"):
            nc.asarray(type("Foreign", (), {"__cuda_array_interface__": {}})())


def test_dlpack_descriptor_views_without_copy():
    """The DLPack parser (used for CUDA producers) on a host capsule: pointer/strides/dtype."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[1:, ::2]
    desc, device, owner = nc.arrays.dlpack_descriptor(view.__dlpack__())
    assert device == 1  # kDLCPU
    assert desc["data"][0] == view.__array_interface__["data"][0]
    assert desc["shape"] == (3, 3) and desc["strides"] == view.strides
    assert np.dtype(desc["typestr"]) == np.float32
    del owner


def test_index_range_and_out_of_range_idx(rng):
    idx = dev(np.array([[[[3, 7], [0, 5]]]], dtype=np.int32))
    assert nc.index_range(idx) == (0, 7)
    wide = cuda.to_device(np.array([[-4, 2 ** 40, 9]], dtype=np.int64))[:, ::2]
    assert nc.index_range(wide) == (-4, 9)
    with pytest.raises(ValueError, match="idx out of range"):
        ops.unpool(dev(np.ones((1, 1, 2, 2))), dev(np.array([[[[0, 1], [2, 9]]]], np.int32)),
                   (3, 3), backend=B)


def test_host_arrays_are_refused(rng):
    x, templates, bias = random_layer(rng, np.float64, 1, 1, 5, 5, 1, 2, 2)
    with pytest.raises(TypeError, match="x is a host array"):
        ops.match_switch_pool(x, templates, bias, backend=B)
    with pytest.raises(TypeError, match="templates is a host array"):
        ops.match_switch_pool(dev(x), templates, dev(bias), backend=B)
    with pytest.raises(TypeError, match="lives on a GPU"):
        ops.match_switch_pool(dev(x), dev(templates), dev(bias), backend="numpy")


# ------------------------------------------------------------------------- real GPUs
def test_kernels_compile_for_sm80_and_sm90_without_spills():
    """compile_ptx (NVVM) + nvJitLink/ptxas of every kernel, cc 8.0 and 9.0, both dtypes."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    script = Path(__file__).with_name("numba_cuda_compile_check.py")
    proc = subprocess.run([sys.executable, str(script), "--arch", "80", "90"], env=env,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("match", "render",
                                                                          "unpool", "stats"))]
    assert len(rows) == 8 * 2 * 2
    assert all(line.split()[-1].startswith("0/0") for line in rows)
