"""The DRMM's settings, specified once: what each may hold, and which may change on resume.

``PARAMETER_CONSTRAINTS`` is scikit-learn's declarative form (``DRMM._parameter_constraints``,
checked by ``BaseEstimator._validate_params`` before any work, with an
``InvalidParameterError``, a ValueError and TypeError, that names the setting). The command
line builds its argument checks from the same table, and a checkpoint's resume check reads
``RESUMABLE``: every other setting must be the one the checkpoint was written with.
"""

from __future__ import annotations

import os
from numbers import Real

import numpy as np
from sklearn.utils._param_validation import StrOptions

from . import _backends
from ._inputs import NON_NEGATIVE, POSITIVE, RANDOM_STATE, Count, Number
from ._optim import SCHEDULES

__all__ = ["PARAMETER_CONSTRAINTS", "RESUMABLE", "DTYPES", "HOST_BACKENDS", "LOSS_WEIGHTS"]

#: the backends the model layer computes on (its arrays live on the host; the GPU backends
#: serve fastdrmm.ops directly)
HOST_BACKENDS = ("auto", "cpu", "numpy")
#: the working precisions, by name
DTYPES = {"float32": np.float32, "float64": np.float64}
#: the EG terms' weights: setting name -> field of fastdrmm._network.LossWeights
LOSS_WEIGHTS = {"xent_weight": "xent", "reconstruction_weight": "reconstruction",
                "entropy_weight": "entropy", "nonnegativity_weight": "nonnegativity",
                "kl_weight": "kl", "consistency_weight": "consistency"}

# an interval open at an unbounded end refuses infinity too (a weight of inf is no weight)
_FRACTION = Number(Real, 0, 1, closed="both")

#: what every setting may hold (``layers`` is resolved, with its own errors, after this;
#: a device ``backend`` gets its own hint first: see ``check_host_backend``)
PARAMETER_CONSTRAINTS = {
    "layers": "no_validation",  # resolve_layers checks it (any sequence of layers)
    "n_classes": [Count(2)],
    "algorithm": [StrOptions({"eg", "em"})],
    "max_iter": [Count(0)],
    "batch_size": [Count(1)],
    "learning_rate": [POSITIVE],
    "lr_schedule": [StrOptions(set(SCHEDULES))],
    **{name: [NON_NEGATIVE] for name in LOSS_WEIGHTS},
    "translation": [Count(0)],
    # 1 would freeze the targets' model
    "teacher_decay": [Number(Real, 0, 1, closed="left")],
    "confidence_threshold": [_FRACTION],
    "weight_decay": [NON_NEGATIVE],
    "ridge": [POSITIVE],
    "bias": [StrOptions({"generative", "fixed"})],
    "unlabeled_weight": [NON_NEGATIVE],
    "validation_fraction": [Number(Real, 0, 0.5, closed="both")],
    "n_iter_no_change": [None, Count(1)],
    "tol": [NON_NEGATIVE],
    "init": [StrOptions({"auto", "he", "patches", "em"})],
    "dtype": [StrOptions(set(DTYPES))],
    "backend": [StrOptions(set(HOST_BACKENDS))],
    "random_state": RANDOM_STATE,
    "verbose": [Count(0)],
    "checkpoint": [None, str, os.PathLike],
    "top": [StrOptions({"average", "full"})],
    "amplitude_steps": [Count(0)],
    "em_targets": [StrOptions({"bottom-up", "top-down"})],
    "shrinkage": [StrOptions({"auto", "oas"}), _FRACTION],
    "em_monotone": ["boolean"],
}

#: the settings a resumed run may change (where it runs, how long, how it reports, where it
#: writes): the rest shape the run's result and must match the checkpoint's
RESUMABLE = ("max_iter", "n_iter_no_change", "verbose", "checkpoint", "backend")


def check_host_backend(backend):
    """A ValueError with the hint a GPU backend name needs: the DRMM keeps its arrays on the
    host (the GPU backends serve ``fastdrmm.ops``). Other bad values are left to the
    constraints."""
    if isinstance(backend, str) and backend not in HOST_BACKENDS and backend in _backends.BACKENDS:
        raise ValueError(f"backend must be one of {HOST_BACKENDS}, got {backend!r}: the model "
                         "keeps its arrays on the host (the GPU backends are available through "
                         "fastdrmm.ops)")
