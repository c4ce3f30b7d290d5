"""The command line's argument types made from scikit-learn parameter constraints
(fastdrmm._cli_params), on a hand-written constraints dict like the models' own
``_parameter_constraints``."""

import argparse
from numbers import Integral, Real

import pytest
from sklearn.utils._param_validation import Hidden, Interval, StrOptions

from fastdrmm._cli_params import class_list, integers, option_choices, option_type

CONSTRAINTS = {
    "max_iter": [Interval(Integral, 0, None, closed="left")],
    "learning_rate": [Interval(Real, 0, None, closed="neither")],
    "weight": [Interval(Real, 0, None, closed="left")],
    "teacher_decay": [Interval(Real, 0, 1, closed="left")],
    "validation_fraction": [Interval(Real, 0, 0.5, closed="both")],
    "upper": [Interval(Real, None, 2, closed="right")],
    "n_iter_no_change": [Interval(Integral, 1, None, closed="left"), None],
    "top": [StrOptions({"average", "full"})],
    "init": [StrOptions({"auto", "kmeans", "old"}, deprecated={"old"}),
             Hidden(StrOptions({"internal"}))],
    "random_state": ["random_state"],
}


def refusal(parse, text):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    return str(info.value)


def test_accepted_values_are_parsed_to_the_interval_type():
    assert option_type(CONSTRAINTS["max_iter"])(" 7 ") == 7
    assert type(option_type(CONSTRAINTS["max_iter"])("0")) is int
    assert option_type(CONSTRAINTS["learning_rate"])("1e-3") == 1e-3
    assert type(option_type(CONSTRAINTS["weight"])("2")) is float
    assert option_type(CONSTRAINTS["validation_fraction"])("0.5") == 0.5
    assert option_type(CONSTRAINTS["n_iter_no_change"])("3") == 3  # None: not spellable


@pytest.mark.parametrize("name, text, message", [
    ("max_iter", "-1", "must be >= 0, got -1"),
    ("max_iter", "many", "expected an integer, got 'many'"),
    ("max_iter", "1.5", "expected an integer, got '1.5'"),
    ("learning_rate", "0", "must be a finite number > 0, got 0"),
    ("learning_rate", "inf", "must be a finite number > 0, got inf"),
    ("learning_rate", "1e400", "must be a finite number > 0, got 1e400"),
    ("weight", "nan", "must be a finite number >= 0, got nan"),
    ("weight", "x", "expected a number, got 'x'"),
    ("teacher_decay", "1", "must be in [0, 1), got 1"),
    ("teacher_decay", "-0.1", "must be in [0, 1), got -0.1"),
    ("validation_fraction", "0.9", "must be in [0, 0.5], got 0.9"),
    ("upper", "3", "must be a finite number <= 2, got 3"),
    ("upper", "-inf", "must be a finite number <= 2, got -inf"),
    ("n_iter_no_change", "0", "must be >= 1, got 0"),
])
def test_refused_values_say_what_is_accepted(name, text, message):
    assert refusal(option_type(CONSTRAINTS[name]), text) == message


def test_the_command_line_narrows_a_parameter_to_its_bounds():
    epochs = option_type(CONSTRAINTS["max_iter"], integers(1, 1000))
    assert epochs("1000") == 1000
    assert refusal(epochs, "0") == "must be >= 1, got 0"   # the model would accept 0
    assert refusal(epochs, "-5") == "must be >= 1, got -5"
    assert refusal(epochs, "1001") == "must be <= 1000, got 1001"
    assert refusal(option_type(integers(0, 2**32 - 1)), str(2**64)) == \
        f"must be <= 4294967295, got {2**64}"
    assert option_type(integers(1))("123456789012345678901234567890") > 0
    # more digits than Python converts: refused as text, not as a crash
    assert refusal(option_type(integers(1)), "9" * 5000).startswith("expected an integer")


def test_argparse_names_the_option():
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--epochs", type=option_type(CONSTRAINTS["max_iter"], integers(1, 9)))
    with pytest.raises(argparse.ArgumentError, match=r"argument --epochs: must be <= 9, got 10"):
        parser.parse_args(["--epochs", "10"])
    assert parser.parse_args(["--epochs", "9"]).epochs == 9


def test_choices_list_the_default_first_then_the_rest_sorted():
    assert option_choices(CONSTRAINTS["top"], "full") == ["full", "average"]
    assert option_choices(CONSTRAINTS["top"]) == ["average", "full"]
    # deprecated and hidden options are accepted by the model but not offered
    assert option_choices(CONSTRAINTS["init"], "kmeans") == ["kmeans", "auto"]


@pytest.mark.parametrize("make", [
    lambda: option_type(CONSTRAINTS["random_state"]),        # no interval to spell
    lambda: option_type(CONSTRAINTS["top"]),
    lambda: option_type(CONSTRAINTS["weight"], integers(0, 3)),  # ints and reals mixed
    lambda: option_choices(CONSTRAINTS["max_iter"]),          # no strings
])
def test_constraints_a_command_line_cannot_spell_are_a_programming_error(make):
    with pytest.raises(ValueError):
        make()


def test_class_lists():
    parse = class_list(3)
    assert parse("0, 2,") == [0, 2]
    assert refusal(parse, "1,2,3,4") == "at most 3 class indices, got 4"
    assert refusal(parse, " , ") == "expected at least one class index"
    assert "expected comma-separated class indices" in refusal(parse, "1,x")


def test_the_command_line_checks_the_models_own_constraints(monkeypatch, capsys):
    from fastdrmm import cli
    from fastdrmm.drmm import DRMM
    from fastdrmm.rmm import RMM

    monkeypatch.setitem(DRMM._parameter_constraints, "batch_size",
                        [Interval(Integral, 8, None, closed="left")])
    monkeypatch.setitem(DRMM._parameter_constraints, "lr_schedule", [StrOptions({"step"})])
    monkeypatch.setitem(RMM._parameter_constraints, "unlabeled_weight",
                        [Interval(Real, 0, 1, closed="both")])
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--batch-size", "8"]).batch_size == 8
    for argv, message in ((["train", "--batch-size", "7"], "--batch-size: must be >= 8, got 7"),
                          (["train", "--batch-size", "4097"], "must be <= 4096"),  # its own
                          (["train", "--lr-schedule", "cosine"], "invalid choice: 'cosine'"),
                          (["demo", "--unlabeled-weight", "2"], "must be in [0, 1], got 2")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
