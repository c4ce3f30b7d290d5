"""Coherent amplitudes: the E-step's codes refined, given the latents chosen bottom-up, so
that each layer's code renders the layer below in the least-squares sense (non-negative).

(Stub: the identity; see issue #17 item 2.)
"""

from __future__ import annotations

__all__ = ["refine_codes"]


def refine_codes(net, p, fw, switches, steps):
    """The codes [x, h[1], ..., h[L]] refined by ``steps`` projected-gradient steps on the
    rendering objective with the latents (argmax positions ``fw.idxs``, ``switches``) fixed;
    ``steps=0`` returns ``fw.hs`` itself."""
    return fw.hs
