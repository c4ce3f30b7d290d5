"""The paper's top-down M-step (``em_targets="top-down"``): each layer's templates fitted so
that the top-down rendering from the chosen class, through the latents recorded bottom-up,
explains the layer below (generalised least squares, top layer first).

Layers are numbered 1..L here, as in :mod:`fastdrmm._em` (0..L-1 in the code). With the
E-step's latents of sample n fixed (its class c, and at every layer the argmax
positions idx[l] and switches a[l] of the bottom-up pass under the current parameters), the
rendering starts from the class template on the top plane, ``r[L] = mu[c]``
(:meth:`fastdrmm._network.Network.top_code`), and layer l's templates are fitted against the
code below, T[l-1] (the image for l = 1; else the bottom-up code h[l-1], refined as the
E-step refines it when ``amplitude_steps`` > 0)::

    minimise over W_l   sum_n w_n ||T[l-1] - render(r[l], idx[l], W_l, switches=a[l])||^2
                        + ridge_l ||W_l||^2

top layer first; then ``r[l-1] = render(r[l], ..., W_l)`` with the *new* W_l, and so on down
to the image. Every layer's term is its residual over its noise variance, ``RSS_l / (2
s2_l) + D_l/2 ln(2 pi s2_l)`` (the generalised least squares of the rendering), so W_l's fit
is that of its own term (the variance is a positive factor of it, which does not move the
minimiser) and ``s2_l`` is the term's residual per value, ``(RSS_l + ridge_l ||W_l||^2) /
(weight D_l)``, as in :func:`fastdrmm._em.m_step`. Each layer's step is an exact least-squares
solve, ``W_l = solve(G + ridge_l I, B)`` with ``B, G = template_stats(T[l-1], r[l], idx[l],
switches=a[l])`` and ``ridge_l = ridge * trace(G) / dim(G)``. The lower layers' residuals
also depend on W_l (through the codes it renders); like the paper's layer-wise scheme, W_l's
fit does not take that into account.

The rendered codes depend on the templates fitted above them, so every layer takes its own
pass over the training samples (the bottom-up pass repeated, the latents being a
deterministic function of the current parameters): L passes per iteration. The priors, the
class templates and the top come from the bottom-up M-step (``fitted``); the generative
biases (:func:`fastdrmm._em.generative_bias_of`) are recomputed from the new templates and
noise variances. A template whose rendered code is zero everywhere (no switched-on unit, or
only codes rendered as zero from above) has no least-squares fit: it keeps the bottom-up
M-step's template (a re-seeded patch where no unit chose it).

Measured on scikit-learn's digits (70/30 splits, seeds 0-2, 5 iterations, ``top="full"``;
issue #17), it does not beat the bottom-up targets, which stay the default: held-out
accuracy 0.983 / 0.983 / 0.983 against 0.989 / 0.987 / 0.978 with one layer (32 3x3, pool
2), 0.982 / 0.982 / 0.980 against 0.985 / 0.983 / 0.991 with two (+ 64 3x3), at 1.0x and
1.85x the time per iteration (the hidden layers' targets are refined again in the top
layer's pass).
"""

from __future__ import annotations

import numpy as np

from . import _amplitudes, _em, ops
from ._elementwise import sum_squares
from ._network import one_hot
from ._progress import batches

__all__ = ["m_step", "fit_templates", "layer_statistics", "solve_layer"]


def m_step(run, params, fitted, stats):
    """The parameters of the top-down M-step, from the run's current ``params`` (whose
    bottom-up pass chooses the latents), the bottom-up M-step's result ``fitted`` (priors,
    class templates, top) and its statistics ``stats`` (not read again: the top-down
    statistics take their own passes over the training samples)."""
    from ._training import INFERENCE_BATCH  # _training imports this module

    model = run.model
    new = fit_templates(run.net, params, fitted, run.X[run.train], run.yidx[run.train],
                        float(model.ridge), unlabeled_weight=float(model.unlabeled_weight),
                        amplitude_steps=int(model.amplitude_steps),
                        threshold=float(model.confidence_threshold),
                        batch_size=INFERENCE_BATCH)
    if model.bias == "generative":
        for l in range(run.net.n_layers):
            W = np.asarray(new[f"W{l}"], np.float64)
            new[f"b{l}"] = _em.generative_bias_of(
                W, float(new["noise_variance"][l]),
                np.asarray(fitted[f"switch_prior{l}"], np.float64)).astype(new[f"b{l}"].dtype)
    return new


