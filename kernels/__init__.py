"""Kernel backends of fastdrmm, installed as ``fastdrmm.kernels``.

One subpackage per backend (``numpy``, ``cpu``, later ``numba_cuda`` and ``cuda``), each with
one module per op family (matching, rendering, statistics) and the same four functions.
"""
