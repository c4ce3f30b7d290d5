"""A DRMM training run's checkpoint: written after every epoch, read to resume or to load.

The file is a :mod:`fastdrmm.io` archive like a saved model: the current parameters (and the
best ones under ``best.``, the optimizer's moments under ``adam.``) and the metadata
``{"model_class": "DRMM", "params": <the settings>, "checkpoint": <the run's state>}``. The
state records the seed, epoch and step counters, the histories, the early-stopping record and
the identity of the training data (size, shape, sha256 of X and y), so that a resumed run
refuses other settings (all but :data:`fastdrmm._drmm_params.RESUMABLE`) or other data, and
ends exactly as an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from . import io
from ._drmm_format import (model_from_parts, param_arrays, params_from_arrays, run_fields,
                           serial_params, settings_field)
from ._drmm_params import RESUMABLE
from ._fields import FieldError, bool_field, field, int_field, int_value

__all__ = ["write_checkpoint", "read_checkpoint", "load_checkpoint", "data_identity",
           "check_checkpoint_path"]


# --------------------------------------------------------------------------------------------
# writing


def write_checkpoint(run, path):
    """Write the state of ``run`` (a :class:`fastdrmm._training.Training`) to ``path``."""
    arrays = param_arrays(run.params)
    if run.best_params is not None:
        arrays.update({f"best.{k}": v for k, v in param_arrays(run.best_params).items()})
    optimizer = run.strategy.optimizer
    if optimizer is not None:
        arrays.update(optimizer.state_arrays())
    if run.latents is not None:  # the monotone E-step's memory (em_monotone)
        arrays.update(run.latents.state_arrays())
    state = {
        "seed": run.seed, "epoch": run.epoch, "step": run.step,
        "input_shape": list(run.net.input_shape), "history": run.history,
        "objective_history": [list(t) for t in run.objective_history],
        "best_score": run.best_score, "best_epoch": run.best_epoch,
        "no_improve": run.no_improve, "converged": run.converged,
        "has_best": run.best_params is not None,
        "adam_t": 0 if optimizer is None else optimizer.t,
        "data": run.data_identity,
    }
    meta = {"model_class": "DRMM", "params": serial_params(run.model), "checkpoint": state}
    io.save_arrays(path, arrays, meta)


# --------------------------------------------------------------------------------------------
# reading


def _state_field(meta, for_resume=False):
    """The checked ``checkpoint`` record (the fields that loading reads; with ``for_resume``
    also those that resuming reads)."""
    node = field(meta, "checkpoint", "", (dict,), "an object")
    w = "checkpoint."
    state = run_fields(node, w, count="epoch", score="best_score", best="best_epoch")
    state["has_best"] = bool_field(node, "has_best", w, default=False)
    if for_resume:
        state.update(seed=int_field(node, "seed", w), step=int_field(node, "step", w),
                     no_improve=int_field(node, "no_improve", w),
                     adam_t=int_field(node, "adam_t", w), data=_data_field(node, w))
    return state


def _data_field(node, where):
    """The identity of the training data a checkpoint records (None: not recorded)."""
    if node.get("data") is None:
        return None
    data = field(node, "data", where, (dict,), "an object")
    w = where + "data."
    shape = field(data, "shape", w, (list,), "a list of integers")
    return {"n_samples": int_field(data, "n_samples", w),
            "shape": [int_value(v, f"{w}shape[{i}]") for i, v in enumerate(shape)],
            "x_sha256": field(data, "x_sha256", w, (str,), "a hex digest"),
            "y_sha256": field(data, "y_sha256", w, (str,), "a hex digest")}


def _best_arrays(arrays):
    return {k[5:]: v for k, v in arrays.items() if k.startswith("best.")}


def load_checkpoint(cls, arrays, meta, path):
    """The model (of class ``cls``) a checkpoint holds: its best parameters where it kept
    them, else the latest."""
    try:
        state = _state_field(meta)
        best = state["has_best"]
        chosen = _best_arrays(arrays) if best else {
            k: v for k, v in arrays.items() if not k.startswith(("best.", "adam.", "latents."))}
        epoch = state["epoch"]
        params = settings_field(meta)
        fitted = {"input_shape": state["input_shape"], "n_iter": epoch,
                  "history": state["history"], "objective_history": state["objective_history"],
                  "validation_score": state["best_score"],
                  "best_iteration": state["best_epoch"] if best else epoch,
                  "converged": state["converged"],
                  # a checkpoint is written by the run with these settings
                  "algorithm": params.get("algorithm"), "top": params.get("top", "average"),
                  "n_classes": params.get("n_classes"), "dtype": params.get("dtype")}
        return model_from_parts(cls, chosen, meta, fitted)
    except FieldError as exc:
        raise ValueError(f"{path}: not a valid DRMM checkpoint: {exc}") from None


def read_checkpoint(model, path, net, data, dtype):
    """The training state of the checkpoint at ``path``, checked against the settings of
    ``model``, the network ``net`` and the data (``data``: :func:`data_identity` of X and y);
    the parameters in ``dtype``."""
    arrays, meta = io.load_arrays(path)
    if meta.get("model_class") != "DRMM" or "checkpoint" not in meta:
        raise ValueError(f"{path}: not a DRMM checkpoint")
    try:
        settings_field(meta)  # checked; compared below as written (layers as dicts)
        theirs = meta["params"]
        state = _state_field(meta, for_resume=True)
    except FieldError as exc:
        raise ValueError(f"{path}: not a valid DRMM checkpoint: {exc}") from None
    _check_same_run(model, path, theirs, state, net, data)
    try:
        state["params"] = params_from_arrays(arrays, net, dtype)
        if state["has_best"]:
            state["best_params"] = params_from_arrays(_best_arrays(arrays), net, dtype)
    except ValueError as exc:
        raise ValueError(f"{path}: not a valid DRMM checkpoint: {exc}") from None
    state["arrays"] = arrays
    return state


def _check_same_run(model, path, theirs, state, net, data):
    """Refuse to resume a checkpoint written with other settings or on other data."""
    mine = serial_params(model)
    defaults = type(model)().get_params()  # settings added after the file was written
    differ = sorted(k for k in mine
                    if k not in RESUMABLE and theirs.get(k, defaults[k]) != mine[k])
    if differ:
        raise ValueError(f"{path}: the checkpoint was written with other settings "
                         f"({', '.join(differ)}); refusing to resume")
    if tuple(state["input_shape"]) != net.input_shape:
        raise ValueError(f"{path}: the checkpoint is for images of shape "
                         f"{tuple(state['input_shape'])}, not {net.input_shape}")
    if state["data"] is not None:
        differences = _data_differences(state["data"], data)
        if differences:
            raise ValueError(f"{path}: the checkpoint was trained on other data "
                             f"({'; '.join(differences)}); refusing to resume")


# --------------------------------------------------------------------------------------------
# the identity of the training data (refuses to resume a run on other data)


def data_identity(X, yidx):
    """Size, shape and sha256 of the (checked) images and labels of a run."""
    return {"n_samples": int(X.shape[0]), "shape": [int(s) for s in X.shape],
            "x_sha256": hashlib.sha256(memoryview(np.ascontiguousarray(X)).cast("B"))
            .hexdigest(),
            "y_sha256": hashlib.sha256(np.ascontiguousarray(yidx, np.int64).tobytes())
            .hexdigest()}


def _data_differences(recorded, given):
    """What differs between the data a checkpoint was trained on and the data given."""
    out = []
    if recorded["n_samples"] != given["n_samples"]:
        out.append(f"{recorded['n_samples']} samples, not {given['n_samples']}")
    elif list(recorded["shape"]) != list(given["shape"]):
        out.append(f"X of shape {tuple(recorded['shape'])}, not {tuple(given['shape'])}")
    elif recorded["x_sha256"] != given["x_sha256"]:
        out.append("the images X differ (sha256)")
    if recorded["n_samples"] == given["n_samples"] and recorded["y_sha256"] != given["y_sha256"]:
        out.append("the labels y differ (sha256: other labels or another labeled subset)")
    return out


def check_checkpoint_path(checkpoint):
    """A checkpoint path that a training run can write (checked before the first epoch):
    not a directory, not a special file, in an existing writable directory."""
    path = os.path.abspath(os.fspath(checkpoint))
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {checkpoint!s} is a directory; give the path of a file "
                         "to write")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"checkpoint {checkpoint!s} exists and is not a regular file")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(f"checkpoint {checkpoint!s}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"checkpoint {checkpoint!s}: the directory {parent} is not writable")
