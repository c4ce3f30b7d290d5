"""Campaign: the DRMM estimator's state under arbitrary sequences of operations, and runs
interrupted at a random epoch and resumed.

* Model-state fuzz: sequences of fit / partial_fit / set_params (valid and invalid values) /
  predict / save+load on a tiny DRMM. Invariants: the outputs depend only on the fitted state
  (nothing but fit, partial_fit or a load changes them); a fit starts from scratch (its result
  equals that of a fresh model with the same settings on the same data, whatever came
  before); every refused call raises ValueError or TypeError and leaves the model as it was
  and usable.
* Interrupted resume: an EG or EM run stopped by its callback at a random epoch and resumed
  with ``resume=True`` ends bit-identical to the uninterrupted run.

Tiny sizes (24 images of 1x12x12, one pooled layer, at most 3 epochs) keep the bounded
profile well under a minute; ``FASTDRMM_CAMPAIGN=long`` runs more cases (see campaign.py).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from campaign import BASE_SEED, LONG, campaign
from hypothesis import Phase, note
from hypothesis import strategies as st
from hypothesis import given

import fastdrmm
from fastdrmm import DRMM, Layer

PHASES = dict(phases=[Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if LONG
                                                                       else []))
LAYERS = [Layer(4, 3, padding=1, pool=2)]
OTHER_LAYERS = [Layer(3, 3, padding=1, pool=2)]
BASE = dict(layers=LAYERS, n_classes=3, max_iter=2, batch_size=8, random_state=0,
            validation_fraction=0.0, backend="cpu")


def _data():
    rng = np.random.default_rng([BASE_SEED, 15])
    X = rng.random((24, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    y[:3] = np.arange(3)
    semi = y.copy()
    semi[rng.random(24) < 0.4] = -1
    semi[:3] = np.arange(3)
    nan = X.copy()
    nan[2, 0, 5, 5] = np.nan
    return {"labeled": (X, y), "semi": (X, semi), "unlabeled": (X, None),
            "small": (X[:, :, :10, :10].copy(), y), "nan": (nan, y),
            "bad labels": (X, np.where(y == 2, 7, y)), "short labels": (X, y[:-1])}


DATA = _data()
PROBE = DATA["labeled"][0][:6]

#: (setting, value) pairs for set_params, some of them invalid (refused at the next fit)
# (hypothesis starts from the first entries: those that change the model's structure)
SETTINGS = st.sampled_from([
    ("algorithm", "em"), ("top", "full"), ("dtype", "float64"), ("n_classes", 4),
    ("layers", OTHER_LAYERS), ("algorithm", "eg"), ("algorithm", "sgd"),
    ("top", "average"), ("dtype", "float32"), ("dtype", "int8"),
    ("n_classes", 3), ("n_classes", 1), ("layers", LAYERS), ("layers", "nope"),
    ("learning_rate", 1e-3), ("learning_rate", 1e-2), ("learning_rate", -1.0),
    ("max_iter", 1), ("max_iter", 2), ("batch_size", 8), ("batch_size", 16),
    ("batch_size", 0), ("validation_fraction", 0.0), ("validation_fraction", 0.25),
    ("bias", "generative"), ("bias", "fixed"), ("translation", 0), ("translation", 1),
    ("random_state", 0), ("random_state", 1), ("random_state", -5),
])

DATA_NAMES = st.sampled_from(["semi", "labeled", "unlabeled", "small", "nan", "bad labels",
                               "short labels"])
OPERATIONS = st.one_of(
    st.tuples(st.just("set_params"), SETTINGS),
    st.tuples(st.just("partial_fit"), DATA_NAMES),
    st.tuples(st.just("fit"), DATA_NAMES),
    st.tuples(st.just("predict"), st.none()),
    st.tuples(st.just("save_load"), st.none()),
)

_FRESH_FITS = {}


def _fresh_fit(params, data_name):
    """A fresh model with these settings fitted on this data (cached: do not change it)."""
    key = (repr(sorted(params.items())), data_name)
    if key not in _FRESH_FITS:
        X, y = DATA[data_name]
        _FRESH_FITS[key] = DRMM(**params).fit(X, y)
    return _FRESH_FITS[key]


def _fresh_stream(fit, partial_fits):
    """The parameters of a fresh model fitted as ``fit`` = (settings, data) then given the
    ``partial_fits`` [(settings, data)] in order."""
    model = clone_fitted(_fresh_fit(*fit))
    for params, data_name in partial_fits:
        model.set_params(**params).partial_fit(*DATA[data_name])
    return model.parameters_


def clone_fitted(model):
    copy = DRMM(**model.get_params())
    copy.__dict__.update({k: v for k, v in model.__dict__.items() if k.endswith("_")})
    copy.parameters_ = dict(model.parameters_)
    return copy


def _outputs(model):
    if not hasattr(model, "parameters_"):
        return None
    return {"decision_function": model.decision_function(PROBE),
            "transform": model.transform(PROBE), "reconstruct": model.reconstruct(PROBE),
            "sample": model.sample(np.arange(model.classes_.size), random_state=0)}


def _assert_same(got, expected, context):
    if expected is None:
        assert got is None, context
        return
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"{name} after {context}")


def _assert_params_equal(got, expected, context):
    assert sorted(got) == sorted(expected), context
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"{name}: {context}")


def _state(model):
    return (model.get_params(), _outputs(model),
            None if not hasattr(model, "parameters_")
            else {k: np.copy(v) for k, v in model.parameters_.items()})


@campaign(8, **PHASES)
@given(first=st.sampled_from(["fit", "partial_fit", "none"]),
       operations=st.lists(OPERATIONS, min_size=2, max_size=6))
def test_campaign_model_state(first, operations):
    """Any sequence of operations: outputs follow only the fitted state, fit is a fresh
    start, refusals are ValueError/TypeError that change nothing. Most sequences start
    from a fitted model (the state whose invariants matter)."""
    if first != "none":
        operations = [(first, "semi")] + operations
    model = DRMM(**BASE)
    expected = None  # the outputs of the fitted state
    since_fit = None  # (the last fit, the partial_fits since) while the model's own
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (op, arg) in enumerate(operations):
            context = f"operation {i}: {op} {arg!r}"
            note(context)
            before = _state(model)
            try:
                if op == "fit":
                    X, y = DATA[arg]
                    model.fit(X, y)
                    _assert_params_equal(model.parameters_,
                                         _fresh_fit(model.get_params(), arg).parameters_,
                                         context)
                    since_fit = ((model.get_params(), arg), [])
                elif op == "partial_fit":
                    X, y = DATA[arg]
                    model.partial_fit(X, y)
                    if since_fit is not None:  # fit left no stale optimizer or statistics
                        since_fit[1].append((model.get_params(), arg))
                        _assert_params_equal(model.parameters_, _fresh_stream(*since_fit),
                                             f"{context}: a fit, then partial_fits")
                elif op == "set_params":
                    model.set_params(**{arg[0]: arg[1]})
                elif op == "predict":
                    _assert_same(_outputs(model), expected, context)
                else:  # save and load (an unfitted model: NotFittedError, a ValueError)
                    path = Path(tmp) / f"model{i}.npz"
                    model.save(path)
                    loaded = fastdrmm.load(path)
                    assert loaded.get_params() == model.get_params(), context
                    model, since_fit = loaded, None
            except (ValueError, TypeError) as exc:
                note(f"  refused: {type(exc).__name__}: {exc}")
                after = _state(model)
                assert after[0] == before[0], f"a refused {context} changed the settings"
                _assert_same(after[1], before[1], f"refused {context}")
                continue
            if op in ("fit", "partial_fit"):
                expected = _outputs(model)
            else:
                _assert_same(_outputs(model), expected, context)


# --------------------------------------------------------------------------------------------
# interrupted and resumed runs


class _Stop(Exception):
    pass


_WHOLE_RUNS = {}


def _whole_run(settings):
    key = repr(sorted(settings.items()))
    if key not in _WHOLE_RUNS:
        X, y = DATA["semi"]
        _WHOLE_RUNS[key] = DRMM(**settings).fit(X, y)
    return _WHOLE_RUNS[key]


def _without_times(history):
    return [{k: v for k, v in record.items() if k not in ("time", "compile_time")}
            for record in history]


@campaign(6, **PHASES)
@given(algorithm=st.sampled_from(["eg", "em"]), max_iter=st.integers(2, 3),
       stop_fraction=st.floats(0, 1), seed=st.integers(0, 3),
       validation=st.sampled_from([0.0, 0.25]), top=st.sampled_from(["average", "full"]))
def test_campaign_interrupted_run_resumes_bit_identical(algorithm, max_iter, stop_fraction,
                                                       seed, validation, top):
    settings = dict(BASE, algorithm=algorithm, max_iter=max_iter, random_state=seed,
                    validation_fraction=validation, top=top, tol=0.0)
    stop_at = 1 + min(int(stop_fraction * max_iter), max_iter - 1)
    note(f"stopped at epoch {stop_at} of {max_iter}")
    X, y = DATA["semi"]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = _whole_run(settings)
        ckpt = Path(tmp) / "run.ckpt"

        def stop(snapshot, record):
            if record["epoch"] == stop_at:
                raise _Stop

        with pytest.raises(_Stop):
            DRMM(**settings, checkpoint=ckpt).fit(X, y, callback=stop)
        assert ckpt.exists() == (stop_at > 1)
        resumed = DRMM(**settings, checkpoint=ckpt).fit(X, y, resume=True)
    _assert_params_equal(resumed.parameters_, whole.parameters_, "resumed vs whole run")
    assert resumed.n_iter_ == whole.n_iter_
    assert _without_times(resumed.history_) == _without_times(whole.history_)
    assert resumed.objective_history_ == whole.objective_history_
    assert resumed.best_iteration_ == whole.best_iteration_
