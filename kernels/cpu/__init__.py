"""The Numba CPU backend: ``@njit(parallel=True)`` fused kernels, compiled lazily and cached.

One module per op family, the same four functions as every backend (see
``fastdrmm._backends``): arguments arrive validated, C-contiguous, in one float dtype.

Accuracy: every output is within the contract of ``kernels.contracts`` (a sum of T products
off by at most c * T * (u * (|bias| + sum |a||b|) + eta); c = 2 for the direct kernels, 256
for the ops a Winograd kernel may take). The Winograd kernels screen each 2x2 tile (matching,
match_at, render) or check the result (template_stats' B) against it and compute what fails
directly.
"""

from .matching import match_at, match_switch_pool
from .rendering import render, unpool
from .statistics import template_stats

__all__ = ["match_switch_pool", "match_at", "unpool", "render", "template_stats"]
