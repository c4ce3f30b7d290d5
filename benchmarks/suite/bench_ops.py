"""asv benchmarks of the four ops, per backend, dtype and layer shape.

Each setup calls the op once so that JIT compilation is excluded from the timings.
"""

import numpy as np

from fastdrmm import ops

# name: (N, C, H, W, K, kh, kw, padding, pool) -- the conv-small MNIST layers at batch 64
SHAPES = {
    "l1-1x28-32x5x5-p4-pool2": (64, 1, 28, 28, 32, 5, 5, 4, 2),
    "l2-32x16-64x3x3-pool1": (64, 32, 16, 16, 64, 3, 3, 0, 1),
    "l3-64x14-64x3x3-p2-pool2": (64, 64, 14, 14, 64, 3, 3, 2, 2),
    "l4-64x8-128x3x3-pool1": (64, 64, 8, 8, 128, 3, 3, 0, 1),
}


class Ops:
    params = (["cpu", "numpy"], ["float32", "float64"], list(SHAPES))
    param_names = ["backend", "dtype", "shape"]
    timeout = 300

    def setup(self, backend, dtype, shape):
        n, c, h, w, k, kh, kw, padding, pool = SHAPES[shape]
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((n, c, h, w)).astype(dtype)
        self.templates = (rng.standard_normal((k, c, kh, kw)) / np.sqrt(c * kh * kw)).astype(dtype)
        self.bias = np.zeros(k, dtype)
        self.geometry = dict(padding=padding, pool=pool)
        self.code, self.idx = ops.match_switch_pool(self.x, self.templates, self.bias,
                                                    backend=backend, **self.geometry)
        self.kernel_size = (kh, kw)
        self.backend = backend
        self.time_render()
        self.time_template_stats_b()

    def time_match_switch_pool(self, *params):
        ops.match_switch_pool(self.x, self.templates, self.bias, backend=self.backend,
                              **self.geometry)

    def time_render(self, *params):
        ops.render(self.code, self.idx, self.templates, self.x.shape[2:],
                   padding=self.geometry["padding"], backend=self.backend)

    def time_template_stats_b(self, *params):
        ops.template_stats(self.x, self.code, self.idx, self.kernel_size,
                           padding=self.geometry["padding"], gram=False, backend=self.backend)

    def peakmem_match_switch_pool(self, *params):
        ops.match_switch_pool(self.x, self.templates, self.bias, backend=self.backend,
                              **self.geometry)
