"""The input checks, seeds and progress helpers the models share (fastdrmm._inputs,
fastdrmm._progress): errors name the argument, and seeds give each model the streams it has
always drawn."""

from __future__ import annotations

import numbers

import numpy as np
import pytest
from sklearn.utils import check_random_state as sklearn_random_state
from sklearn.utils._param_validation import (InvalidParameterError,
                                             validate_parameter_constraints)
from threadpoolctl import threadpool_info

from fastdrmm import _inputs, _progress
from fastdrmm._inputs import (RANDOM_STATE, Count, Number, as_labels,
                              check_images, check_labels, check_random_state, check_samples,
                              seed_of, unlabeled_mask)

# ------------------------------------------------------------------------------------ samples


@pytest.mark.parametrize("value, error, message", [
    (object(), TypeError, "must hold real numbers"),
    (np.zeros((3, 4), complex), TypeError, "dtype complex"),
    (np.array([["a", "b"]]), TypeError, "real numbers"),
    (np.zeros((3, 2, 2)), ValueError, r"reshape \(N, H, W\)"),
    (np.zeros(4), ValueError, "2-d array"),
    (np.zeros((0, 4)), ValueError, "no samples"),
    (np.zeros((3, 0)), ValueError, "empty feature dimension"),
    (np.array([[1.0, np.nan]]), ValueError, "NaN or infinity"),
    (np.array([[1.0, -np.inf]]), ValueError, "NaN or infinity"),
])
def test_sample_errors_name_the_argument(value, error, message):
    with pytest.raises(error, match=f"data.*{message}|{message}.*data|^data"):
        check_samples(value, "data")


def test_samples_are_contiguous_arrays_of_the_dtype():
    x = np.arange(24, dtype=np.int8).reshape(2, 3, 4).transpose(0, 2, 1).reshape(2, 12)
    out = check_samples(x)
    assert out.dtype == np.float64 and out.flags.c_contiguous
    assert np.array_equal(out, x)
    images = check_samples(np.ones((2, 1, 3, 3), bool), dtype=np.float32)
    assert images.dtype == np.float32 and images.shape == (2, 1, 3, 3)


def test_images_are_four_dimensional_of_the_fitted_shape():
    with pytest.raises(ValueError, match="X must be a 4-d array"):
        check_images(np.zeros((2, 9)))
    with pytest.raises(ValueError, match=r"images.*\(1, 3, 3\).*fitted on.*\(1, 2, 2\)"):
        check_images(np.zeros((2, 1, 3, 3)), "images", input_shape=(1, 2, 2))
    out = check_images(np.zeros((2, 1, 2, 2), np.float64), input_shape=(1, 2, 2))
    assert out.dtype == np.float32
    assert check_images(out, dtype=np.float32) is out  # no copy of a clean array


def test_magnitude_beyond_float64_sums_is_refused():
    x = np.full((4, 2), 1e154)
    with pytest.raises(ValueError, match="Z holds values up to .*rescale Z"):
        _inputs.check_magnitude(x, "Z")
    _inputs.check_magnitude(x / 1e6)


# ------------------------------------------------------------------------------------- labels


def test_class_index_labels():
    assert np.array_equal(check_labels(None, 3, 2), [-1, -1, -1])
    assert check_labels(np.array([0, 1, -1]), 3, 2).dtype == np.int64
    assert np.array_equal(check_labels(np.array([1.0, -1.0]), 2, 2), [1, -1])
    for bad in (np.array([2**64 - 1, 0], np.uint64), np.array([0.5, 0.0]), np.array([0, 2])):
        with pytest.raises(ValueError, match="labels must be integer class indices"):
            check_labels(bad, 2, 2, "labels")
    with pytest.raises(ValueError, match=r"yy must have shape \(3,\)"):
        check_labels([0, 1], 3, 2, "yy")
    with pytest.raises(TypeError, match="yy must hold integer class indices"):
        check_labels(["a", "b"], 2, 2, "yy")


def test_labels_of_any_kind_keep_their_values_and_markers():
    big = as_labels([2**64 - 1, 0, -1])
    assert big.dtype == object and big[0] == 2**64 - 1
    assert np.array_equal(unlabeled_mask(big), [False, False, True])
    assert not unlabeled_mask(np.array([2**64 - 1], np.uint64)).any()
    assert np.array_equal(unlabeled_mask(np.array(["a", "-1"])), [False, True])
    assert np.array_equal(unlabeled_mask(np.array([None, True, -1.0], object)),
                          [True, False, True])
    with pytest.raises(ValueError, match="labels contains NaN"):
        unlabeled_mask(np.array([0.0, np.nan]), "labels")
    with pytest.raises(TypeError, match="labels holds the label"):
        unlabeled_mask(np.array([object()], object), "labels")
    with pytest.raises(TypeError, match="labels must hold class labels"):
        unlabeled_mask(np.array([1j]), "labels")


