"""The Numba CUDA backend (``backend="numba-cuda"``): numba.cuda kernels for the five ops.

Arrays in and out are numba device arrays (they carry ``__cuda_array_interface__``, so
``cupy.asarray``/``torch.as_tensor`` wrap the results without copies); inputs from other
frameworks are wrapped by ``asarray`` without copies. Kernels are queued on the stream of the
first input that carries one (arrays imported through ``__cuda_array_interface__`` carry their
producer's stream; numba's own arrays carry the stream they were made on), else on the default
stream. Launch sizes: ``fastdrmm.kernels.numba_cuda.config.LAUNCH``. Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) the same kernels run on the CPU.
"""

from .arrays import SIMULATOR, asarray, ascontiguousarray, index_range
from .matching import match_at, match_switch_pool
from .rendering import render, unpool
from .statistics import template_stats

__all__ = ["match_switch_pool", "match_at", "unpool", "render", "template_stats", "asarray",
           "ascontiguousarray", "index_range", "SIMULATOR"]
