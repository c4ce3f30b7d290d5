"""fastdrmm: fast, faithful inference and EM training of the Deep Rendering Mixture Model.

Public names: ``ops`` (the four fused ops), ``RMM`` (the shallow model), ``DRMM`` and
``Layer`` (the deep model and its layers; ``PRESETS``), ``load`` (a saved model),
``set_backend`` and ``get_backend`` (the default kernel backend), ``datasets``
(``load_mnist``, ``load_digits``) and ``io`` (the versioned, atomic on-disk array format).
"""

from . import datasets, io, ops
from ._backends import get_backend, set_backend
from ._persistence import load
from .datasets import load_digits, load_mnist
from .drmm import DRMM
from .layers import PRESETS, Layer
from .rmm import RMM

__version__ = "0.1.0"

__all__ = ["ops", "RMM", "DRMM", "Layer", "PRESETS", "load", "set_backend", "get_backend",
           "datasets", "io", "load_mnist", "load_digits", "__version__"]
