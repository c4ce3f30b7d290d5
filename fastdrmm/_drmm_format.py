"""The DRMM's saved form: what ``DRMM.save`` writes and how a file becomes a model again.

A saved model is a :mod:`fastdrmm.io` archive: the parameters as arrays and a JSON metadata
record ``{"model_class": "DRMM", "params": <the settings>, "fitted": <the fitted state>,
"user": <the caller's metadata>}``. Reading checks everything before a model exists: the
settings (as ``DRMM`` itself checks them), every field of the fitted state
(:mod:`fastdrmm._fields`), every array's name, shape and values in the model's dtype, and a
probe inference, so that a damaged file is a ValueError naming what is wrong. Training
checkpoints (:mod:`fastdrmm._checkpoint`) share this module's readers.
"""

from __future__ import annotations

import os

import numpy as np

from . import io
from ._drmm_params import DTYPES
from ._fields import (FieldError, bool_field, choice_value, field, history_fields, int_field,
                      int_value, number_field, shape_field, short)
from ._network import network_for
from .layers import resolve_layers

__all__ = ["metadata", "save", "load_saved", "model_from_parts", "serial_params", "settings_field",
           "run_fields", "param_arrays", "params_from_arrays"]

#: the fitted settings inference reads, with the values each may take (None: an integer)
_FITTED_SETTINGS = {"algorithm": ("em", "eg"), "top": ("average", "full"), "n_classes": None,
                    "dtype": tuple(DTYPES), "amplitude_steps": None}
#: the least value of each integer fitted setting
_FITTED_MINIMUM = {"n_classes": 2, "amplitude_steps": 0}
#: distributions: each array's entries are probabilities summing to 1
_DISTRIBUTIONS = ("translation_prior", "class_prior")
#: arrays of probabilities, one per unit
_PROBABILITIES = ("switch_prior",)
#: arrays that must be > 0
_POSITIVE = ("noise_variance", "top_noise_variance", "class_scale")
#: the largest image (in values) the load-time probe runs on
_PROBE_LIMIT = 1 << 20


# --------------------------------------------------------------------------------------------
# writing


def serial_params(model):
    """``model.get_params()`` in JSON form (layers as dicts, the seed as an int or None)."""
    params = model.get_params()
    layers = params["layers"]
    if not isinstance(layers, str):
        params["layers"] = [layer.to_dict() for layer in resolve_layers(layers)]
    if not (params["random_state"] is None or isinstance(params["random_state"], int)):
        params["random_state"] = None
    if params["checkpoint"] is not None:
        params["checkpoint"] = os.fspath(params["checkpoint"])
    return params


def param_arrays(p):
    """The parameters as the arrays a file holds."""
    return {name: np.asarray(value) for name, value in p.items()}


def metadata(model, user=None):
    """The metadata record of the fitted ``model`` (``user``: the caller's, or None)."""
    meta = {"model_class": "DRMM", "params": serial_params(model), "fitted": {
        "layers": [layer.to_dict() for layer in model.layers_],
        "input_shape": list(model.input_shape_),
        "n_iter": int(model.n_iter_),
        "history": model.history_,
        "objective_history": [list(t) for t in model.objective_history_],
        "validation_score": model.validation_score_,
        "best_iteration": int(model.best_iteration_),
        "converged": bool(model.converged_),
        "algorithm": model.algorithm_,
        "top": model.top_,
        "n_classes": int(model.classes_.size),
        "dtype": model.dtype_,
        "amplitude_steps": int(model.amplitude_steps_),
    }}
    if user is not None:
        meta["user"] = user
    return meta


def save(model, path, user=None):
    """Write the fitted ``model`` to ``path`` atomically, with the caller's metadata."""
    if user is not None and not isinstance(user, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(user).__name__}")
    io.save_arrays(path, param_arrays(model.parameters_), metadata(model, user))


# --------------------------------------------------------------------------------------------
# reading


def settings_field(meta):
    """The checked ``params`` record (the settings; layers resolved where given as a list)."""
    params = field(meta, "params", "", (dict,), "an object of settings")
    layers = params.get("layers")
    if isinstance(layers, list):
        try:
            params = dict(params, layers=list(resolve_layers(layers)))
        except (TypeError, ValueError) as exc:
            raise FieldError(f"the field 'params.layers' is invalid: {exc}") from None
    elif layers is not None and not isinstance(layers, str):
        raise FieldError(f"the field 'params.layers' must be a preset name or a list of "
                         f"layers, got {short(layers)}")
    return dict(params)


def run_fields(node, where, *, count, score, best):
    """The record of a run so far that a saved model and a checkpoint both hold, under the
    names each gives them: the images' shape, the epochs run (``count``), the histories,
    the best validation score (``score``), the epoch it came from (``best``), convergence."""
    history, objective_history = history_fields(node, where)
    return {"input_shape": shape_field(node, "input_shape", where),
            count: int_field(node, count, where),
            "history": history, "objective_history": objective_history,
            score: number_field(node, score, where, optional=True),
            best: int_field(node, best, where),
            "converged": bool_field(node, "converged", where)}


def _fitted_field(meta):
    """The checked ``fitted`` record of a saved model."""
    node = field(meta, "fitted", "", (dict,), "an object")
    fitted = run_fields(node, "fitted.", count="n_iter", score="validation_score",
                        best="best_iteration")
    for name in _FITTED_SETTINGS:
        fitted[name] = node.get(name)
    layers = field(node, "layers", "fitted.", (list,), "a list of layers")
    try:
        fitted["layers"] = resolve_layers(layers)
    except (TypeError, ValueError) as exc:
        raise FieldError(f"the field 'fitted.layers' is invalid: {exc}") from None
    return fitted


