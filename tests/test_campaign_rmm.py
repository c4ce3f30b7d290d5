"""Model-state campaign for the shallow RMM: random small data and hyper-parameters, then every
operation a user can chain, checking the invariants of a fitted model.

Each case draws the data (1-12 samples of 1-6 features, flat or as small images; dtypes
float64/float32/int8/uint8/bool; magnitudes from 0 and 1e-300 to 1e200; duplicated rows), the
labels (none, or ints, unsigned ints, floats, strings, bools, object arrays with ``None`` and
NumPy scalars, each with a random share of unlabeled markers), and the hyper-parameters (every
one in its valid range), then runs fit, predict, predict_proba, decision_function, score,
sample, save + load, set_params, a second fit under the same seed, a warm-started fit and a
fit with other parameters. Invariants:

* every error is a ValueError or TypeError with a message (no other exception type, and no
  RuntimeWarning: a NaN or overflow never passes silently);
* a fitted model holds finite parameters (probabilities in (0, 1], a positive noise variance)
  and predicts its own training data, each predict_proba row summing to 1;
* predictions are unchanged by set_params and by save + load (same classes, same types);
* fit is deterministic under a seed;
* a warm-started fit and a fresh fit with other parameters end in a valid state too.

The suite runs a bounded number of cases (see ``campaign.py``; ``FASTDRMM_CAMPAIGN=long`` for
more), on the numpy backend so that no case waits for a JIT compilation.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import event, given, note
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

import fastdrmm
from campaign import campaign
from fastdrmm import RMM

MAGNITUDES = [0.0, 1e-300, 1e-20, 1e-3, 1.0, 1e3, 1e20, 1e140, 1e200]
X_DTYPES = [np.float64, np.float32, np.int8, np.uint8, np.bool_]
LABEL_KINDS = ["none", "int", "uint64", "float", "str", "bool", "object", "numpy objects"]

FITTED = ("templates_", "class_prior_", "nuisance_prior_", "switch_prior_", "noise_variance_",
          "lower_bound_", "lower_bounds_", "n_iter_", "converged_", "inference_")


@st.composite
def data(draw):
    """(X, y): small random data of a random kind, scale and label kind."""
    n = draw(st.integers(1, 12))
    image = draw(st.booleans())
    shape = ((draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
             if image else (draw(st.integers(1, 6)),))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, *shape))
    if n > 1 and draw(st.booleans()):  # duplicated rows
        base[n // 2:] = base[: n - n // 2]
    if draw(st.booleans()):  # a constant feature
        base.reshape(n, -1)[:, 0] = draw(st.sampled_from([0.0, 1.0, -3.0]))
    dtype = draw(st.sampled_from(X_DTYPES))
    scale = draw(st.sampled_from(MAGNITUDES))
    if dtype in (np.float64, np.float32):
        with np.errstate(over="ignore", under="ignore"):
            X = (base * scale).astype(dtype)
    elif dtype == np.bool_:
        X = base > 0
    else:
        info = np.iinfo(dtype)
        X = np.clip(np.round(base * 40), info.min, info.max).astype(dtype)
    note(f"X: {X.shape} {X.dtype}, scale {scale}, data seed {seed}")
    return X, draw(labels(n))


@st.composite
def labels(draw, n):
    kind = draw(st.sampled_from(LABEL_KINDS))
    if kind == "none":
        return None
    n_distinct = draw(st.integers(1, 3))
    codes = np.array(draw(st.lists(st.integers(0, n_distinct - 1), min_size=n, max_size=n)))
    unlabeled = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if kind == "uint64":  # no unlabeled marker exists; the largest value is a label
        return (np.uint64(2**64 - 1) - codes.astype(np.uint64))
    if kind == "bool":
        return codes % 2 == 0
    values = {"int": [7, 2**63 - 1, -5], "float": [0.5, 1e20, -2.0],
              "str": ["a", "b\u00e9", "-2"], "object": ["x", 2**70, 1.5],
              "numpy objects": [np.int16(3), np.float32(0.25), np.str_("s")]}[kind]
    if kind in ("object", "numpy objects"):
        # one Python/NumPy type per array keeps the labels comparable (sortable)
        which = draw(st.integers(0, 2))
        out = np.empty(n, dtype=object)
        for i in range(n):
            out[i] = None if unlabeled[i] else type(values[which])(
                values[which] if codes[i] == 0 else _variant(values[which], int(codes[i])))
        return out
    marker = {"int": -1, "float": -1.0, "str": "-1"}[kind]
    return np.array([marker if u else values[c] for c, u in zip(codes, unlabeled)])


def _variant(value, code):
    """Another label of the type of ``value``."""
    if isinstance(value, (str, np.str_)):
        return value + str(code)
    return value + code


hyper_parameters = st.fixed_dictionaries({
    "n_classes": st.integers(1, 4),
    "n_nuisances": st.integers(1, 3),
    "inference": st.sampled_from(["soft", "hard"]),
    "max_iter": st.integers(0, 5),
    "tol": st.sampled_from([0.0, 1e-4, 1e-2, 10.0]),
    "n_init": st.integers(1, 2),
    "reg": st.sampled_from([0.0, 1e-12, 1e-6, 1e-2, 1.0, 1e6]),
    "unlabeled_weight": st.sampled_from([0.0, 0.1, 1.0, 5.0]),
    "random_state": st.integers(0, 2**32 - 1),
    "backend": st.just("numpy"),
})


def expected_error(exc):
    assert isinstance(exc, (ValueError, TypeError)), f"{type(exc).__name__}: {exc}"
    assert str(exc).strip(), f"{type(exc).__name__} without a message"


def check_fitted(model):
    for name in FITTED[:7]:
        value = np.asarray(getattr(model, name), np.float64)
        assert np.isfinite(value).all(), f"{name} is not finite: {value}"
    assert model.noise_variance_ > 0 and 0 < model.switch_prior_ < 1
    for prior in (model.class_prior_, model.nuisance_prior_):
        assert prior.min() > 0 and prior.max() <= 1
        np.testing.assert_allclose(prior.sum(), 1.0, rtol=1e-9)
    assert len(model.lower_bounds_) == model.n_iter_


def outputs(model, X):
    return (model.predict(X), model.predict_proba(X), model.decision_function(X),
            model.score_samples(X))


def assert_same_outputs(got, want, what):
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w, err_msg=what)
    assert [type(v) for v in got[0]] == [type(v) for v in want[0]], what


def distinct_labels(y):
    """The number of distinct labels of ``y`` (unlabeled markers: -1, "-1", None; unsigned
    and bool arrays have none)."""
    if y.dtype.kind in "ub":
        return len(set(y.tolist()))
    return len({v for v in y.tolist() if v is not None and not (
        not isinstance(v, bool) and (v == -1 or v == "-1"))})


@campaign(60)
@given(data(), hyper_parameters, hyper_parameters, st.integers(-1, 1))
def test_campaign_rmm_model_state(case, params, other_params, extra_classes):
    X, y = case
    if y is not None and extra_classes >= 0:  # mostly as many classes as labels (or one more)
        params = dict(params, n_classes=max(1, distinct_labels(y) + extra_classes))
    note(f"y: {None if y is None else (y.dtype, y.tolist())}")
    note(f"params: {params}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("error", RuntimeWarning)
        try:
            model = RMM(**params).fit(X, y)
        except (ValueError, TypeError) as exc:
            expected_error(exc)
            note(f"refused: {exc}")
            event(f"fit refused: {str(exc)[:45]}")
            return
        event("fitted")
        check_fitted(model)
        before = outputs(model, X)
        proba = before[1]
        assert proba.shape == (len(X), len(model.classes_))
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
        assert set(before[0].tolist()) <= set(model.classes_.tolist())
        assert np.isfinite(model.score(X))
        xs, ys = model.sample(3, random_state=0)
        assert xs.shape == (3, *model.feature_shape_) and np.isfinite(xs).all()
        assert set(ys.tolist()) <= set(model.classes_.tolist())

        # fit is deterministic under a seed
        again = RMM(**params).fit(X, y)
        for name in FITTED + ("classes_",):
            np.testing.assert_array_equal(np.asarray(getattr(again, name)),
                                          np.asarray(getattr(model, name)), err_msg=name)

        # save + load keeps every prediction, the labels and their types
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.npz"
            model.save(path)
            loaded = fastdrmm.load(path)
        assert loaded.classes_.dtype == model.classes_.dtype
        assert_same_outputs(outputs(loaded, X), before, "after save + load")

        # set_params changes nothing until the next fit
        model.set_params(**{k: v for k, v in other_params.items() if k != "backend"})
        assert_same_outputs(outputs(model, X), before, "after set_params")
        # a warm start from the fitted state (same shapes), then a fresh fit with the others
        shapes = dict(n_classes=len(model.classes_), n_nuisances=len(model.nuisance_prior_))
        for settings in (dict(warm_start=True, **shapes), dict(warm_start=False)):
            try:
                model.set_params(**settings).fit(X, y)
            except (ValueError, TypeError) as exc:
                expected_error(exc)
                return
            check_fitted(model)
