"""The shallow RMM's fitted state: its checks, and its saved form (writing and reading).

A saved RMM is a :mod:`fastdrmm.io` file whose arrays are ``templates``, ``class_prior``,
``nuisance_prior`` (and ``classes`` where the labels are of a NumPy dtype) and whose metadata
is ``{"model_class": "RMM", "params": get_params(), "fitted": {...}}``. Labels of an object
array are stored as JSON values with a type tag each (``fitted.classes``), so that a loaded
``classes_`` holds the same values of the same types, without pickle. Reading checks every
value after its cast to the working dtype; the metadata fields are read with
:mod:`fastdrmm._fields`, whose errors name the field.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from ._fields import (FieldError, bool_field, field, int_field, int_value, number_field,
                      number_value, short)
from ._inputs import NUMPY_LABEL_KINDS
from ._rmm_em import Params, clip_switch

#: a distribution's entries may sum to 1 within this (relative to 1) to be a distribution
_SUM_TOLERANCE = 1e-6
#: class labels stored as an array as they are; others (object arrays) as tagged JSON values
_NATIVE_CLASS_KINDS = "biufUS"
#: the fitted attributes stored as arrays, by file name
_SAVED_ARRAYS = ("templates", "class_prior", "nuisance_prior")
#: the fields of ``fitted``; "inference" and "classes" are absent from files of earlier versions
_FITTED_FIELDS = ("switch_prior", "noise_variance", "lower_bound", "lower_bounds",
                  "n_iter", "converged", "feature_shape")
_LATER_FITTED_FIELDS = ("inference", "classes")


# --------------------------------------------------------------------------------------------
# the fitted state


def fitted_params(model):
    """A fitted model's attributes in working form, every value checked: finite templates of
    the fitted shape, priors in (0, 1] that sum to 1 (within ``_SUM_TOLERANCE``; renormalised
    exactly), a switch prior in (0, 1), a positive finite noise variance, and finite weights
    ``mu / sigma^2`` and biases ``||mu||^2 / (2 sigma^2)``. A ValueError names the attribute
    otherwise."""
    feature_shape = tuple(model.feature_shape_)
    mu = np.asarray(model.templates_, np.float64)
    if mu.ndim != 2 + len(feature_shape) or mu.shape[2:] != feature_shape:
        raise ValueError(f"templates_ has shape {mu.shape}, expected (n_classes, "
                         f"n_nuisances, *{feature_shape})")
    n_classes, n_nuisances = mu.shape[:2]
    mu = np.ascontiguousarray(mu.reshape(n_classes * n_nuisances, -1))
    if not np.isfinite(mu).all():
        raise ValueError("templates_ contains NaN or infinity")
    pc = _checked_distribution(model.class_prior_, n_classes, "class_prior_")
    pg = _checked_distribution(model.nuisance_prior_, n_nuisances, "nuisance_prior_")
    pa = _checked_real(model.switch_prior_, "switch_prior_")
    if not 0.0 < pa < 1.0:
        raise ValueError(f"switch_prior_ must be in (0, 1), got {pa!r}")
    s2 = _checked_real(model.noise_variance_, "noise_variance_")
    if not s2 > 0:
        raise ValueError(f"noise_variance_ must be positive and finite, got {s2!r}")
    with np.errstate(over="ignore", invalid="ignore"):
        bias = np.einsum("kd,kd->k", mu, mu) / (2.0 * s2)
        weight = np.abs(mu).max() / s2
    if not (np.isfinite(bias).all() and np.isfinite(weight)):
        raise ValueError(f"templates_ (max |mu| = {np.abs(mu).max():.3g}) and "
                         f"noise_variance_ ({s2:.3g}) give infinite match weights or biases")
    return Params(mu, pc, pg, clip_switch(pa), s2, feature_shape)


def check_fitted_values(params, objective, bounds):
    """The state a fit is about to store: every parameter finite and valid, else ValueError
    (reached only when the data's scale, or ``reg``, is beyond float64's range)."""
    problems = []
    if not np.isfinite(params.mu).all():
        problems.append("templates")
    if not (np.isfinite(params.s2) and params.s2 > 0):
        problems.append(f"noise variance {params.s2!r}")
    for name, p in (("class prior", params.pc), ("nuisance prior", params.pg)):
        if not (np.isfinite(p).all() and p.min() > 0):
            problems.append(name)
    if not 0.0 < params.pa < 1.0:
        problems.append(f"switch prior {params.pa!r}")
    if not (np.isfinite(objective) and np.isfinite(bounds).all()):
        problems.append("objective")
    if problems:
        raise ValueError(
            f"fitting produced non-finite parameters ({', '.join(problems)}): the data's scale "
            "or reg is beyond float64's range; rescale X or lower reg")


def _checked_real(value, name):
    """A finite real number as a float, else a ValueError/TypeError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {value!r:.80}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _checked_distribution(p, size, name):
    """A 1-d probability vector of ``size`` entries in (0, 1] summing to 1, as float64 (cast
    first, then checked), renormalised exactly."""
    p = np.asarray(p)
    if p.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if p.shape != (size,):
        raise ValueError(f"{name} has shape {p.shape}, expected ({size},)")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or infinity")
    if not (p.min() > 0 and p.max() <= 1):
        raise ValueError(f"{name} must hold probabilities in (0, 1], got values in "
                         f"[{p.min()!r}, {p.max()!r}]")
    total = float(p.sum())
    if not abs(total - 1.0) <= _SUM_TOLERANCE:
        raise ValueError(f"{name} must sum to 1, sums to {total!r}")
    return p / total


