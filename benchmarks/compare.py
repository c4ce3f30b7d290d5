"""Side-by-side timings of fastdrmm's ops against PyTorch CPU (and the numpy backend).

Usage::

    python benchmarks/compare.py                       # all shapes, batch 64 and 256, float32
    python benchmarks/compare.py --batch 256 --shapes l1,l3 --repeats 5
    python benchmarks/compare.py --dtype float64 --with-numpy --json out.json --markdown out.md
    python benchmarks/compare.py --drmm-step --drmm-only --batch 64,256   # full EG step only

One process, the same inputs for every contender (PyTorch gets zero-copy ``torch.from_numpy``
views of the very arrays fastdrmm gets), ``--copies`` pre-generated input sets rotated between
calls so no contender times a cache-hot repeat of one input. Each timing is the median of
``--repeats`` calls after ``--warmup`` calls; the first call of each op on each shape is timed
on its own and reported as ``first call`` (JIT compilation, or loading from Numba's on-disk
cache when it is warm, is in that column and nowhere else).

Contenders (``padding`` p, non-overlapping pooling ``pool``, ``leak`` of the switch):

* ``match_switch_pool`` (cpu backend) vs ``conv2d -> leaky_relu -> max_pool2d(return_indices)``
  and, with ``--with-numpy``, vs fastdrmm's own ``numpy`` backend (slow: 50-100x);
* ``render`` (cpu) vs ``max_unpool2d -> conv_transpose2d``;
* ``template_stats`` with ``gram=False`` (B and s) vs ``max_unpool2d -> conv2d_weight`` (+ the
  sum for s), and with ``gram=True`` (B, s and G), which has no PyTorch peer (peer column empty);
* ``--drmm-step``: one full DRMM EG training step (:mod:`fastdrmm.drmm`'s objective: bottom-up
  pass, class scores, cross-entropy on the labeled and entropy on the unlabeled samples,
  top-down rendering with the latents chosen bottom-up, reconstruction and non-negativity
  terms, and every gradient) through ``fastdrmm._network.eg_loss_and_grads`` vs the same
  architecture and loss in PyTorch autograd (``conv2d -> leaky_relu ->
  max_pool2d(return_indices)`` up, global average, ``scale * f @ mu.T + beta``; down
  ``max_unpool2d`` at the recorded indices times the switch mask ``h > 0``, then
  ``conv_transpose2d`` cropped by the padding; latents and the chosen classes held fixed, as
  fastdrmm's gradients do). Both start from the same parameters (``DRMM._init_params``, He
  initialisation) and the same MNIST batches (random images in [0, 1] where MNIST is absent;
  ``--drmm-labeled-fraction`` of each batch labeled, the rest unlabeled). Losses and gradients
  are checked allclose before anything is timed (where PyTorch's pooling picks another argmax
  on a near-tie, the check is repeated with fastdrmm's latents given to PyTorch). Reported:
  ms per step (loss + gradients, no optimizer update) for both, the ratio, and the epoch time
  this implies for 60,000 images. ``--drmm-only`` skips the per-op tables.

Columns: GFLOP/s = 2*N*K*Ho*Wo*C*kh*kw / median time for match, render and B (G: none);
``% peak`` = that over the machine's float32 sgemm rate (numpy 2048x2048 matmul, same thread
count). The FLOP count is the dense-convolution count, the same for fastdrmm and its peer; the
unpooled code U of render/template_stats is zero off the pooling argmaxes (and where the
switch is off), and fastdrmm may skip those zeros, so on pooled layers its nominal GFLOP/s
(and ``% peak``) can exceed the sgemm rate. ``% bw`` = the op's minimal bytes (inputs read
once + outputs written once; idx as int32) / time over the copy bandwidth (``np.copyto`` of
256 MB, counting read + write).

Peak extra memory: measured in a fresh subprocess per shape (``MALLOC_MMAP_THRESHOLD_=65536``
so every large block is mmap-ed and returned to the OS on free, not recycled invisibly by
malloc). There each contender is called once to warm up, then the kernel's peak-RSS mark is
reset (``echo 5 > /proc/self/clear_refs``) and the call is made again: the figure is
``VmHWM - VmRSS`` before the call, i.e. the peak resident memory the call added, outputs
included, for numpy, Numba and PyTorch allocations alike. Memory a library keeps across calls
(oneDNN's primitive cache, Numba's thread pool) is not counted; pages never touched are not
counted either. Linux only (elsewhere the columns are empty).

Correctness is checked on every shape against PyTorch (and the numpy backend): h allclose,
idx equal except near-ties (where they differ, PyTorch's own switched value at fastdrmm's index
must equal PyTorch's maximum within the tolerance), render and B/s allclose. A failed check is
printed in the ``check`` column and makes the script exit with status 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

# name: (C, H, W, K, kh, kw, padding, pool) -- conv-small's layers, a CIFAR-like and a wide layer
SHAPES = {
    "l1": (1, 28, 28, 32, 5, 5, 4, 2),
    "l2": (32, 16, 16, 64, 3, 3, 0, 1),
    "l3": (64, 14, 14, 64, 3, 3, 2, 2),
    "l4": (64, 7, 7, 128, 3, 3, 0, 1),
    "cifar": (3, 32, 32, 64, 3, 3, 1, 2),
    "c128": (128, 16, 16, 128, 3, 3, 1, 2),
}

TORCH_MATCH = "torch conv2d+leaky_relu+max_pool2d"
TORCH_RENDER = "torch max_unpool2d+conv_transpose2d"
TORCH_STATS = "torch max_unpool2d+conv2d_weight+sum"
NUMPY_BACKEND = "fastdrmm numpy backend"
TORCH_STEP = "torch autograd (same architecture and loss)"
MNIST_IMAGES = 60000

TOLERANCE = {"float32": 2e-4, "float64": 1e-10}
#: losses and gradients of a whole step, relative to the largest magnitude of each array
DRMM_STEP_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


def describe(name):
    c, h, w, k, kh, kw, p, pool = SHAPES[name]
    return f"{name} {c}x{h}x{w} -> {k}x{kh}x{kw} pad {p} pool {pool}"


def geometry(name):
    c, h, w, k, kh, kw, p, pool = SHAPES[name]
    ho, wo = h + 2 * p - kh + 1, w + 2 * p - kw + 1
    if ho % pool or wo % pool:
        raise ValueError(f"shape {name}: plane {ho}x{wo} not divisible by pool {pool}")
    return ho, wo


def flops(name, n):
    c, h, w, k, kh, kw, p, pool = SHAPES[name]
    ho, wo = geometry(name)
    return 2.0 * n * k * ho * wo * c * kh * kw


def min_bytes(name, n, op, itemsize):
    """Inputs read once and outputs written once (idx int32)."""
    c, h, w, k, kh, kw, p, pool = SHAPES[name]
    ho, wo = geometry(name)
    x = n * c * h * w * itemsize
    wts = k * c * kh * kw * itemsize
    code = n * k * (ho // pool) * (wo // pool)
    if op == "match_switch_pool":
        return x + wts + k * itemsize + code * (itemsize + 4)
    if op == "render":
        return code * (itemsize + 4) + wts + x
    total = x + code * (itemsize + 4) + wts + k * itemsize
    if op == "template_stats B+s+G":
        total += (k * kh * kw) ** 2 * itemsize
    return total


# --------------------------------------------------------------------------- environment


def import_torch(enabled=True):
    if not enabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def set_threads(n, torch):
    """Numba's pool and PyTorch's intra-op pool to ``n``; returns a BLAS limiter (or None)."""
    import numba

    numba.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=n)


def import_time(samples=3):
    """Seconds to ``import fastdrmm`` in a fresh interpreter (median of ``samples``)."""
    code = "import time;t=time.perf_counter();import fastdrmm;print(time.perf_counter()-t)"
    times = []
    for _ in range(samples):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def machine_peaks(dtype, repeats=5):
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(dtype)
    b = a.T.copy()
    out = np.empty_like(a)
    np.matmul(a, b, out=out)
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        t.append(time.perf_counter() - t0)
    gflops = 2 * 2048**3 / statistics.median(t) / 1e9
    src = np.ones(256 * 2**20 // 8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        t.append(time.perf_counter() - t0)
    bandwidth = 2 * src.nbytes / statistics.median(t) / 1e9
    return {"matmul_gflops": gflops, "copy_gbs": bandwidth}


# --------------------------------------------------------------------------- inputs


class Inputs:
    """``copies`` independent input sets for one shape; code/idx from fastdrmm's cpu match."""

    def __init__(self, name, n, dtype, copies, leak, seed, torch, data="normal"):
        from fastdrmm import ops

        c, h, w, k, kh, kw, p, pool = SHAPES[name]
        self.name, self.n, self.dtype, self.leak = name, n, np.dtype(dtype), leak
        self.c, self.h, self.w, self.k, self.kh, self.kw, self.p, self.pool = SHAPES[name]
        self.plane = geometry(name)
        rng = np.random.default_rng([seed, n, sorted(SHAPES).index(name)])
        self.sets = []
        self.first_match_s = None  # the first cpu match call on this shape (set 0)
        for _ in range(copies):
            x = input_data(rng, (n, c, h, w), data).astype(dtype)
            W = (rng.standard_normal((k, c, kh, kw)) / np.sqrt(c * kh * kw)).astype(dtype)
            b = (0.1 * rng.standard_normal(k)).astype(dtype)
            t0 = time.perf_counter()
            code, idx = ops.match_switch_pool(x, W, b, padding=p, pool=pool, leak=leak,
                                              backend="cpu")
            if self.first_match_s is None:
                self.first_match_s = time.perf_counter() - t0
            s = {"x": x, "W": W, "b": b, "code": code, "idx": idx}
            if torch is not None:
                s.update(tx=torch.from_numpy(x), tW=torch.from_numpy(W), tb=torch.from_numpy(b),
                         tcode=torch.from_numpy(code),
                         tidx=torch.from_numpy(idx.astype(np.int64)))
            self.sets.append(s)


