"""Python side of the CUDA-on-CPU harness (tests/cuda_harness/): build the .cu kernels with
g++ into a shared library, cached per source hash, and launch them through ctypes with the
grid, block and arguments that the cupy backend computes (kernels/cuda/launch.py).

``HostDevice`` implements launch.py's device interface on NumPy arrays; ``backend(dev)`` is a
module-like object with the five backend functions, registered by the tests as a host
backend (``fastdrmm._backends.register``) so that ``fastdrmm.ops`` validates the arguments
exactly as for every backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

from fastdrmm.kernels.cuda import launch

HERE = pathlib.Path(__file__).resolve().parent / "cuda_harness"
KERNEL_DIR = pathlib.Path(str(importlib.resources.files("fastdrmm.kernels.cuda")))
TEST_KERNELS = ["neighbour_sum<true>", "neighbour_sum<false>"]

# Small blocks and small shared caps: tiny grids still cross tiles, channel chunks and the
# direct fallbacks. The GPU configuration (launch.GPU) is exercised by one test too.
SMALL = launch.Config(threads=32, kb=2, xs_cap=192, ws_cap=48, zs_cap=96)


def name_expressions():
    return [e for f in launch.SOURCES for e in launch.name_expressions(f)] + TEST_KERNELS


def symbol(name_expr):
    return "fd_" + hashlib.sha1(name_expr.encode()).hexdigest()[:12]


def _cpp():
    lines = ["#include <map>", "#include <string>"]
    lines += [f'#include "{f}"' for f in launch.SOURCES] + ['#include "racy.cu"']
    lines += [f"CUDA_HOST_EXPORT({symbol(e)}, {e})" for e in name_expressions()]
    lines += ["using Entry = void (*)(unsigned, unsigned, unsigned, unsigned, unsigned, "
              "unsigned, void**);",
              "const std::map<std::string, Entry>& cuda_host_entries() {",
              "    static const std::map<std::string, Entry> table{"]
    lines += [f'        {{"{symbol(e)}", &{symbol(e)}}},' for e in name_expressions()]
    lines += ["    };", "    return table;", "}"]
    return "\n".join(lines) + "\n"


def compiler():
    return shutil.which(os.environ.get("CXX", "g++"))


def build(cfg=SMALL, tsan=False):
    """Path of the harness library for this configuration (built once, cached by hash); with
    ``tsan`` the ThreadSanitizer replay executable (cuda_harness/replay.cpp) instead."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("the CUDA host harness needs g++ (C++20)")
    flags = ["-std=c++20", "-pthread", "-fvisibility=hidden", "-fno-gnu-unique", *cfg.defines()]
    flags += ["-O1", "-g", "-fsanitize=thread"] if tsan else ["-O1", "-shared", "-fPIC"]
    cpp = _cpp()
    digest = hashlib.sha1()
    for part in [cpp, " ".join(flags), (HERE / "cuda_host.h").read_text(),
                 (HERE / "racy.cu").read_text(), (HERE / "replay.cpp").read_text()]:
        digest.update(part.encode())
    for f in sorted(KERNEL_DIR.glob("*.cu*")):
        digest.update(f.read_bytes())
    out_dir = pathlib.Path(tempfile.gettempdir()) / "fastdrmm-cuda-harness"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"harness-{digest.hexdigest()[:16]}{'.tsan' if tsan else '.so'}"
    if lib.exists():
        return lib
    src = out_dir / f"harness-{digest.hexdigest()[:16]}-{os.getpid()}.cpp"
    src.write_text(cpp)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, *flags, "-include", str(HERE / "cuda_host.h"), "-I", str(KERNEL_DIR),
           "-I", str(HERE), str(src), *([str(HERE / "replay.cpp")] if tsan else []),
           "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    src.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"harness build failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, lib)
    return lib


_CTYPE = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.float32): ctypes.c_float,
          np.dtype(np.float64): ctypes.c_double}


