"""The Numba CPU backend: ``@njit(parallel=True)`` fused kernels, compiled lazily and cached.

One module per op family, the same four functions as every backend (see
``fastdrmm._backends``): arguments arrive validated, C-contiguous, in one float dtype.
"""

from .matching import match_at, match_switch_pool
from .rendering import render, unpool
from .statistics import template_stats

__all__ = ["match_switch_pool", "match_at", "unpool", "render", "template_stats"]