# -------------------------------------------------------------------------------------- seeds


def test_seed_of_draws_the_int_each_model_always_drew():
    assert seed_of(7) == 7 and seed_of(np.int64(2**40)) == 2**40
    assert type(seed_of(np.int32(3))) is int
    assert seed_of(np.random.RandomState(5)) == np.random.RandomState(5).randint(0, 2**31 - 1)
    assert seed_of(np.random.default_rng(5)) == np.random.default_rng(5).integers(0, 2**63 - 1)
    fresh = seed_of(None)
    assert isinstance(fresh, int) and 0 <= fresh < 2**63


def test_random_state_is_scikit_learns_where_scikit_learn_takes_it():
    for seed in (0, 12345, 2**32 - 1, np.int64(9)):
        assert np.array_equal(check_random_state(seed).random_sample(5),
                              sklearn_random_state(seed).random_sample(5))
    rs = np.random.RandomState(3)
    assert check_random_state(rs) is rs
    assert check_random_state(None) is sklearn_random_state(None)


def test_random_state_from_a_generator_or_a_large_int_is_reproducible():
    def draws(seed):
        return check_random_state(seed).random_sample(4)
    assert np.array_equal(draws(2**40), draws(2**40))
    assert not np.array_equal(draws(2**40), draws(2**40 + 1))
    assert np.array_equal(draws(np.random.default_rng(1)), draws(np.random.default_rng(1)))


@pytest.mark.parametrize("helper", [seed_of, check_random_state])
def test_bad_seeds_name_the_argument(helper):
    for bad in ("seed", 1.5, True, [1]):
        with pytest.raises(TypeError, match="rs must be None, an int >= 0"):
            helper(bad, "rs")
    with pytest.raises(ValueError, match="rs must be >= 0, got -1"):
        helper(-1, "rs")


def test_constraints_refuse_bools_nan_and_infinity():
    constraints = {"count": [Count(1)], "tol": [Number(numbers.Real, 0, None, closed="left")],
                   "random_state": RANDOM_STATE}
    good = dict(count=np.int64(2), tol=0, random_state=np.random.default_rng(0))
    validate_parameter_constraints(constraints, good, "f")
    for name, value in [("count", True), ("count", 0), ("count", 2.0), ("tol", np.nan),
                        ("tol", np.inf), ("tol", False), ("random_state", -1),
                        ("random_state", "seed"), ("random_state", True)]:
        with pytest.raises(InvalidParameterError, match=f"'{name}' parameter"):
            validate_parameter_constraints(constraints, {**good, name: value}, "f")


# ----------------------------------------------------------------------------------- progress


def test_say_writes_one_line_only_when_enabled(capsys):
    _progress.say("hello", False)
    assert capsys.readouterr().out == ""
    _progress.say("hello", True)
    assert capsys.readouterr().out == "hello\n"
    assert _progress.announcer(False) is None
    _progress.announcer(True)("compiling")
    assert capsys.readouterr().out == "compiling\n"


def test_silent_progress_bar_and_batches():
    bar = _progress.progress_bar(10, "work", False)
    bar.update(3)
    bar.set_postfix(loss=1.0)
    bar.close()
    assert _progress.bar_count(bar) == 1
    assert list(_progress.batches(5, 2)) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert list(_progress.batches(0, 2)) == []


def test_serial_blas_limits_blas_to_one_thread_inside_only():
    @_progress.serial_blas
    def threads():
        """Doc."""
        return [info["num_threads"] for info in threadpool_info()
                if info["user_api"] == "blas"]
    assert threads.__doc__ == "Doc."
    assert all(n == 1 for n in threads())


def test_backend_names_are_read_when_checked(monkeypatch):
    from fastdrmm import _backends
    from fastdrmm._inputs import BackendName
    constraint = BackendName()
    assert constraint.is_satisfied_by("auto") and constraint.is_satisfied_by("numpy")
    assert not constraint.is_satisfied_by("fortran") and not constraint.is_satisfied_by(1)
    monkeypatch.setitem(_backends.BACKENDS, "fortran", _backends.BACKENDS["numpy"])
    assert constraint.is_satisfied_by("fortran")
    assert "'fortran'" in str(constraint)
