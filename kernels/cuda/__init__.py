"""CUDA C kernels (``*.cu``/``*.cuh``) for the ``cupy`` backend.

The sources ship as package data; the backend module that compiles them through
``cupy.RawModule`` is not part of this release, so asking for ``backend="cupy"`` raises an
ImportError that says so.
"""