# --------------------------------------------------------------------------------------------
# writing


def saved_contents(model, params):
    """(arrays, metadata) of the file of a fitted model whose ``get_params()`` are ``params``
    (a seed that is not an int is saved as None)."""
    fitted_params(model)  # a file is never written that load would refuse
    params = dict(params)
    if not (params["random_state"] is None or _is_int(params["random_state"])):
        params["random_state"] = None
    arrays = {"templates": np.asarray(model.templates_),
              "class_prior": np.asarray(model.class_prior_),
              "nuisance_prior": np.asarray(model.nuisance_prior_)}
    classes = np.asarray(model.classes_)
    if classes.dtype.kind in _NATIVE_CLASS_KINDS:
        arrays["classes"] = classes
        class_entry = {"encoding": "array"}
    else:
        class_entry = _encode_object_classes(classes)
    fitted = {"switch_prior": float(model.switch_prior_),
              "noise_variance": float(model.noise_variance_),
              "lower_bound": float(model.lower_bound_),
              "lower_bounds": [float(b) for b in model.lower_bounds_],
              "n_iter": int(model.n_iter_), "converged": bool(model.converged_),
              "feature_shape": [int(d) for d in model.feature_shape_],
              "inference": model._fitted_inference(), "classes": class_entry}
    return arrays, {"model_class": "RMM", "params": params, "fitted": fitted}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _label_entry(value):
    """(type tag, JSON value) of one label of an object array."""
    if isinstance(value, np.generic):
        if value.dtype.kind not in NUMPY_LABEL_KINDS:
            raise TypeError(f"classes_ holds {value!r:.80} of dtype {value.dtype}, which cannot "
                            "be saved")
        return "numpy:" + value.dtype.str, value.item()
    for tag, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, kind):
            return tag, kind(value)
    raise TypeError(f"classes_ holds {value!r:.80} of type {type(value).__name__}, which "
                    "cannot be saved (labels are ints, floats, strings or bools)")


def _encode_object_classes(classes):
    entries = [_label_entry(v) for v in classes.tolist()]
    return {"encoding": "values", "types": [t for t, _ in entries],
            "values": [v for _, v in entries]}


# --------------------------------------------------------------------------------------------
# reading


