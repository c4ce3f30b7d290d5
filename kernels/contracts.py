"""The accuracy contract of every host kernel, in one table the tests read.

Every output of the ops is a sum of products (plus a bias for the matching)::

    o = sum_{t < T} a_t * b_t (+ bias)

computed in the inputs' float dtype, whose unit roundoff is u (float32 2**-24, float64
2**-53). A kernel meets its contract when, for every output,

    |o_computed - o_exact| <= c * T * u * (|bias| + sum_t |a_t| * |b_t|)

with the constant ``c`` of the table below and ``T`` the number of terms of that output:

=================  =========================================  ===============================
op                 T (terms of one output)                    a_t * b_t
=================  =========================================  ===============================
match_switch_pool  C * kh * kw + 1  (z, before the switch)    W[k,c,u,v] * xpad[n,c,i+u,j+v]
match_at           C * kh * kw + 1                            the same, times the switch
render             K * kh * kw + m  (m: units that collide    W[k,c,u,v] * unpooled code
                   in one unpooled position, at most          (times switches)
                   ceil(pool/stride)**2)
template_stats B   N * Ho * Wo + m                            unpooled code * xpad
template_stats s   N * Ho * Wo + m                            unpooled code * 1
template_stats G   N * H * W + m                              unpooled code * unpooled code
=================  =========================================  ===============================

``o_exact`` is the float64 NumPy reference on float64 copies of the inputs (for float64 inputs
it is itself off by at most T * 2**-53 * sum |a||b|, which the tests add to the bound), and
``sum |a||b|`` the same reference run on the absolute values of every input (the ops are
multilinear in x, the code, the switches and the templates, so that run gives exactly the
sums of absolute products).

What follows for the pooled outputs (``h = max over a window of switch(z)``, ``idx`` its
first row-major argmax): with ``bz`` the largest bound of z over the window,

    |h_computed - h_exact| <= max(1, |leak|) * bz + u * |h_exact|

(the switch multiplies by the leak and rounds once), and ``idx`` may differ from the exact
argmax only where the exact switched values at the two positions are within twice that bound
of each other.

Why the constants differ: the direct, GEMM and unit-by-unit kernels (and the NumPy reference)
add the T products in some order, one rounding each, so the classical bound holds with c = 2
(``DIRECT``: gamma_T < 2 T u while T u < 1/2). The Winograd kernels (3x3 templates, F(2x2,
3x3)) pair each input value with the transformed weights of *other* taps; their error is
bounded by ``(C + 12) * u * sum_c sum_{a,b} K(a, b) |x_c,a| |w_c,b|`` (K: the transforms'
coupling, at most 4 per pair), which exceeds the classical bound wherever a large input sits on
a tiny or zero weight. They screen every output against the contract (``winograd.screen``)
and compute the flagged ones by the classical sum, so their contract is the classical one with the
``WINOGRAD`` constant: the screen's estimate is a priori (it cannot see the rounding errors
cancel), and a larger constant lets it pass ordinary data with a margin.

The cpu backend's automatic choice takes the Winograd kernels only where ``winograd.AUTO`` is
set (off: with the screen they do not pay yet, see there), so by default every op meets the
``DIRECT`` constant; the table keeps the constants that hold whichever algorithm an op takes
(the one a cpu op is given by ``algorithm=`` included).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONSTANTS", "DIRECT", "WINOGRAD", "unit_roundoff"]

DIRECT = 2.0       # any summation order of T products: gamma_T = T u / (1 - T u) < 2 T u
WINOGRAD = 256.0   # the screened Winograd kernels (match, match_at, render, template_stats B)

# op (and output) -> c: the constant of the cpu backend's kernels, whichever algorithm they
# take (the NumPy backend meets DIRECT everywhere)
CONSTANTS = {
    "match_switch_pool": WINOGRAD,
    "match_at": WINOGRAD,
    "render": WINOGRAD,
    "template_stats.B": WINOGRAD,
    "template_stats.s": DIRECT,   # the unit sums: one addition per unit, collisions too
    "template_stats.G": DIRECT,
}


def unit_roundoff(dtype):
    """u of a float dtype: 2**-24 for float32, 2**-53 for float64."""
    return float(np.finfo(np.dtype(dtype)).eps) / 2