def load_saved(cls, arrays, meta, path):
    """The model of class ``cls`` a saved file holds (ValueError naming what is wrong)."""
    try:
        return model_from_parts(cls, arrays, meta, _fitted_field(meta))
    except FieldError as exc:
        raise ValueError(f"{path}: not a valid saved DRMM: {exc}") from None


def _model_of_settings(cls, meta):
    """(model, layers) of the saved settings, checked as ``cls`` checks its own."""
    params = settings_field(meta)
    try:
        model = cls(**params)
    except TypeError as exc:
        raise FieldError(f"the field 'params' holds unknown settings: {exc}") from None
    try:
        layers, _ = model._check_params()
    except (TypeError, ValueError) as exc:
        raise FieldError(f"the field 'params' holds an invalid setting: {exc}") from None
    return model, layers


def model_from_parts(cls, arrays, meta, fitted):
    """The model of saved settings (``meta["params"]``), checked fitted state and arrays;
    every failure a FieldError naming the field."""
    model, layers = _model_of_settings(cls, meta)
    for name, choices in _FITTED_SETTINGS.items():
        value = fitted.get(name)
        if value is None:  # written before the fitted settings were recorded
            fitted[name] = getattr(model, name)
        elif choices is None:
            fitted[name] = int_value(value, f"fitted.{name}", _FITTED_MINIMUM[name])
        else:
            choice_value(value, f"fitted.{name}", choices)
    if fitted.get("layers") is not None:
        layers = fitted["layers"]
    try:
        net = network_for(layers, fitted["input_shape"], fitted["n_classes"], model.backend,
                          fitted["algorithm"], fitted["top"])
        values = params_from_arrays(arrays, net, DTYPES[fitted["dtype"]])
    except (TypeError, ValueError, OverflowError) as exc:
        raise FieldError(str(exc)) from None
    model._set_fitted(net, values, n_iter=fitted["n_iter"], history=fitted["history"],
                      objective_history=fitted["objective_history"],
                      validation_score=fitted["validation_score"],
                      best_iteration=fitted["best_iteration"], converged=fitted["converged"],
                      amplitude_steps=fitted["amplitude_steps"])
    model.user_metadata_ = meta.get("user")
    _check_probe_scores(model)
    return model


def params_from_arrays(arrays, net, dtype):
    """The parameter dict from saved arrays, every name, shape and value checked.

    Values are checked in the dtype the model computes with (a float64 1e300 is finite, its
    float32 cast is not): every value finite, every probability in (0, 1] (and each
    distribution summing to 1), every variance and the class scale > 0."""
    p = {}
    optional = net.optional_parameter_shapes()
    present = [name for name in optional if name in arrays]
    if present and len(present) != len(optional):
        missing = sorted(set(optional) - set(present))
        raise ValueError(f"the array {missing[0]!r} is missing (the shared-covariance top "
                         f"needs {' and '.join(sorted(optional))})")
    for name, shape in {**net.parameter_shapes(),
                        **{name: optional[name] for name in present}}.items():
        if name not in arrays:
            raise ValueError(f"the array {name!r} is missing")
        arr = np.asarray(arrays[name])
        if arr.shape != shape:
            raise ValueError(f"the array {name!r} has shape {arr.shape}, expected {shape}")
        if arr.dtype.kind != "f":
            raise ValueError(f"the array {name!r} has dtype {arr.dtype}, expected floats")
        trainable = name[:1] in "Wb" and name[1:].isdigit() or name in ("mu", "beta",
                                                                          "class_weights")
        with np.errstate(over="ignore"):
            p[name] = np.array(arr, dtype if trainable else np.float64)
        _check_parameter_values(name, p[name])
    return p


def _check_parameter_values(name, value):
    """Refuse a parameter whose values no fitted model holds (ValueError naming it)."""
    stem = name.rstrip("0123456789")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"the array {name!r} holds NaN or infinity (in {value.dtype})")
    if stem in _DISTRIBUTIONS + _PROBABILITIES and not np.all((value > 0) & (value <= 1)):
        raise ValueError(f"the array {name!r} holds probabilities outside (0, 1]")
    if stem in _DISTRIBUTIONS and abs(float(np.sum(value)) - 1.0) > 1e-6 * max(value.size, 1):
        raise ValueError(f"the array {name!r} is a distribution but sums to "
                         f"{float(np.sum(value))!r}, not 1")
    if stem in _POSITIVE and not np.all(value > 0):
        raise ValueError(f"the array {name!r} must be > 0")
    if name == "top_covariance" and not (
            np.array_equal(value, value.T) and np.all(np.diagonal(value) >= 0)):
        raise ValueError(f"the array {name!r} must be a symmetric matrix with a non-negative "
                         "diagonal (a covariance)")


def _check_probe_scores(model):
    """Refuse parameters that are finite but so large that inference overflows: the class
    scores of three probe images (zeros, halves, ones) must be finite."""
    if int(np.prod(model.input_shape_)) > _PROBE_LIMIT:
        return
    probe = np.ones((3, *model.input_shape_), DTYPES[model.dtype_])
    probe *= np.array([0.0, 0.5, 1.0], probe.dtype)[:, None, None, None]
    with np.errstate(all="ignore"):
        scores = model._raw_scores(probe)
    if not np.all(np.isfinite(scores)):
        raise FieldError("the parameters are finite but give non-finite class scores on a "
                         "probe image (values too large for the model's dtype)")
