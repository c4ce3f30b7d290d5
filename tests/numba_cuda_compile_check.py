"""Compile every numba-cuda kernel for real GPUs (no GPU needed) and report its resources.

    python tests/numba_cuda_compile_check.py [--arch 80 90]

For each kernel x compute capability x dtype: ``numba.cuda.compile_ptx`` (NVVM), then the PTX
is assembled to SASS by nvJitLink (``-verbose``; the nvJitLink of the same CUDA release as
NVVM, from the ``numba-cuda[cu13]`` wheels, so it reads the PTX ISA version NVVM emits; the
system ``ptxas -v`` is used instead when nvJitLink is missing). Prints a table of registers,
static shared memory, stack, local memory and spill bytes; exits 1 on any compile error, any
spill, static shared memory over 48 KiB, or
registers x threads per block over the 64K register file (the launch would fail). Must run WITHOUT ``NUMBA_ENABLE_CUDASIM``.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    sys.exit("numba_cuda_compile_check: unset NUMBA_ENABLE_CUDASIM (the simulator cannot compile)")

from numba import cuda, types  # noqa: E402

from fastdrmm.kernels.numba_cuda import _common, arrays, config, matching, rendering, statistics  # noqa: E402,E501

STATIC_SMEM_LIMIT = 48 * 1024


def kernels(dtype, cfg):
    """(name, python function, signature) of every kernel the backend launches."""
    out = []
    for module in (matching, rendering, statistics):
        for name, factory in module.KERNELS.items():
            out.append((name, *factory(dtype, cfg)))
    out.append(("fill", *_common.fill_source(dtype, cfg)))
    nbt = _common.nb_type(dtype)
    out.append(("copy4_strided", arrays.COPY_KERNELS[4].py_func,
                types.void(types.float64[:, :, :, :], nbt[:, :, :, ::1])))
    idx_t = types.int32 if dtype == np.float32 else types.int64  # one int width per dtype row
    out.append(("index_range", *arrays._range_source(np.dtype(idx_t.name), cfg)))
    return out


def assemble(ptx, arch):
    """(resource dict, log) of PTX assembled for sm_<arch>."""
    try:
        from cuda.bindings import nvjitlink
    except ImportError:
        nvjitlink = None
    if nvjitlink is not None:
        data = ptx.encode()
        handle = nvjitlink.create(2, [f"-arch=sm_{arch}", "-verbose"])
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
            failed = None
            try:
                nvjitlink.complete(handle)
            except Exception as exc:  # the error log says why
                failed = exc
            size = nvjitlink.get_info_log_size(handle)
            info = bytearray(size)
            nvjitlink.get_info_log(handle, info)
            size = nvjitlink.get_error_log_size(handle)
            err = bytearray(size)
            nvjitlink.get_error_log(handle, err)
            log = info.decode(errors="replace") + err.decode(errors="replace")
            if failed is not None:
                raise RuntimeError(f"nvJitLink failed: {failed}\n{log}")
        finally:
            nvjitlink.destroy(handle)
    else:
        ptxas = shutil.which("ptxas")
        if ptxas is None:
            raise RuntimeError("neither nvJitLink (cuda-bindings + nvidia-nvjitlink) nor ptxas")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}", path, "-o",
                                   os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
            log = proc.stdout + proc.stderr
            if proc.returncode:
                raise RuntimeError(f"ptxas failed:\n{log}")
    return parse(log), log


def parse(log):
    res = {"regs": None, "smem": 0, "stack": 0, "lmem": 0, "spill_st": 0, "spill_ld": 0}
    m = re.search(r"[Uu]sed (\d+) registers", log)
    if m:
        res["regs"] = int(m.group(1))
    for key, pat in (("smem", r"(\d+) bytes smem"), ("stack", r"(\d+) bytes stack frame"),
                     ("lmem", r"(\d+) bytes lmem"), ("spill_st", r"(\d+) bytes spill stores"),
                     ("spill_ld", r"(\d+) bytes spill loads")):
        vals = [int(v) for v in re.findall(pat, log)]
        if vals:
            res[key] = max(vals)
    if res["stack"] == 0:
        m = re.search(r"(\d+) stack,", log)
        res["stack"] = int(m.group(1)) if m else 0
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[80, 90])
    args = parser.parse_args(argv)
    cfg = config.snapshot()
    print(f"launch config: {config.LAUNCH}")
    header = f"{'kernel':<16} {'arch':<6} {'dtype':<8} {'regs':>5} {'smem B':>7} {'stack B':>7} " \
             f"{'lmem B':>7} {'spill st/ld B':>14}"
    print(header)
    print("-" * len(header))
    failures = []
    for arch in args.arch:
        cc = (arch // 10, arch % 10)
        for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
            for name, pyfunc, sig in kernels(dtype, cfg):
                try:
                    ptx, _ = cuda.compile_ptx(pyfunc, sig, cc=cc)
                    res, _ = assemble(ptx, arch)
                except Exception as exc:
                    failures.append(f"{name} sm_{arch} {dtype}: {exc}")
                    print(f"{name:<16} sm_{arch:<3} {dtype.name:<8} COMPILE ERROR")
                    continue
                spill = res["spill_st"] + res["spill_ld"]
                print(f"{name:<16} sm_{arch:<3} {dtype.name:<8} {res['regs']!s:>5} "
                      f"{res['smem']:>7} {res['stack']:>7} {res['lmem']:>7} "
                      f"{res['spill_st']:>7}/{res['spill_ld']:<6}")
                if spill:
                    failures.append(f"{name} sm_{arch} {dtype}: {spill} spill bytes")
                if res["smem"] > STATIC_SMEM_LIMIT:
                    failures.append(f"{name} sm_{arch} {dtype}: {res['smem']} B static smem")
                if res["regs"] is not None and res["regs"] * cfg.threads > 65536:
                    failures.append(f"{name} sm_{arch} {dtype}: {res['regs']} registers x "
                                    f"{cfg.threads} threads exceed the 64K register file")
                if res["regs"] is None:
                    failures.append(f"{name} sm_{arch} {dtype}: no resource report")
    for f in failures:
        print("FAIL:", f)
    print("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
