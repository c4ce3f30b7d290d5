"""The monotone E-step (``em_monotone=True``): every training sample's latents are kept from
one iteration to the next, and each sample takes the better of its fresh latents and its
previous ones.

The bottom-up pass is max-sum within a layer but not jointly over overlapping patches and
layers, so the fresh latents of an E-step can be worse for a sample than its previous ones
under the new parameters: then a whole EM iteration can raise the objective (on small
problems about one iteration in four did). Keeping, per sample, whichever of the two has the
lower objective makes the E-step a coordinate step too, so that (with the M-step exact and
the templates not rescaled) no iteration raises the objective

    J_n = sum_l ||h[l-1] - R_l h[l]||^2 / (2 s2_l)
          - sum_units [a ln pa_l[k] + (1 - a) ln(1 - pa_l[k]) + a ln pt_l[offset]]

per sample (the terms of :func:`fastdrmm._em.objective` that depend on the sample's
latents; the top, which classifies, is left out). The previous codes are refined again under
the new templates first (never raising their J). The price is memory: every training
sample's codes, argmax positions and switches. (The ridge's scale, relative to the Gram
matrices' mean diagonal, also moves with the latents; it is ~1e-3 of the rendering terms and
not part of the per-sample choice.) On digits the monotone runs classify worse than the
default (2 layers: 0.94-0.97 held out against 0.98-0.99): keeping a sample's old latents
trains the templates on latents the bottom-up pass no longer infers.
"""

from __future__ import annotations

import numpy as np

from . import _amplitudes
from ._em import PROB_FLOOR  # one floor for every log-probability of the objective

__all__ = ["LatentStore", "sample_objective", "better_latents"]


class LatentStore:
    """The latents (codes h[1..L], argmax positions, switches) of ``n`` samples, filled as
    the E-step goes; ``empty`` until the first E-step has stored every sample."""

    def __init__(self, net, n, dtype):
        self.codes = [np.zeros((n, *net.code_shape(l)), dtype) for l in range(net.n_layers)]
        self.idxs = [np.zeros((n, *net.code_shape(l)), np.int32)
                     for l in range(net.n_layers)]
        self.switches = [np.zeros((n, *net.code_shape(l)), dtype)
                         for l in range(net.n_layers)]
        self.filled = np.zeros(n, bool)

    @property
    def nbytes(self):
        return sum(a.nbytes for group in (self.codes, self.idxs, self.switches) for a in group)

    def get(self, positions):
        """(codes, idxs, switches) of the samples at ``positions``, or None where any of
        them has none yet."""
        if not self.filled[positions].all():
            return None
        return ([c[positions] for c in self.codes], [i[positions] for i in self.idxs],
                [s[positions] for s in self.switches])

    def state_arrays(self):
        """The store as checkpoint arrays (names under ``latents.``)."""
        out = {"latents.filled": self.filled}
        for l in range(len(self.codes)):
            out[f"latents.codes{l}"] = self.codes[l]
            out[f"latents.idxs{l}"] = self.idxs[l]
            out[f"latents.switches{l}"] = self.switches[l]
        return out

    @classmethod
    def from_arrays(cls, net, n, dtype, arrays):
        """The store a checkpoint's arrays hold (None where it holds none); ValueError
        when they do not fit the network and the training samples."""
        if "latents.filled" not in arrays:
            return None
        store = cls(net, n, dtype)
        groups = (("codes", store.codes), ("idxs", store.idxs), ("switches", store.switches))
        for name, group in groups:
            for l, target in enumerate(group):
                key = f"latents.{name}{l}"
                got = np.asarray(arrays.get(key))
                if got.shape != target.shape or got.dtype != target.dtype:
                    raise ValueError(f"the array {key!r} does not fit the run's latents")
                target[...] = got
        filled = np.asarray(arrays["latents.filled"])
        if filled.shape != store.filled.shape or filled.dtype != bool:
            raise ValueError("the array 'latents.filled' does not fit the run's latents")
        store.filled[...] = filled
        return store

    def put(self, positions, latents):
        codes, idxs, switches = latents
        for l in range(len(self.codes)):
            self.codes[l][positions] = codes[l]
            self.idxs[l][positions] = idxs[l]
            self.switches[l][positions] = switches[l]
        self.filled[positions] = True


def _prior_term(net, p, l, idx, on):
    """-ln p(switches, positions) of layer l per sample (float64, (N,))."""
    layer = net.layers[l]
    pa = np.clip(np.asarray(p[f"switch_prior{l}"], np.float64), PROB_FLOOR, 1 - PROB_FLOOR)
    n_on = np.einsum("nkij->nk", on, dtype=np.float64)
    units = on[0, 0].size
    out = -(n_on @ np.log(pa) + (units - n_on) @ np.log1p(-pa))
    ph, pw = layer.window
    pt = np.log(np.clip(np.asarray(p[f"translation_prior{l}"], np.float64), PROB_FLOOR, None))
    if ph * pw == 1:
        return out - pt[0] * n_on.sum(axis=1)
    wo = net.shapes[l].plane[1]
    hp, wp = net.shapes[l].pooled
    corner = np.arange(hp)[:, None] * (ph * wo) + np.arange(wp)[None, :] * pw
    # the position relative to the window's corner (di * wo + dj) -> ln pt[di * pw + dj]
    table = np.zeros((ph - 1) * wo + pw)
    di, dj = np.divmod(np.arange(ph * pw), pw)
    table[di * wo + dj] = pt
    rel = np.asarray(idx, np.int64) - corner
    return out - np.einsum("nkij,nkij->n", table[rel], on, dtype=np.float64)


def sample_objective(net, p, x, latents):
    """J_n (float64, (N,)) of the latents (codes, idxs, switches) of the images x."""
    codes, idxs, switches = latents
    J = _amplitudes.rendering_objective(net, p, [x, *codes], idxs, switches)
    for l in range(net.n_layers):
        J = J + _prior_term(net, p, l, idxs[l], switches[l])
    return J


def better_latents(net, p, x, fresh, previous, steps):
    """Per sample, the fresh latents or the previous ones (their codes refined ``steps``
    steps under ``p`` first), whichever has the lower J_n; returns (latents, kept), ``kept``
    the mask of the samples that keep their previous latents."""
    codes, idxs, switches = previous
    if steps:
        codes = _amplitudes.refine(net, p, x, idxs, switches, codes, steps)
    previous = (codes, idxs, switches)
    kept = sample_objective(net, p, x, previous) < sample_objective(net, p, x, fresh)
    if not kept.any():
        return fresh, kept
    mask = kept[:, None, None, None]
    chosen = tuple([np.where(mask, old, new) for old, new in zip(prev_group, fresh_group)]
                   for prev_group, fresh_group in zip(previous, fresh))
    return chosen, kept
