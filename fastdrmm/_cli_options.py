"""What the commands of the command line share: the bounds of their options, the data-set
options, and the backend a command computes on.

Only the standard library at import time (see ``fastdrmm.cli``).
"""

from __future__ import annotations

from ._cli_data import DATASETS, CLIError

__all__ = ["HOST_BACKENDS", "BACKEND_CHOICES", "MAX_EPOCHS", "MAX_BATCH", "MAX_TRANSLATION",
           "MAX_SEED", "MAX_IMAGES", "MAX_CLASSES_LISTED", "MAX_NUISANCES", "MAX_EM_ITER",
           "add_data_options", "add_backend_option", "host_backend"]

#: the backends the command line computes on (its models keep their arrays on the host)
HOST_BACKENDS = ("cpu", "numpy")
#: the --backend choices: the GPU ones too, so that choosing one is refused with the reason
BACKEND_CHOICES = ("auto", "cpu", "numpy", "numba-cuda", "cupy")

#: the largest values the options accept (larger runs go through the Python API)
MAX_EPOCHS = 1_000_000
MAX_BATCH = 4096
MAX_TRANSLATION = 32
MAX_SEED = 2**32 - 1
MAX_IMAGES = 1000  # reconstruct -n, sample --per-class
MAX_CLASSES_LISTED = 100
MAX_NUISANCES = 256
MAX_EM_ITER = 10_000


def add_data_options(p, dataset_default="mnist"):
    """--dataset, --data-dir and --download (``dataset_default`` None: the model's own)."""
    if dataset_default is None:
        help_ = "the data set (default: the one whose images have the model's shape)"
    else:
        help_ = f"the data set (default {dataset_default})"
    p.add_argument("--dataset", choices=sorted(DATASETS), default=dataset_default, help=help_)
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="the directory holding the MNIST IDX files (default: $FASTDRMM_DATA/"
                        "mnist, else ~/.cache/fastdrmm/mnist)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing MNIST files (checksummed) into that directory")



def add_backend_option(p, default="auto"):
    """--backend (``default`` None: the model's own setting)."""
    if default is None:
        help_ = "the kernel backend: cpu or numpy (default: the model's own setting)"
    else:
        help_ = "the kernel backend: cpu or numpy (default auto: $FASTDRMM_BACKEND, else cpu)"
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=default, help=help_)


def host_backend(requested):
    """The host backend a command computes on, checked before any work: ``requested`` is the
    --backend value (None: the model's own, "auto": $FASTDRMM_BACKEND, else cpu). A GPU
    backend is refused (the command line's models keep their arrays on the host), saying
    plainly when this machine has no usable GPU; a missing package names its extra."""
    from . import _backends

    name, option = requested, "--backend"
    if name in (None, "auto"):
        try:
            chosen = _backends.get_backend()
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        name, option = ("cpu", None) if chosen == "auto" else (chosen, f"${_backends.ENV_VAR}")
    if name not in HOST_BACKENDS:
        reason = _backends.device_unavailable_reason(name)
        where = (f"{option}={name}" if option and option.startswith("$")
                 else f"{option} {name}")
        why = f"{name} runs on a GPU" + (f", and {reason}" if reason else "")
        raise CLIError(f"{where}: {why}; the command line computes on the host: use "
                       "--backend cpu or --backend numpy"
                       + (f" (or unset {option[1:]})" if option.startswith("$") else ""))
    _backends.load(name)  # an ImportError naming the extra when its package is missing
    return name
