"""fastdrmm: fast, faithful inference and EM training of the Deep Rendering Mixture Model.

Public names: ``ops`` (the five ops), ``RMM`` (the shallow model), ``DRMM`` and
``Layer`` (the deep model and its layers; ``PRESETS``), ``load`` (a saved model),
``set_backend`` and ``get_backend`` (the default kernel backend), ``register_backend`` (add a
kernel backend, or stand in for one), ``datasets``
(``load_mnist``, ``load_digits``) and ``io`` (the versioned, atomic on-disk array format).

The names are imported on first use (PEP 562): ``import fastdrmm`` itself loads neither
NumPy, Numba nor scikit-learn, so that the command line starts (and answers Ctrl-C) at once.
``fastdrmm.RMM``, ``from fastdrmm import DRMM`` and ``dir(fastdrmm)`` work as usual.
"""

import importlib
import importlib.util

__version__ = "0.1.0"

#: public name -> the submodule that defines it (None: the name is the submodule itself)
_LAZY = {
    "ops": None, "datasets": None, "io": None,
    "RMM": ".rmm", "DRMM": ".drmm", "Layer": ".layers", "PRESETS": ".layers",
    "load": "._persistence", "set_backend": "._backends", "get_backend": "._backends",
    "register_backend": "._backends",
    "load_mnist": ".datasets", "load_digits": ".datasets",
}

__all__ = ["ops", "RMM", "DRMM", "Layer", "PRESETS", "load", "set_backend", "get_backend",
           "register_backend", "datasets", "io", "load_mnist", "load_digits", "__version__"]


def __getattr__(name):
    """Import a public name (or any submodule, e.g. ``fastdrmm.drmm``) on first access."""
    if name in _LAZY:
        source = _LAZY[name]
        if source is None:
            return importlib.import_module(f".{name}", __name__)
        value = getattr(importlib.import_module(source, __name__), name)
        globals()[name] = value  # later accesses skip this function
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