def fit_templates(net, params, fitted, X, yidx, ridge, *, unlabeled_weight=1.0,
                  amplitude_steps=0, threshold=0.0, batch_size=512, variance_floor=1e-8):
    """``fitted`` (a new dict) with every layer's templates and noise variance refitted top
    down, top layer first (see the module docstring). The latents are those of the bottom-up
    pass under ``params`` on the samples ``X`` (labels ``yidx``, -1 unlabeled); the rendering
    starts from ``fitted["mu"]``; a template without a fit keeps ``fitted``'s."""
    new = dict(fitted)
    s2 = np.array(fitted["noise_variance"], np.float64)
    for l in range(net.n_layers - 1, -1, -1):
        st = layer_statistics(net, params, new, X, yidx, l, unlabeled_weight=unlabeled_weight,
                              amplitude_steps=amplitude_steps, threshold=threshold,
                              batch_size=batch_size)
        W, s2[l] = solve_layer(net, l, st, ridge, np.asarray(fitted[f"W{l}"]),
                               variance_floor)
        new[f"W{l}"] = W.astype(np.asarray(fitted[f"W{l}"]).dtype)
    new["noise_variance"] = s2
    return new


class LayerStatistics:
    """One layer's top-down least-squares sums (float64): ``B`` (K, C, kh, kw) and ``G`` of
    :func:`fastdrmm.ops.template_stats`, ``TT`` = sum_n w_n ||T[l-1]||^2, ``weight`` = sum_n
    w_n."""

    def __init__(self):
        self.B = self.G = None
        self.TT = 0.0
        self.weight = 0.0


def layer_statistics(net, params, current, X, yidx, l, *, unlabeled_weight=1.0,
                     amplitude_steps=0, threshold=0.0, batch_size=512):
    """Layer l's top-down statistics over the samples X: the latents and targets from the
    bottom-up pass under ``params``, the code r[l+1] rendered from ``current["mu"]`` through
    ``current``'s templates of the layers above l. Samples weigh as in
    :func:`fastdrmm._em.e_step` (labeled 1, unlabeled ``unlabeled_weight``, 0 below the
    confidence ``threshold``)."""
    layer = net.layers[l]
    out = LayerStatistics()
    for sl in batches(X.shape[0], batch_size):
        x, y = X[sl], yidx[sl]
        fw = net.bottom_up(params, x)
        labeled = y >= 0
        classes = np.where(labeled, y, np.asarray(fw.scores).argmax(axis=1))
        w = np.where(labeled, 1.0, float(unlabeled_weight))
        if threshold > 0 and not labeled.all():
            posterior = _em._posterior_of_best(fw.scores)
            w = np.where(labeled | (posterior >= threshold), w, 0.0)
        switches = [fw.switches(k, x.dtype) for k in range(net.n_layers)]
        # the image layer's target is the image: only a hidden layer's needs the refinement
        hs = (_amplitudes.refine_codes(net, params, fw, switches, amplitude_steps)
              if amplitude_steps and l > 0 else fw.hs)
        # a sample of weight w: ||sqrt(w) T - render(sqrt(w) r)||^2, and rendering is linear
        # in the code, so the top code carries sqrt(w) down to r[l+1]
        root = np.sqrt(w)
        top = net.top_code(current, one_hot(classes, net.n_classes) * root[:, None], x.dtype)
        code = net.render_down(current, top, fw.idxs, switches, stop=l + 1)[0]
        target = hs[l] * root.astype(x.dtype)[:, None, None, None]
        B, _, G = ops.template_stats(target, code, fw.idxs[l], layer.kernel_size,
                                     padding=layer.padding, switches=switches[l], gram=True,
                                     check_idx=False, backend=net.backend)
        B, G = np.asarray(B, np.float64), np.asarray(G, np.float64)
        out.B = B if out.B is None else out.B + B
        out.G = G if out.G is None else out.G + G
        out.TT += sum_squares(target)
        out.weight += float(w.sum())
    return out


def solve_layer(net, l, st, ridge, fallback, variance_floor=1e-8):
    """(W, s2): the ridge least-squares templates of layer l at the top-down statistics
    ``st`` and the noise variance of their residual; templates whose code is zero everywhere
    (a zero diagonal block of G) take ``fallback``'s."""
    layer = net.layers[l]
    shape = np.asarray(fallback).shape
    G = st.G
    lam = _em._ridge(G, ridge)
    W = _em._unmat(np.linalg.solve(G + lam * np.eye(G.shape[0]), _em._mat(st.B)), shape)
    kh, kw = layer.kernel_size
    energy = np.diag(G).reshape(layer.n_templates, kh * kw).sum(axis=1)
    # such a template is uncoupled from the others (its rows of G are zero): replacing it
    # leaves the others' solve exact and its rendering (zero) unchanged
    idle = energy <= 0
    if idle.any():
        W[idle] = np.asarray(fallback, np.float64)[idle]
    Wm, Bm = _em._mat(W), _em._mat(st.B)
    rss = st.TT - 2.0 * float(np.sum(Wm * Bm)) + float(np.sum(Wm * (G @ Wm)))
    D = float(np.prod(net.shapes[l].input_hw)) * net.shapes[l].channels_in
    total = st.weight
    floor = variance_floor * max(st.TT / (total * D), 1e-30)
    s2 = max((max(rss, 0.0) + lam * float(np.sum(W * W))) / (total * D), floor)
    return W, s2
