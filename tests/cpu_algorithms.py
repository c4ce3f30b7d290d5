"""Forcing one algorithm of the cpu backend in tests.

Each op of ``fastdrmm.kernels.cpu`` takes ``algorithm="auto"`` (see the table in its
docstring). ``force`` makes ``fastdrmm.ops.<op>(..., backend="cpu")`` run one algorithm, so
a test keeps the ops layer's checks and conversions and the checks written against it::

    def test_x(monkeypatch):
        force(monkeypatch, "render", "gemm")
        ops.render(code, idx, templates, (h, w), backend="cpu")   # the GEMM kernel

``ALGORITHMS[op]`` lists an op's names.
"""

from __future__ import annotations

import functools

from fastdrmm.kernels import cpu
from fastdrmm.kernels.cpu import matching, rendering, statistics

ALGORITHMS = {
    "match_switch_pool": matching.ALGORITHMS,
    "match_at": matching.MATCH_AT_ALGORITHMS,
    "render": rendering.ALGORITHMS,
    "template_stats": statistics.ALGORITHMS,
}


def force(monkeypatch, op, algorithm):
    """``ops.<op>`` on the cpu backend runs ``algorithm`` until the test ends."""
    if algorithm not in ALGORITHMS[op]:
        raise ValueError(f"{op} has no algorithm {algorithm!r}: {ALGORITHMS[op]}")
    monkeypatch.setattr(cpu, op, functools.partial(getattr(cpu, op), algorithm=algorithm))
