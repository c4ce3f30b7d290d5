"""The Numba CPU backend: ``@njit(parallel=True)`` fused kernels, compiled lazily and cached.

One module per op family, the same five functions as every backend (the ops of
``fastdrmm.ops``, contract in ``fastdrmm._backends.CONTRACT``): arguments arrive validated,
C-contiguous, in one float dtype, with the op's ``Geometry`` (``kernels.geometry``).

Every op but ``unpool`` has several algorithms. One shape everywhere (``_dispatch``): the
op's module lists them in ``ALGORITHMS``, ``plan_<op>(...)`` (the op's arguments, less
``leak``/``gram``) returns the name the automatic choice takes, and the op's
``algorithm="auto"`` keyword forces a name (a ValueError where it cannot run the call):

================  ============  =============================================  ==============
op                algorithm     automatic choice takes it where                forcing needs
================  ============  =============================================  ==============
match_switch_pool direct        otherwise                                      --
(matching)        pooled_rows   2x2 windows at stride 2, C < lanes, >= 2/3 of  2x2 windows at
                                the lanes of each pooled row used              stride 2
                  winograd      ``winograd.AUTO`` and ``winograd.applies``     3x3 templates
match_at          units         otherwise                                      --
(matching)        winograd      ``winograd.AUTO`` and ``match_at_applies``     3x3 templates
render            dots          finite templates, C < lanes                    finite templ.
(rendering)       gemm          cheapest of gemm / conv / scatter by cost      --
                  conv          ... (finite templates only)                    finite templ.
                  scatter       ...                                            --
                  winograd      ``winograd.AUTO``, fewer products,             3x3, padding
                                ``render_applies``                             <= 2
template_stats    kvec          C < lanes                                      --
B and s           gemm          cheaper than sparse by cost                    --
(statistics)      sparse        otherwise                                      --
                  winograd      ``winograd.AUTO``, unpooled code, 3x3, >= 16   3x3 templates
                                channels and templates, one sign, a plane
                                where it saves products
================  ============  =============================================  ==============

Force one with e.g. ``rendering.render(code, idx, templates, geometry, switches,
algorithm="gemm")``. ``winograd.AUTO`` (off) is the one policy switch: whether the plans may
take Winograd at all. The Winograd kernels flag the samples they cannot compute exactly
(non-finite values, the accuracy screen) and the op redoes those by the exact automatic
choice (``_dispatch.redo_flagged``). Shared pieces: ``_tiles`` (channel blocks, templates
laid out for the tiles, pooling), ``_units`` (unit values, unpooling), ``_microkernels`` (the
SIMD micro-kernels), ``_vector`` (their IR helpers), ``_partition`` (work partitioning).

Accuracy: every output is within the contract of ``kernels.contracts`` (a sum of T products
off by at most c * T * (u * (|bias| + sum |a||b|) + eta); c = 2 for the direct kernels, 256
for the ops a Winograd kernel may take). The Winograd kernels screen each output (matching,
match_at, render) or check the result (template_stats' B) against it and compute what fails
directly.
"""

from .matching import match_at, match_switch_pool
from .rendering import render, unpool
from .statistics import template_stats

__all__ = ["match_switch_pool", "match_at", "unpool", "render", "template_stats"]