def read_params(meta, names):
    """The ``params`` of a saved model's metadata: exactly the estimator's ``names``, with a
    seed that is null or an int (each value is checked by the estimator's constraints)."""
    check_keys(meta, ("model_class", "params", "fitted"), (), "metadata")
    params = field(meta, "params", "", (dict,), "an object")
    check_keys(params, names, (), "params")
    seed = params["random_state"]
    if seed is not None and not _is_int(seed):
        raise FieldError(f"the field 'params.random_state' must be null or an integer, got "
                         f"{short(seed)}")
    return params


def read_fitted(model, arrays, meta):
    """Set the fitted attributes of ``model`` (built from the file's params) from the file's
    arrays and ``fitted`` metadata, every value checked; returns the model."""
    where = "fitted."
    fitted = field(meta, "fitted", "", (dict,), "an object")
    check_keys(fitted, _FITTED_FIELDS, _LATER_FITTED_FIELDS, "fitted")
    feature_shape = field(fitted, "feature_shape", where, (list,),
                          "a list of 1 or 3 integers >= 1")
    if len(feature_shape) not in (1, 3):
        raise FieldError(f"the field 'fitted.feature_shape' must be a list of 1 or 3 integers "
                         f">= 1, got {short(feature_shape)}")
    feature_shape = tuple(int_value(d, f"fitted.feature_shape[{i}]", 1)
                          for i, d in enumerate(feature_shape))
    inference = fitted.get("inference", model.inference)
    if inference not in ("soft", "hard"):
        raise FieldError(f"the field 'fitted.inference' must be 'soft' or 'hard', got "
                         f"{short(inference)}")
    n_iter = int_field(fitted, "n_iter", where)
    lower_bounds = field(fitted, "lower_bounds", where, (list,), "a list of numbers")
    if len(lower_bounds) != n_iter:
        raise FieldError(f"fitted: n_iter={n_iter} with {len(lower_bounds)} lower_bounds "
                         "(one per EM iteration)")
    bounds = [number_value(b, f"fitted.lower_bounds[{i}]") for i, b in enumerate(lower_bounds)]
    class_entry = fitted.get("classes", {"encoding": "array"})
    expected = list(_SAVED_ARRAYS)
    if isinstance(class_entry, dict) and class_entry.get("encoding") == "array":
        expected.append("classes")
    if sorted(arrays) != sorted(expected):
        raise ValueError(f"the file holds the arrays {sorted(arrays)}, expected "
                         f"{sorted(expected)}")
    model.templates_ = _float_array(arrays, "templates")
    model.class_prior_ = _float_array(arrays, "class_prior")
    model.nuisance_prior_ = _float_array(arrays, "nuisance_prior")
    model.switch_prior_ = number_field(fitted, "switch_prior", where)
    model.noise_variance_ = number_field(fitted, "noise_variance", where)
    model.feature_shape_ = feature_shape
    model.n_features_in_ = math.prod(feature_shape)
    # the fitted shapes are the templates' (the parameters n_classes and n_nuisances may
    # have been changed by set_params after the fit: they shape the next fit only)
    if model.templates_.ndim != 2 + len(feature_shape) or \
            model.templates_.shape[2:] != feature_shape:
        raise ValueError(f"arrays['templates'] has shape {model.templates_.shape}, expected "
                         f"(n_classes, n_nuisances, *{feature_shape}) "
                         "(fitted.feature_shape)")
    n_classes = model.templates_.shape[0]
    fitted_params(model)  # every value checked (finite, probabilities, shapes)
    model.classes_ = _decode_classes(class_entry, arrays.get("classes"), n_classes,
                                     "fitted.classes")
    model.inference_ = inference
    model.lower_bound_ = number_field(fitted, "lower_bound", where)
    model.lower_bounds_ = bounds
    model.n_iter_ = n_iter
    model.converged_ = bool_field(fitted, "converged", where)
    return model