DATA = ("normal", "relu", "wide")


def input_data(rng, shape, data):
    """The inputs x of one kind: standard normal; ``relu``: its positive part (a ReLU layer's
    input: one sign, half zeros); ``wide``: standard normal times 2**e, e uniform in
    [-20, 20] per element (a wide dynamic range: where the Winograd kernels' accuracy screen
    sends tiles to the direct computation)."""
    x = rng.standard_normal(shape)
    if data == "relu":
        return np.maximum(x, 0)
    if data == "wide":
        return x * np.exp2(rng.integers(-20, 21, size=shape))
    return x


def contenders(inp, torch, with_numpy):
    """(op, peer name or None, fastdrmm fn, peer fn or None); fn(set) -> outputs."""
    from fastdrmm import ops

    p, pool, leak, ks, hw = inp.p, inp.pool, inp.leak, (inp.kh, inp.kw), (inp.h, inp.w)

    def fd_match(s, backend="cpu"):
        return ops.match_switch_pool(s["x"], s["W"], s["b"], padding=p, pool=pool, leak=leak,
                                     backend=backend)

    def fd_render(s):
        return ops.render(s["code"], s["idx"], s["W"], hw, padding=p, backend="cpu")

    def fd_stats(s, gram=False):
        return ops.template_stats(s["x"], s["code"], s["idx"], ks, padding=p, gram=gram,
                                  backend="cpu")

    rows = []
    if torch is not None:
        F = torch.nn.functional
        from torch.nn.grad import conv2d_weight

        def t_match(s):
            z = F.conv2d(s["tx"], s["tW"], s["tb"], padding=p)
            return F.max_pool2d(F.leaky_relu(z, leak), pool, stride=pool, return_indices=True)

        def t_unpool(s):
            return F.max_unpool2d(s["tcode"], s["tidx"], pool, stride=pool, output_size=inp.plane)

        def t_render(s):
            return F.conv_transpose2d(t_unpool(s), s["tW"], padding=p)

        def t_stats(s):
            u = t_unpool(s)
            return conv2d_weight(s["tx"], s["tW"].shape, u, padding=p), u.sum((0, 2, 3))

        rows += [("match_switch_pool", TORCH_MATCH, fd_match, t_match),
                 ("render", TORCH_RENDER, fd_render, t_render),
                 ("template_stats B+s", TORCH_STATS, fd_stats, t_stats)]
    else:
        rows += [("match_switch_pool", None, fd_match, None),
                 ("render", None, fd_render, None),
                 ("template_stats B+s", None, fd_stats, None)]
    if with_numpy:
        rows.append(("match_switch_pool", NUMPY_BACKEND, fd_match,
                     lambda s: fd_match(s, "numpy")))
    rows.append(("template_stats B+s+G", None, lambda s: fd_stats(s, True), None))
    return rows


