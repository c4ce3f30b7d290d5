"""The paper's top-down M-step (``em_targets="top-down"``): each layer's templates fitted so
that the top-down rendering from the chosen class, through the latents recorded bottom-up,
explains the layer below (generalised least squares, top layer first).

(Stub: returns the bottom-up M-step's parameters; see issue #17 item 3.)
"""

from __future__ import annotations

__all__ = ["m_step"]


def m_step(run, params, fitted, stats):
    """The parameters of the top-down M-step, from the run's current ``params``, the
    bottom-up M-step's result ``fitted`` (priors, noise variances) and its statistics."""
    return fitted
