"""Kernel backends of fastdrmm, installed as ``fastdrmm.kernels``.

One subpackage per backend (``numpy``, ``cpu``, ``numba_cuda`` and ``cuda``), each with one
module per op family (matching, rendering, statistics) and the same five functions: the ops of
``fastdrmm.ops`` (match_switch_pool, match_at, unpool, render, template_stats), with the
arguments of ``fastdrmm._backends.CONTRACT`` (sizes in one ``geometry.Geometry``).
"""