class HostDevice:
    """launch.py's device interface on the host: NumPy arrays, kernels via ctypes."""

    def __init__(self, lib_path, cfg=SMALL):
        self.lib = ctypes.CDLL(str(lib_path))
        self.cfg = cfg
        self.launches = []

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype=dtype)

    @staticmethod
    def zeros(shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def launch(self, name_expr, grid, block, args):
        holders = []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous, "kernels take C-contiguous arrays"
                holders.append(ctypes.c_void_p(a.ctypes.data))
            else:
                holders.append(_CTYPE[np.dtype(type(a))](a))
        argv = (ctypes.c_void_p * max(1, len(holders)))(
            *[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        fn = getattr(self.lib, symbol(name_expr))
        fn.restype = None
        grid = tuple(int(g) for g in grid)
        block = tuple(int(b) for b in block)
        self.launches.append((name_expr, grid, block))
        fn(*(ctypes.c_uint(v) for v in (*grid, *block)), argv)


class RecordingDevice(HostDevice):
    """Runs like HostDevice and records every launch, with the bytes of each buffer as it
    was when a launch first saw it, for the TSan replay executable."""

    def __init__(self, lib_path, cfg=SMALL):
        super().__init__(lib_path, cfg)
        self.buffers = []      # arrays, in order of first use
        self.initial = []      # their bytes then
        self.records = []

    def _buffer(self, arr):
        for i, b in enumerate(self.buffers):
            if b is arr:
                return i
        self.buffers.append(arr)
        self.initial.append(arr.tobytes())
        return len(self.buffers) - 1

    def launch(self, name_expr, grid, block, args):
        words = []
        for a in args:
            if isinstance(a, np.ndarray):
                words.append(f"p {self._buffer(a)}")
            else:
                kind = {np.dtype(np.int32): "i", np.dtype(np.float32): "f",
                        np.dtype(np.float64): "d"}[np.dtype(type(a))]
                words.append(f"{kind} {float(a)!r}" if kind != "i" else f"i {int(a)}")
        self.records.append(f"launch {symbol(name_expr)} {' '.join(map(str, grid))} "
                            f"{' '.join(map(str, block))} {len(words)} {' '.join(words)}")
        super().launch(name_expr, grid, block, args)

    def replay(self, exe, directory):
        """Replay under TSan: (returncode, stderr, [buffers after the replay])."""
        directory = pathlib.Path(directory)
        head = []
        for i, data in enumerate(self.initial):
            (directory / f"buf{i}.bin").write_bytes(data)
            head.append(f"buffer {i} {len(data)}")
        (directory / "launches.txt").write_text("\n".join(head + self.records) + "\n")
        env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66")
        proc = subprocess.run([str(exe), str(directory)], capture_output=True, text=True,
                              env=env, timeout=300)
        outs = []
        for i, b in enumerate(self.buffers):
            path = directory / f"out{i}.bin"
            outs.append(np.frombuffer(path.read_bytes(), dtype=b.dtype).reshape(b.shape)
                        if path.exists() else None)
        return proc.returncode, proc.stderr, outs


class HarnessBackend:
    """A backend module in all but name: the five functions of the backend contract
    (``fastdrmm._backends.CONTRACT``), running launch.py's drivers on ``dev`` with its
    configuration."""

    def __init__(self, dev):
        self.dev = dev

    def match_switch_pool(self, x, templates, bias, geometry, leak):
        return launch.match_switch_pool(self.dev, x, templates, bias, geometry, leak,
                                        self.dev.cfg)

    def match_at(self, x, templates, idx, geometry, switches):
        return launch.match_at(self.dev, x, templates, idx, geometry, switches, self.dev.cfg)

    def unpool(self, code, idx, plane_shape, switches):
        return launch.unpool(self.dev, code, idx, tuple(plane_shape), switches, self.dev.cfg)

    def render(self, code, idx, templates, geometry, switches):
        return launch.render(self.dev, code, idx, templates, geometry, switches, self.dev.cfg)

    def template_stats(self, x, code, idx, geometry, switches, gram):
        return launch.template_stats(self.dev, x, code, idx, geometry, switches, gram,
                                     self.dev.cfg)


def backend(dev):
    """The harness backend on ``dev`` (register it with ``fastdrmm._backends.register``)."""
    return HarnessBackend(dev)