def check_keys(mapping, required, optional, where):
    """``mapping`` a dict holding every ``required`` key and no key outside ``optional``."""
    if not isinstance(mapping, dict):
        raise FieldError(f"the field '{where}' must be an object, got {type(mapping).__name__}")
    missing = [k for k in required if k not in mapping]
    unknown = [k for k in mapping if k not in required and k not in optional]
    if missing or unknown:
        raise FieldError(f"the field '{where}': missing fields {missing}, unknown fields "
                         f"{[str(k)[:40] for k in unknown[:10]]}")


def _float_array(arrays, name):
    """A saved real array as float64, cast first, then checked finite."""
    arr = arrays[name]
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"arrays[{name!r}] must be real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):
        out = arr.astype(np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"arrays[{name!r}] holds NaN or infinity (as float64)")
    return out


def _label_value(tag, value, where):
    """The label of one saved (type tag, JSON value) pair, checked."""
    if tag in ("bool", "int", "float", "str"):
        kind = {"bool": "b", "int": "i", "float": "f", "str": "U"}[tag]
        make = {"bool": bool, "int": int, "float": float, "str": str}[tag]
    elif isinstance(tag, str) and tag.startswith("numpy:"):
        try:
            dtype = np.dtype(tag[6:])
        except (TypeError, ValueError, SyntaxError):
            dtype = None
        if dtype is None or dtype.str != tag[6:] or dtype.kind not in NUMPY_LABEL_KINDS:
            raise ValueError(f"{where}: unknown label type {tag!r:.80}")
        kind, make = dtype.kind, dtype.type
    else:
        raise ValueError(f"{where}: unknown label type {tag!r:.80}")
    expected = {"b": bool, "i": int, "u": int, "f": (int, float), "U": str}[kind]
    if not isinstance(value, expected) or (kind != "b" and isinstance(value, bool)):
        raise ValueError(f"{where}: a {tag} label cannot be {value!r:.80}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            label = make(value)
    except (OverflowError, ValueError, RuntimeWarning):
        raise ValueError(f"{where}: {value!r:.80} is not a {tag} value") from None
    if kind == "f" and not math.isfinite(label):
        raise ValueError(f"{where}: label {value!r:.80} is not finite")
    if kind in "iu" and int(label) != value:
        raise ValueError(f"{where}: {value!r:.80} is not a {tag} value")
    return label


def _decode_classes(entry, array, n_classes, where):
    """``classes_`` of a saved model: the array, or the tagged values, checked (n_classes
    distinct finite labels)."""
    if not isinstance(entry, dict) or entry.get("encoding") not in ("array", "values"):
        raise ValueError(f"{where} must be {{'encoding': 'array'}} or "
                         f"{{'encoding': 'values', 'types': [...], 'values': [...]}}")
    if entry["encoding"] == "array":
        check_keys(entry, ("encoding",), (), where)
        return _checked_class_array(array, n_classes)
    check_keys(entry, ("encoding", "types", "values"), (), where)
    types, values = entry["types"], entry["values"]
    if not (isinstance(types, list) and isinstance(values, list)
            and len(types) == len(values) == n_classes):
        raise ValueError(f"{where}: 'types' and 'values' must be lists of n_classes="
                         f"{n_classes} entries")
    labels = [_label_value(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(types, values))]
    if len(set(labels)) != n_classes:
        raise ValueError(f"{where} holds repeated labels")
    classes = np.empty(n_classes, dtype=object)
    for i, label in enumerate(labels):
        classes[i] = label
    return classes


def _checked_class_array(classes, n_classes):
    """The saved array of labels: n_classes distinct finite labels of a native dtype."""
    if classes.dtype.kind not in _NATIVE_CLASS_KINDS:
        raise ValueError(f"arrays['classes'] has dtype {classes.dtype}")
    if classes.shape != (n_classes,):
        raise ValueError(f"arrays['classes'] has shape {classes.shape}, expected "
                         f"({n_classes},)")
    if classes.dtype.kind == "f" and not np.isfinite(classes).all():
        raise ValueError("arrays['classes'] holds NaN or infinity")
    if np.unique(classes).size != n_classes:
        raise ValueError("arrays['classes'] holds repeated labels")
    return classes
