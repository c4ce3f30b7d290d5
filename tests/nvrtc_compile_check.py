"""Compile every CUDA C source of the cupy backend through NVRTC for real GPUs, without one.

NVRTC (``cuda.bindings.nvrtc``, from the ``cuda-bindings`` package plus the NVRTC library
wheel ``nvidia-cuda-nvrtc``) needs no driver. Each source is compiled to CUBIN for every
architecture with the loader's own source text, options and name expressions, plus ptxas'
verbose report, and the report is parsed into a table per kernel x architecture x dtype:
registers, shared memory, stack frame, spill bytes. Any compile error or spill fails.

    python tests/nvrtc_compile_check.py          # prints the table, exit status 1 on failure
"""

from __future__ import annotations

import re
import sys

from fastdrmm.kernels.cuda import launch, loader

ARCHS = ("sm_80", "sm_90")
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def _check(result, what):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


def compile_source(filename, arch, cfg=launch.GPU):
    """(ok, log, {name_expression: lowered name}, cubin size) for one source and arch."""
    from cuda.bindings import nvrtc

    exprs = launch.name_expressions(filename)
    prog = _check(nvrtc.nvrtcCreateProgram(loader.source(filename).encode(),
                                           filename.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for e in exprs:
            _check(nvrtc.nvrtcAddNameExpression(prog, e.encode()), "nvrtcAddNameExpression")
        opts = [o.encode() for o in (*launch.compile_options(cfg), f"--gpu-architecture={arch}",
                                     "--ptxas-options=-v")]
        res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        log = log.rstrip(b"\x00 ").decode(errors="replace")
        if int(res[0]) != 0:
            return False, log, {}, 0
        lowered = {e: _check(nvrtc.nvrtcGetLoweredName(prog, e.encode()),
                             "nvrtcGetLoweredName").decode() for e in exprs}
        cubin = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        return True, log, lowered, cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def parse_ptxas(log):
    """{(mangled name, arch): {registers, smem, stack, spill_stores, spill_loads}}."""
    out, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            out[current] = {"registers": None, "smem": 0, "stack": None,
                            "spill_stores": None, "spill_loads": None}
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            out[current].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


def run(archs=ARCHS, cfg=launch.GPU, stream=sys.stdout):
    """Compile all; print the table; return (rows, problems)."""
    rows, problems = [], []
    for filename in launch.SOURCES:
        for arch in archs:
            ok, log, lowered, cubin = compile_source(filename, arch, cfg)
            if not ok:
                problems.append(f"{filename} for {arch}: compile error\n{log}")
                continue
            info = parse_ptxas(log)
            for expr, mangled in lowered.items():
                rec = info.get((mangled, arch))
                if rec is None or rec["registers"] is None or rec["stack"] is None:
                    problems.append(f"{expr} for {arch}: no ptxas resource report")
                    continue
                rows.append((expr, arch, rec))
                if rec["spill_stores"] or rec["spill_loads"]:
                    problems.append(f"{expr} for {arch}: spills {rec['spill_stores']} bytes "
                                    f"stores / {rec['spill_loads']} bytes loads")
    print(f"NVRTC compile check ({' '.join(launch.compile_options(cfg))})", file=stream)
    print(f"{'kernel':<28}{'arch':<7}{'regs':>5}{'smem B':>8}{'stack B':>8}{'spill B':>9}",
          file=stream)
    for expr, arch, rec in rows:
        spill = rec["spill_stores"] + rec["spill_loads"]
        print(f"{expr:<28}{arch:<7}{rec['registers']:>5}{rec['smem']:>8}{rec['stack']:>8}"
              f"{spill:>9}", file=stream)
    for p in problems:
        print("FAIL:", p, file=stream)
    return rows, problems


def main():
    _, problems = run()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
