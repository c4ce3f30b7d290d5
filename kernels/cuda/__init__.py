"""CUDA C kernels (``*.cu``/``*.cuh``) of the ``cupy`` backend.

``matching.cu``, ``rendering.cu`` and ``statistics.cu`` (one per op family, sharing
``common.cuh``) are package data, compiled at run time through ``cupy.RawModule`` by
``loader.py`` (once per device, memoised) with the launch configuration of ``launch.py``;
``backend.py`` is the backend module (the five ops of ``fastdrmm.ops``; ``match_at`` lives in
``matching.cu``). Only ``backend`` and ``loader.module`` import CuPy.
"""
