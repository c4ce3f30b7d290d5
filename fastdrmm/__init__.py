"""fastdrmm: fast, faithful inference and EM training of the Deep Rendering Mixture Model.

Public names: ``ops`` (the four fused ops), ``RMM`` (the shallow model), ``set_backend`` and
``get_backend`` (the default kernel backend).
"""

from . import ops
from ._backends import get_backend, set_backend
from .rmm import RMM

__version__ = "0.1.0"

__all__ = ["ops", "RMM", "set_backend", "get_backend", "__version__"]
