"""Argument types of the command line, made from parameter constraints.

The models declare what each of their parameters accepts as scikit-learn constraint objects
(``Interval``, ``StrOptions``, ... in ``_parameter_constraints``, the lists
``sklearn.utils._param_validation`` checks). The command line checks its options against the
same objects, so that an option and the parameter it sets cannot drift apart:
:func:`option_type` turns a constraint list into an argparse ``type=`` function and
:func:`option_choices` turns one into argparse ``choices=``.

Two rules are the command line's own: a number must be finite (a model parameter may accept
``inf``; a command line never means it), and the command line may narrow a parameter's range
(``bound``) to the sizes it accepts (its maximums are stated in ``--help``). The command
line's own options (sizes, seeds) are described the same way, by :func:`integers` and
:func:`reals`.

This module imports scikit-learn: the command line imports it while it builds its parser,
never when it is itself imported (that must stay instant; see ``fastdrmm.cli``).
"""

from __future__ import annotations

import argparse
import math
from numbers import Integral, Real

from sklearn.utils._param_validation import Interval, StrOptions, make_constraint

__all__ = ["integers", "reals", "option_type", "option_choices", "class_list"]


def integers(low, high=None):
    """The constraint list of an integer option in [low, high] (no upper end when None)."""
    return [Interval(Integral, low, high, closed="left" if high is None else "both")]


def reals(low, high, closed="both"):
    """The constraint list of a real-number option in the interval from low to high (either
    end None: unbounded), ``closed`` as scikit-learn's Interval says."""
    return [Interval(Real, low, high, closed=closed)]


def option_type(constraints, bound=None):
    """An argparse ``type=`` function for a number option.

    ``constraints`` is a parameter's constraint list (as in a model's
    ``_parameter_constraints``): the value must satisfy one of its :class:`Interval` entries
    (those the command line can spell). ``bound``, an optional constraint list of the command
    line's own, narrows it further and is checked first. The text is read as an integer when
    every interval is over the integers, else as a (finite) float. A refused value raises
    ``argparse.ArgumentTypeError``, which argparse prints as ``argument --x: <message>``.
    """
    checks = [_intervals(bound)] if bound is not None else []
    checks.append(_intervals(constraints))
    kinds = {iv.type is Integral for intervals in checks for iv in intervals}
    if len(kinds) > 1:
        raise ValueError("an option's intervals must all be over the integers or all over "
                         f"the reals: {constraints!r}, bound {bound!r}")
    kind = int if kinds == {True} else float

    def parse(text):
        value = _number(text, kind)
        for intervals in checks:
            if not (math.isfinite(value) and any(iv.is_satisfied_by(value) for iv in intervals)):
                raise argparse.ArgumentTypeError(_refusal(intervals[0], value, text))
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def option_choices(constraints, default=None):
    """The strings a parameter's constraint list accepts (its :class:`StrOptions`, hidden and
    deprecated ones left out) as an argparse ``choices=``: ``default`` first (as ``--help``
    lists it), then the others sorted."""
    choices = set()
    for constraint in map(make_constraint, constraints):
        if isinstance(constraint, StrOptions) and not getattr(constraint, "hidden", False):
            choices |= set(constraint.options) - set(constraint.deprecated)
    if not choices:
        raise ValueError(f"no string options among the constraints {constraints!r}")
    return sorted(choices, key=lambda choice: (choice != default, choice))


def class_list(most):
    """An argparse ``type=`` function for a comma-separated list of at most ``most`` class
    indices (whether each is a class of the model is checked once the model is loaded)."""

    def parse(text):
        parts = [part for part in text.split(",") if part.strip()]
        if len(parts) > most:
            raise argparse.ArgumentTypeError(
                f"at most {most} class indices, got {len(parts)}")
        try:
            values = [int(part) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(
                "expected comma-separated class indices such as 0,1,2, got "
                f"{text[:60]!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one class index")
        return values

    return parse


# --------------------------------------------------------------------------------------------
# helpers


def _intervals(constraints):
    intervals = [c for c in map(make_constraint, constraints) if isinstance(c, Interval)]
    if not intervals:
        raise ValueError(f"no numeric interval among the constraints {constraints!r}")
    return intervals


def _number(text, kind):
    try:
        return kind(text.strip())
    except ValueError:  # also Python's limit on the digits of an int
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _refusal(interval, value, text):
    """The message for a value outside ``interval``: integers name the end they cross
    ("must be >= 1, got 0"), other numbers the whole range ("must be in [0, 1), got 1")."""
    low_mark = ">=" if interval.closed in ("left", "both") else ">"
    high_mark = "<=" if interval.closed in ("right", "both") else "<"
    low, high = interval.left, interval.right
    if interval.type is Integral:
        if low is not None and (value < low or (value == low and low_mark == ">")):
            return f"must be {low_mark} {_bound_text(low)}, got {value}"
        return f"must be {high_mark} {_bound_text(high)}, got {value}"
    if low is not None and high is not None:
        left = "[" if low_mark == ">=" else "("
        right = "]" if high_mark == "<=" else ")"
        return f"must be in {left}{_bound_text(low)}, {_bound_text(high)}{right}, got {text}"
    if low is not None:
        return f"must be a finite number {low_mark} {_bound_text(low)}, got {text}"
    if high is not None:
        return f"must be a finite number {high_mark} {_bound_text(high)}, got {text}"
    return f"must be a finite number, got {text}"


def _bound_text(bound):
    """1 and 1.0 as "1", 0.5 as "0.5", 2**32 - 1 in full."""
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))