# --------------------------------------------------------------------------- checks


def _close(a, ref, tol):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    err = float(np.max(np.abs(a - ref))) if ref.size else 0.0
    return err <= tol * scale, err / scale


def check(op, peer, inp, torch, fd_out, peer_out):
    """'ok ...' or 'FAIL: ...' comparing fastdrmm's outputs with the peer's on set 0."""
    tol = TOLERANCE[inp.dtype.name]
    s = inp.sets[0]
    if op == "match_switch_pool":
        h, idx = fd_out
        if peer == NUMPY_BACKEND:
            th, tidx = peer_out
            y = None
        else:
            th, tidx = peer_out[0].numpy(), peer_out[1].numpy()
            F = torch.nn.functional
            y = F.leaky_relu(F.conv2d(s["tx"], s["tW"], s["tb"], padding=inp.p), inp.leak)
            y = y.reshape(inp.n, inp.k, -1).numpy()
        ok, rel = _close(h, th, tol)
        if not ok:
            return f"FAIL: h differs (max rel err {rel:.2e})"
        differ = np.asarray(idx) != np.asarray(tidx)
        ties = int(differ.sum())
        if ties:
            if y is None:  # numpy backend: compare switched values through the same index rule
                return f"ok ({ties} idx differ, h equal)" if ok else "FAIL"
            at = np.take_along_axis(y, np.asarray(idx, np.int64).reshape(inp.n, inp.k, -1),
                                    axis=2).reshape(h.shape)
            tie_ok, rel = _close(at[differ], np.asarray(th)[differ], tol)
            if not tie_ok:
                return f"FAIL: {ties} idx differ, not near-ties (rel {rel:.2e})"
            return f"ok ({ties} near-tie idx)"
        return "ok"
    if op == "render":
        ok, rel = _close(fd_out, peer_out.numpy(), tol)
        return "ok" if ok else f"FAIL: r differs (max rel err {rel:.2e})"
    if op == "template_stats B+s":
        ok_b, rel_b = _close(fd_out[0], peer_out[0].numpy(), tol)
        ok_s, rel_s = _close(fd_out[1], peer_out[1].numpy(), tol)
        if ok_b and ok_s:
            return "ok"
        return f"FAIL: B/s differ (max rel err {max(rel_b, rel_s):.2e})"
    return ""


# --------------------------------------------------------------------------- timing


def timed(fn, sets, repeats, warmup):
    """(first-call seconds, median seconds) over rotated input sets; first call on set 0."""
    t0 = time.perf_counter()
    first_out = fn(sets[0])
    first = time.perf_counter() - t0
    for i in range(warmup):
        fn(sets[(i + 1) % len(sets)])
    times = []
    for i in range(repeats):
        s = sets[(warmup + 1 + i) % len(sets)]
        t0 = time.perf_counter()
        fn(s)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), first_out


