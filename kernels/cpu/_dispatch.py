"""The dispatch shape every op module of the cpu backend shares.

An op module names its algorithms (``ALGORITHMS``), has one ``plan_<op>(...)`` that returns
the name the automatic choice takes, and one ``algorithm="auto"`` keyword on the op that
forces a name (``choose``). A fast kernel that cannot compute some samples exactly (a
non-finite value, an accuracy screen) flags them, and the op recomputes those with an exact
kernel (``redo_flagged``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["choose", "redo_flagged"]


def choose(algorithm, names, plan):
    """The algorithm a call runs: ``plan()`` for "auto", else ``algorithm`` if it is one of
    ``names`` (a ValueError naming the argument otherwise)."""
    if algorithm == "auto":
        return plan()
    if algorithm not in names:
        raise ValueError(f"algorithm must be 'auto' or one of {', '.join(map(repr, names))}, "
                         f"got {algorithm!r}")
    return algorithm


def redo_flagged(redo, exact, *per_sample, into=None):
    """Recompute the samples flagged (non-zero) in ``redo``: ``exact`` gets each
    ``per_sample`` array cut to them (None stays None). Returns its result, or None when no
    sample is flagged; with ``into`` (an array, or a tuple of arrays, first axis the
    samples) the result is written to the flagged samples there too."""
    again = np.flatnonzero(redo)
    if not again.size:
        return None
    result = exact(*(None if a is None else a[again] for a in per_sample))
    if isinstance(into, tuple):
        for out, part in zip(into, result):
            out[again] = part
    elif into is not None:
        into[again] = result
    return result
