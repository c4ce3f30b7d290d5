"""The geometry of an op: every size a backend needs, computed and checked once by
``fastdrmm.ops`` and passed to the backend whole (backends never recompute it).

The (Ho, Wo) matching plane of templates (kh, kw) on an input (H, W) zero-padded by (ph, pw)
is ``(H + 2 ph - kh + 1, W + 2 pw - kw + 1)``; unit ``(p, q)`` of a pooled grid reads the
window of ``pool`` positions starting at ``(p * stride[0], q * stride[1])`` of that plane, and
idx holds flat positions ``i * Wo + j`` on it.
"""

from typing import NamedTuple


class Geometry(NamedTuple):
    input: tuple    # (H, W): x's planes (the rendered image's for render)
    kernel: tuple   # (kh, kw): the templates'
    padding: tuple  # (ph, pw): zeros around the input
    plane: tuple    # (Ho, Wo): the matching plane
    pool: tuple     # (pool_h, pool_w) window; (1, 1) for the ops that read given positions
    stride: tuple   # pooling stride; (1, 1) likewise
    pooled: tuple   # (Hp, Wp): the grid of units (h, idx, code, switches)