def measure_memory(spec):
    """Runs in the memory subprocess: {key: extra MB} for each contender of one shape."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {}
    torch = import_torch(spec["torch"])
    set_threads(spec["threads"], torch)
    inp = Inputs(spec["shape"], spec["batch"], spec["dtype"], 1, spec["leak"], spec["seed"],
                 torch, spec.get("data", "normal"))
    s = inp.sets[0]

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def once(fn):
        fn(s)  # warm up (compile / caches) first
        gc.collect()
        before = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn(s)
        peak = status("VmHWM:")
        del out
        return max(0, peak - before) / 2**20

    result = {}
    for op, peer, fd, pf in contenders(inp, torch, False):
        result[f"{op}|fastdrmm"] = once(fd)
        if pf is not None:
            result[f"{op}|{peer}"] = once(pf)
    return result


def memory_in_subprocess(spec):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-worker",
                          json.dumps(spec)], capture_output=True, text=True, env=env)
    if out.returncode:
        print(f"memory measurement failed for {spec['shape']}: {out.stderr[-500:]}",
              file=sys.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_pass(args, torch, threads, peaks, memory):
    rows = []
    for n in args.batch:
        for name in args.shapes:
            inp = Inputs(name, n, args.dtype, args.copies, args.leak, args.seed, torch,
                         args.data)
            mem = {}
            if memory:
                mem = memory_in_subprocess(dict(shape=name, batch=n, dtype=args.dtype,
                                                leak=args.leak, seed=args.seed, threads=threads,
                                                data=args.data,
                                                torch=torch is not None))
            for op, peer, fd, pf in contenders(inp, torch, args.with_numpy and threads > 1):
                if threads == 1 and op == "template_stats B+s+G":
                    continue  # the 1-thread pass keeps to the ops with a peer
                first, t_fd, out_fd = timed(fd, inp.sets, args.repeats, args.warmup)
                if op == "match_switch_pool":
                    first = inp.first_match_s  # made the code/idx of the other ops: truly first
                t_peer, verdict = None, ""
                if pf is not None:
                    reps = args.repeats if peer != NUMPY_BACKEND else min(args.repeats, 3)
                    _, t_peer, out_peer = timed(pf, inp.sets, reps,
                                                args.warmup if peer != NUMPY_BACKEND else 0)
                    verdict = check(op, peer, inp, torch, out_fd, out_peer)
                gf = None if op.endswith("+G") else flops(name, n) / t_fd / 1e9
                nbytes = min_bytes(name, n, op, inp.dtype.itemsize)
                m_fd = mem.get(f"{op}|fastdrmm")
                m_peer = mem.get(f"{op}|{peer}") if peer else None
                rows.append(dict(
                    op=op, peer=peer, shape=name, geometry=describe(name), batch=n,
                    dtype=args.dtype, threads=threads,
                    fastdrmm_ms=t_fd * 1e3, peer_ms=None if t_peer is None else t_peer * 1e3,
                    ratio=None if t_peer is None else t_fd / t_peer,
                    gflops=gf, frac_peak=None if gf is None else gf / peaks["matmul_gflops"],
                    frac_bw=nbytes / t_fd / 1e9 / peaks["copy_gbs"],
                    first_call_ms=first * 1e3,
                    mem_fastdrmm_mb=m_fd, mem_peer_mb=m_peer,
                    mem_ratio=(m_fd / m_peer) if (m_fd is not None and m_peer) else None,
                    check=verdict))
                if args.verbose:
                    print(f"  {threads}t {name} N={n} {op} vs {peer}: {t_fd * 1e3:.2f} ms "
                          f"/ {'-' if t_peer is None else f'{t_peer * 1e3:.2f}'} ms {verdict}",
                          file=sys.stderr, flush=True)
            del inp
            gc.collect()
    return rows


# --------------------------------------------------------------------------- DRMM step


def default_mnist_dir():
    """``$FASTDRMM_DATA/mnist``, else this checkout's ``../shared/data/mnist``, else None (the
    user cache, :func:`fastdrmm.datasets.mnist_data_dir`)."""
    root = os.environ.get("FASTDRMM_DATA")
    if root:
        return os.path.join(root, "mnist")
    shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                          "shared", "data", "mnist")
    return os.path.normpath(shared) if os.path.isdir(shared) else None


def mnist_or_random(n, seed, data_dir=None):
    """(X (n, 1, 28, 28) float32, y (n,) int64, source): MNIST's first n training images
    where the files are found, else sparse random images in [0, 1] with random labels."""
    from fastdrmm import load_mnist

    try:
        X, y = load_mnist(data_dir or default_mnist_dir(), subset="train", return_X_y=True)
        if n <= X.shape[0]:
            return np.ascontiguousarray(X[:n]), np.asarray(y[:n], np.int64), "MNIST"
    except FileNotFoundError:
        pass
    rng = np.random.default_rng([seed, 7])
    X = (rng.random((n, 1, 28, 28)) * (rng.random((n, 1, 28, 28)) < 0.2)).astype(np.float32)
    return X, rng.integers(0, 10, n).astype(np.int64), "random images (MNIST not found)"


def drmm_setup(preset, x, yidx, seed, dtype="float32", top="average"):
    """(net, params) of an EG DRMM of ``preset`` for images like ``x``, initialised as
    ``DRMM.fit`` would (He templates, ``DRMM._init_params``)."""
    from fastdrmm import DRMM
    from fastdrmm.layers import resolve_layers

    model = DRMM(preset, algorithm="eg", dtype=dtype, random_state=seed, top=top)
    net = model._network(resolve_layers(preset), x.shape[1:])
    return net, model._init_params(net, x, yidx, seed)


def torch_params(torch, net, params):
    """Leaf tensors (requires_grad) holding copies of the trainable parameters."""
    from fastdrmm._network import trainable_names

    return {name: torch.from_numpy(np.array(params[name])).requires_grad_()
            for name in trainable_names(net.n_layers)}


def torch_bottom_up(torch, net, tp, scale, x, latents=None):
    """(hs[1..L], idxs, f, scores): conv2d -> leaky_relu -> max_pool2d(return_indices) per
    layer, the global average (``net.top == "full"``: the flattened top code) and
    ``scale * f @ mu.T + beta``. With ``latents`` (idxs as int64 tensors) each code is read
    at the given positions instead (gather)."""
    F = torch.nn.functional
    h, hs, idxs = x, [], []
    for l, layer in enumerate(net.layers):
        z = F.conv2d(h, tp[f"W{l}"], tp[f"b{l}"], padding=layer.padding)
        y = F.leaky_relu(z, layer.leak) if layer.leak else F.relu(z)
        if latents is not None:
            idx = latents[0][l]
            h = y.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
        elif layer.pool is not None:
            h, idx = F.max_pool2d(y, layer.pool, stride=layer.pool, return_indices=True)
        else:
            h, idx = y, None
        hs.append(h)
        idxs.append(idx)
    f = h.mean(dim=(2, 3)) if net.top == "average" else h.flatten(1)
    return hs, idxs, f, scale * (f @ tp["mu"].T) + tp["beta"]


def torch_eg_loss(torch, net, tp, scale, x, yidx, weights, latents=None):
    """fastdrmm's EG objective (:func:`fastdrmm._network.eg_loss_and_grads`) in autograd.

    ``tp``: leaf tensors W{l}, b{l}, mu, beta; ``x`` a (N, C, H, W) tensor; ``yidx`` (N,)
    numpy int64 with -1 for unlabeled; ``latents`` None (PyTorch's own choices) or
    (idxs, switches, classes) tensors to use instead. Returns (loss, terms, latents used);
    the latents (argmax positions, switch masks, classes) carry no gradient."""
    F = torch.nn.functional
    n = x.shape[0]
    hs, idxs, _, scores = torch_bottom_up(torch, net, tp, scale, x, latents)
    logp = F.log_softmax(scores, dim=1)
    prob = logp.exp()
    labeled_np = yidx >= 0
    labeled = torch.from_numpy(labeled_np)
    n_lab = int(labeled_np.sum())
    n_unl = n - n_lab
    y_lab = torch.from_numpy(yidx[labeled_np])
    xent = -logp[labeled].gather(1, y_lab[:, None]).sum() / max(n_lab, 1)
    entropy = -(prob[~labeled] * logp[~labeled]).sum() / max(n_unl, 1)
    if latents is None:
        classes = torch.where(labeled, torch.from_numpy(yidx), scores.detach().argmax(1))
        switches = [(h.detach() > 0).to(x.dtype) for h in hs]
        latents = (idxs, switches, classes)
    _, switches, classes = latents
    loss = weights.xent * xent + weights.entropy * entropy
    terms = {"xent": xent, "entropy": entropy}
    if weights.reconstruction or weights.nonnegativity:
        q = F.one_hot(classes, net.n_classes).to(x.dtype)
        top = q @ tp["mu"]
        if net.top == "average":  # the class template on every top position
            r = top[:, :, None, None].expand(-1, -1, *net.top_plane)
        else:  # a template of the whole top code
            r = top.view(n, net.layers[-1].n_templates, *net.top_plane)
        rs = [r]
        for l in range(net.n_layers - 1, -1, -1):
            layer = net.layers[l]
            u = r * switches[l]
            if layer.pool is not None:
                u = F.max_unpool2d(u, idxs[l], layer.pool, stride=layer.pool,
                                   output_size=net.shapes[l].plane)
            r = F.conv_transpose2d(u, tp[f"W{l}"], padding=layer.padding)
            rs.append(r)
        rs = rs[::-1]
        terms["reconstruction"] = ((rs[0] - x) ** 2).sum() / (n * x[0].numel())
        terms["nonnegativity"] = sum((torch.clamp(rs[l], max=0) ** 2).sum()
                                     / (n * rs[l][0].numel()) for l in range(1, len(rs)))
        loss = (loss + weights.reconstruction * terms["reconstruction"]
                + weights.nonnegativity * terms["nonnegativity"])
    else:
        terms["reconstruction"] = terms["nonnegativity"] = x.new_zeros(())
    return loss, terms, latents


def torch_step(torch, net, tp, scale, x, yidx, weights, latents=None):
    """One PyTorch training step without the optimizer: (loss, terms, latents); gradients in
    ``tp[name].grad``."""
    for t in tp.values():
        t.grad = None
    loss, terms, latents = torch_eg_loss(torch, net, tp, scale, x, yidx, weights, latents)
    loss.backward()
    return loss, terms, latents


def fastdrmm_latents(torch, net, fw, yidx):
    """fastdrmm's bottom-up choices as tensors for :func:`torch_eg_loss`."""
    dtype = fw.hs[0].dtype
    idxs = [torch.from_numpy(np.asarray(i, np.int64)) for i in fw.idxs]
    switches = [torch.from_numpy(fw.switches(l, dtype)) for l in range(net.n_layers)]
    classes = np.where(yidx >= 0, yidx, np.asarray(fw.scores).argmax(axis=1))
    return idxs, switches, torch.from_numpy(classes.astype(np.int64))


def latent_disagreements(net, fw, latents, yidx):
    """How many argmax positions, switches and classes differ between fastdrmm and PyTorch."""
    idxs, switches, classes = latents
    n = 0
    for l, layer in enumerate(net.layers):
        if layer.pool is not None:
            n += int(np.sum(np.asarray(fw.idxs[l], np.int64) != idxs[l].numpy()))
        n += int(np.sum(fw.switches(l, switches[l].numpy().dtype) != switches[l].numpy()))
    mine = np.where(yidx >= 0, yidx, np.asarray(fw.scores).argmax(axis=1))
    return n + int(np.sum(mine != classes.numpy()))


def _rel_err(a, ref):
    """max |a - ref| over max |ref| (an array, or a scalar's own magnitude)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(a - ref))) if ref.size else 0.0
    return err / scale if scale > 0 else err


def check_drmm_step(torch, net, tp, scale, x_np, yidx, weights, fd_result, tol):
    """(verdict, details): fastdrmm's loss, terms and gradients vs PyTorch autograd."""
    loss, terms, grads, fw = fd_result
    x = torch.from_numpy(x_np)
    t_loss, t_terms, latents = torch_step(torch, net, tp, scale, x, yidx, weights)
    ties = latent_disagreements(net, fw, latents, yidx)
    if ties:  # a near-tie decided otherwise: compare the same function, fastdrmm's latents
        t_loss, t_terms, _ = torch_step(torch, net, tp, scale, x, yidx, weights,
                                        fastdrmm_latents(torch, net, fw, yidx))
    details = {"latent_disagreements": ties, "loss": float(loss),
               "torch_loss": float(t_loss.detach()), "rel_err": {}}
    worst = 0.0
    ok_all = True
    pairs = [("loss", loss, float(t_loss.detach()))]
    pairs += [(k, terms[k], float(t_terms[k].detach())) for k in t_terms]
    pairs += [(f"d{k}", g, np.zeros_like(g) if tp[k].grad is None else tp[k].grad.numpy())
              for k, g in grads.items()]
    for name, value, ref in pairs:
        rel = _rel_err(value, ref)
        details["rel_err"][name] = rel
        ok_all &= rel <= tol
        worst = max(worst, rel)
    details["max_rel_err"] = worst
    if not ok_all:
        bad = [k for k, v in details["rel_err"].items() if v > tol]
        return f"FAIL: {', '.join(bad)} differ (max rel err {worst:.2e})", details
    note = f"; {ties} near-tie latents, checked with fastdrmm's" if ties else ""
    return f"ok (max rel err {worst:.1e}{note})", details


def run_drmm_steps(args, torch):
    """Rows of the full-step comparison, one per (preset, batch)."""
    from threadpoolctl import threadpool_limits

    from fastdrmm._network import LossWeights, eg_loss_and_grads
    from fastdrmm.kernels.buffers import StepBuffers

    weights = LossWeights()
    tol = DRMM_STEP_TOLERANCE[args.dtype]
    rows = []
    source = None
    for preset in args.drmm_presets:
        for n in args.batch:
            X, y, source = mnist_or_random(n * args.copies, args.seed, args.data_dir)
            X = X.astype(args.dtype)
            n_lab = int(round(args.drmm_labeled_fraction * n))
            sets = []
            for i in range(args.copies):
                x = np.ascontiguousarray(X[i * n:(i + 1) * n])
                yidx = y[i * n:(i + 1) * n].copy()
                yidx[n_lab:] = -1
                sets.append((x, yidx))
            net, params = drmm_setup(preset, X, y, args.seed, args.dtype, args.drmm_top)
            scale = float(params["class_scale"])

            step_buffers = StepBuffers()

            def fd(s, buffers=step_buffers):
                # as DRMM's training does: the model's small products on a serial BLAS, whose
                # spinning pool would otherwise take the cores from the Numba kernels, and the
                # step's intermediates in the memory of the step before
                with threadpool_limits(limits=1, user_api="blas"):
                    return eg_loss_and_grads(net, params, s[0], s[1], weights,
                                             buffers=buffers)

            first, t_fd, _ = timed(fd, sets, args.repeats, args.warmup)
            out_fd = fd(sets[0], buffers=None)  # for the check: its own arrays
            row = dict(preset=preset, top=args.drmm_top, batch=n, labeled=n_lab,
                       dtype=args.dtype, data=source, fastdrmm_ms=t_fd * 1e3,
                       first_call_ms=first * 1e3,
                       fastdrmm_epoch_s=t_fd * MNIST_IMAGES / n, peer=None, peer_ms=None,
                       ratio=None, peer_epoch_s=None, check="", check_details=None)
            if torch is not None:
                tp = torch_params(torch, net, params)
                verdict, details = check_drmm_step(torch, net, tp, scale, *sets[0], weights,
                                                   out_fd, tol)
                tsets = [(torch.from_numpy(x), yi) for x, yi in sets]

                def tf(s):
                    return torch_step(torch, net, tp, scale, s[0], s[1], weights)

                _, t_peer, _ = timed(tf, tsets, args.repeats, args.warmup)
                row.update(peer=TORCH_STEP, peer_ms=t_peer * 1e3, ratio=t_fd / t_peer,
                           peer_epoch_s=t_peer * MNIST_IMAGES / n, check=verdict,
                           check_details=details)
            rows.append(row)
            if args.verbose:
                print(f"  DRMM step {preset} N={n}: {row['fastdrmm_ms']:.1f} ms / "
                      f"{_f(row['peer_ms'], '{:.1f}') or '-'} ms {row['check']}",
                      file=sys.stderr, flush=True)
    return rows, source


def drmm_table(rows):
    head = ["preset", "N (labeled)", "fastdrmm ms/step", "torch ms/step", "ratio",
            "fastdrmm s/epoch (60k)", "torch s/epoch (60k)", "first call ms", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["preset"], f"{r['batch']} ({r['labeled']})", _f(r["fastdrmm_ms"]),
            _f(r["peer_ms"]), _f(r["ratio"], "{:.2f}x"), _f(r["fastdrmm_epoch_s"], "{:.1f}"),
            _f(r["peer_epoch_s"], "{:.1f}"), _f(r["first_call_ms"], "{:.0f}"),
            r["check"]]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- output


def _f(v, fmt="{:.2f}"):
    return "" if v is None else fmt.format(v)


def table(rows):
    head = ["op", "peer", "shape", "N", "fastdrmm ms", "peer ms", "ratio", "GFLOP/s",
            "% peak", "% bw", "first call ms", "mem MB", "peer mem MB", "mem ratio", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["op"], r["peer"] or "", r["geometry"], str(r["batch"]),
                 _f(r["fastdrmm_ms"]), _f(r["peer_ms"]), _f(r["ratio"], "{:.2f}x"),
                 _f(r["gflops"], "{:.1f}"), _f(r["frac_peak"] and 100 * r["frac_peak"], "{:.0f}"),
                 _f(100 * r["frac_bw"], "{:.0f}"), _f(r["first_call_ms"], "{:.1f}"),
                 _f(r["mem_fastdrmm_mb"], "{:.1f}"), _f(r["mem_peer_mb"], "{:.1f}"),
                 _f(r["mem_ratio"], "{:.2f}x"), r["check"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table(multi, single, threads):
    index = {(r["op"], r["peer"], r["shape"], r["batch"]): r for r in single}
    head = ["op", "shape", "N", "fastdrmm 1t ms", f"fastdrmm {threads}t ms", "fastdrmm speed-up",
            "peer 1t ms", f"peer {threads}t ms", "peer speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    out = []
    for r in multi:
        one = index.get((r["op"], r["peer"], r["shape"], r["batch"]))
        if one is None:
            continue
        up = r["fastdrmm_ms"] and one["fastdrmm_ms"] / r["fastdrmm_ms"]
        pup = None if not r["peer_ms"] else one["peer_ms"] / r["peer_ms"]
        out.append(dict(op=r["op"], shape=r["shape"], batch=r["batch"], fastdrmm_speedup=up,
                        peer_speedup=pup))
        lines.append("| " + " | ".join([
            r["op"], r["geometry"], str(r["batch"]), _f(one["fastdrmm_ms"]), _f(r["fastdrmm_ms"]),
            _f(up, "{:.2f}x"), _f(one["peer_ms"]), _f(r["peer_ms"]), _f(pup, "{:.2f}x")]) + " |")
    return "\n".join(lines), out


# --------------------------------------------------------------------------- main


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma-separated subset of {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--batch", default="64,256", help="comma-separated batch sizes")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per contender")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    ap.add_argument("--copies", type=int, default=3, help="input sets rotated between calls")
    ap.add_argument("--leak", type=float, default=0.0, help="switch slope for z <= 0")
    ap.add_argument("--data", choices=DATA, default="normal",
                    help="the inputs x: standard normal, its positive part (relu), or a wide "
                         "dynamic range (wide: times 2**e, e in [-20, 20]); the templates "
                         "stay normal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the main pass (default: os.cpu_count())")
    ap.add_argument("--no-single-thread", action="store_true",
                    help="skip the separate 1-thread pass and the scaling table")
    ap.add_argument("--with-numpy", action="store_true",
                    help="also time match_switch_pool on the (slow) numpy backend")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if present")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the peak-memory subprocesses")
    ap.add_argument("--drmm-step", action="store_true",
                    help="also time one full DRMM EG training step (loss + gradients) against "
                         "PyTorch autograd, at each --batch")
    ap.add_argument("--drmm-only", action="store_true",
                    help="with --drmm-step: skip the per-op tables")
    ap.add_argument("--drmm-presets", default="conv-small",
                    help="comma-separated DRMM presets for --drmm-step (default conv-small)")
    ap.add_argument("--drmm-top", choices=["average", "full"], default="average",
                    help="DRMM(top=...) for --drmm-step (default average, Conv-Small's)")
    ap.add_argument("--drmm-labeled-fraction", type=float, default=0.5,
                    help="fraction of each --drmm-step batch that is labeled (the rest "
                         "unlabeled, y=-1); default 0.5 so that every loss term is exercised")
    ap.add_argument("--data-dir", default=None,
                    help="MNIST directory for --drmm-step (default: $FASTDRMM_DATA/mnist, else "
                         "../shared/data/mnist; random images where absent)")
    ap.add_argument("--json", metavar="PATH", help="write all tables as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the printed markdown")
    ap.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    ap.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    return ap


def main(argv=None, out=None):
    args = build_parser().parse_args(argv)
    if args.memory_worker:
        print(json.dumps(measure_memory(json.loads(args.memory_worker))))
        return 0
    out = out or sys.stdout
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    args.batch = [int(b) for b in str(args.batch).split(",")]
    if args.repeats < 1 or args.warmup < 0 or args.copies < 1:
        raise SystemExit("--repeats and --copies must be >= 1, --warmup >= 0")
    args.drmm_presets = [s.strip() for s in args.drmm_presets.split(",") if s.strip()]
    if args.drmm_only and not args.drmm_step:
        raise SystemExit("--drmm-only needs --drmm-step")
    if not 0.0 <= args.drmm_labeled_fraction <= 1.0:
        raise SystemExit("--drmm-labeled-fraction must lie in [0, 1]")
    if args.drmm_step:
        from fastdrmm.layers import PRESETS

        bad = [s for s in args.drmm_presets if s not in PRESETS]
        if bad:
            raise SystemExit(f"unknown DRMM presets {bad}; choose from {sorted(PRESETS)}")

    import numba

    import fastdrmm

    torch = import_torch(not args.no_torch)
    threads = args.threads or os.cpu_count() or 1
    report = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=os.cpu_count(), python=platform.python_version(),
                     numpy=np.__version__, numba=numba.__version__,
                     torch=None if torch is None else torch.__version__,
                     fastdrmm=fastdrmm.__version__),
        settings=dict(dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                      copies=args.copies, leak=args.leak, batch=args.batch, shapes=args.shapes),
        import_fastdrmm_s=import_time(min(3, args.repeats)),
        drmm_step=None,
        passes=[])
    md = [f"# fastdrmm vs peers ({args.dtype}, median of {args.repeats} after {args.warmup} "
          f"warm-up, {args.copies} rotated input sets)", "",
          "machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), "",
          f"`import fastdrmm` (fresh interpreter): {report['import_fastdrmm_s'] * 1e3:.0f} ms"]
    if torch is None:
        md += ["", "PyTorch not available (or --no-torch): peer columns are empty."]
    failed = False
    thread_counts = [threads] + ([1] if threads > 1 and not args.no_single_thread else [])
    if args.drmm_only:
        thread_counts = []
    for nt in thread_counts:
        limiter = set_threads(nt, torch)
        try:
            peaks = machine_peaks(args.dtype)
            rows = run_pass(args, torch, nt, peaks, memory=not args.no_memory and nt == threads)
        finally:
            if limiter is not None:
                limiter.unregister()
        report["passes"].append(dict(threads=nt, peaks=peaks, rows=rows))
        failed |= any(r["check"].startswith("FAIL") for r in rows)
        md += ["", f"## {nt} thread{'s' if nt > 1 else ''}", "",
               f"machine practical peak: {peaks['matmul_gflops']:.1f} GFLOP/s ({args.dtype} "
               f"numpy matmul 2048x2048), copy bandwidth {peaks['copy_gbs']:.1f} GB/s "
               "(np.copyto 256 MB, read + write)", "", table(rows)]
    set_threads(threads, torch)
    if len(report["passes"]) == 2:
        text, scaling = scaling_table(report["passes"][0]["rows"], report["passes"][1]["rows"],
                                      threads)
        report["scaling"] = scaling
        md += ["", f"## 1-thread vs {threads}-thread scaling", "", text]
    if args.drmm_step:
        limiter = set_threads(threads, torch)
        try:
            step_rows, source = run_drmm_steps(args, torch)
        finally:
            if limiter is not None:
                limiter.unregister()
        report["drmm_step"] = dict(available=True, threads=threads, data=source,
                                   labeled_fraction=args.drmm_labeled_fraction,
                                   rows=step_rows)
        failed |= any(r["check"].startswith("FAIL") for r in step_rows)
        md += ["", f"## full DRMM training step ({threads} thread{'s' if threads > 1 else ''})",
               "", f"One EG step, loss + all gradients (no optimizer update), {args.dtype}, "
               f"top={args.drmm_top}, "
               f"data: {source}; {TORCH_STEP} as the peer; s/epoch = ms/step x 60000 / N. "
               "check: losses and gradients of both on the first batch, max |diff| / max |ref| "
               f"per array <= {DRMM_STEP_TOLERANCE[args.dtype]:g}.", "", drmm_table(step_rows)]
    if thread_counts:
        md += ["", "mem MB: peak RSS added by one call after a warm-up call, in a fresh "
               "subprocess per shape (VmHWM reset through /proc/self/clear_refs, "
               "MALLOC_MMAP_THRESHOLD_=65536), outputs included; memory kept across calls is not "
               "counted. template_stats B+s+G has no PyTorch peer. check: fastdrmm vs the peer "
               "on input set 0. GFLOP/s: the dense count 2*N*K*Ho*Wo*C*kh*kw over the median "
               "time (render and B may skip the zeros of the unpooled code, so they can pass "
               "% peak = 100)."]
    text = "\n".join(md) + "\n"
    out.write(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if failed:
        print("compare.py: a correctness check FAILED (see the check column)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
