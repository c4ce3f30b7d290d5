"""Checked reading of the JSON metadata a saved model or checkpoint holds.

A file that passed :mod:`fastdrmm.io`'s checks (format, sizes, sha256) can still carry
metadata no writer of this library produces: a field missing, a list where a number belongs.
The readers here take one field each and raise :class:`FieldError` (a ValueError) naming the
field by its dotted path (``where`` is the path of the enclosing object, e.g.
``"checkpoint."``), so that loading refuses such a file with a message that says what is
wrong instead of a KeyError from deep inside.
"""

from __future__ import annotations

import math

__all__ = ["FieldError", "short", "field", "int_value", "int_field", "number_value", "number_field",
           "bool_field", "choice_value", "shape_field", "history_fields"]


class FieldError(ValueError):
    """A field of a file's metadata is missing or malformed (the message names the field)."""


def short(value, limit=60):
    """``repr(value)``, cut to ``limit`` characters (a field may hold anything, of any size)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _kind_of(value):
    return "null" if value is None else type(value).__name__


def field(node, key, where, kinds, what):
    """``node[key]`` when it is one of ``kinds`` (bool never counts as a number); ``what``
    describes the expected value in the error."""
    if key not in node:
        raise FieldError(f"the field '{where}{key}' is missing")
    value = node[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise FieldError(f"the field '{where}{key}' must be {what}, got "
                         f"{_kind_of(value)} {short(value)}")
    return value


def int_value(value, name, minimum=0):
    """``value`` when it is an integer >= ``minimum`` (the field's full name ``name``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FieldError(f"the field '{name}' must be an integer >= {minimum}, got "
                         f"{short(value)}")
    return value


def int_field(node, key, where, minimum=0):
    """An integer field >= ``minimum``."""
    return int_value(field(node, key, where, (int,), "an integer"), where + key, minimum)


def number_value(value, name):
    """``value`` as a float when it is a finite number, not a bool (the field's full name
    ``name``); a JSON integer too large for a float counts as infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"the field '{name}' must be a number, got {_kind_of(value)} "
                         f"{short(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise FieldError(f"the field '{name}' must be finite, got {short(value)}")
    return number


def number_field(node, key, where, optional=False):
    """A finite number as a float (``optional``: a missing or null field is None)."""
    if optional and node.get(key, 0) is None:
        return None
    value = field(node, key, where, (int, float), "a number" + (" or null" if optional else ""))
    return number_value(value, where + key)


def bool_field(node, key, where, default=None):
    """A true/false field; a missing one is ``default`` where that is given."""
    if default is not None and key not in node:
        return default
    return field(node, key, where, (bool,), "true or false")


def choice_value(value, name, choices):
    """``value`` when it is one of ``choices`` (the field's full name ``name``)."""
    if value not in choices:
        raise FieldError(f"the field '{name}' must be one of {list(choices)}, got "
                         f"{short(value)}")
    return value


def shape_field(node, key, where):
    """An image shape: a list of 3 integers >= 1 (C, H, W)."""
    shape = field(node, key, where, (list,), "a list of 3 integers (C, H, W)")
    if len(shape) != 3:
        raise FieldError(f"the field '{where}{key}' must be a list of 3 integers (C, H, W), "
                         f"got {short(shape)}")
    return [int_value(v, f"{where}{key}[{i}]", 1) for i, v in enumerate(shape)]


def history_fields(node, where):
    """(history, objective_history): a list of records and a list of (before, after) pairs
    of numbers (as tuples of floats)."""
    history = field(node, "history", where, (list,), "a list of records")
    for i, record in enumerate(history):
        if not isinstance(record, dict):
            raise FieldError(f"the field '{where}history[{i}]' must be a record, got "
                             f"{short(record)}")
    pairs = field(node, "objective_history", where, (list,), "a list of (before, after) pairs")
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)):
            raise FieldError(f"the field '{where}objective_history[{i}]' must be a pair of "
                             f"numbers, got {short(pair)}")
        out.append((float(pair[0]), float(pair[1])))
    return list(history), out
