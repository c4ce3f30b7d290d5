"""Coherent amplitudes: the E-step's codes refined, given the latents chosen bottom-up, so
that each layer's code renders the layer below in the least-squares sense (non-negative).

The bottom-up pass infers every unit's amplitude on its own (a match with W[k] / ||W[k]||^2),
but up to ~K * (kernel / pool)^2 units render each value of the layer below, so rendering the
codes together overshoots by a large factor (digits, 2 layers: 80-15,000 per pixel against a
pixel variance of 0.14). With the latents fixed (argmax positions idx[l] and switches a[l] of
every layer, x = h[0] given) the rendering objective of the codes is a convex quadratic,
separate for every sample::

    J(h) = sum_l J_l,   J_l = ||h[l-1] - R_l h[l]||^2 / (2 s2_l),
    R_l h = render(h, idx[l], W[l], switches=a[l])

with h >= 0 on the switched-on units and h = 0 where the switch is off.

What is minimised (``blocks`` of :func:`refine`): by default ("greedy") layer by layer from the
bottom, h[1] minimising J_1 (it renders x), then h[2] minimising J_2 for the refined h[1], and
so on: every code renders the layer below, whatever the layer above renders. A descent on J
itself ("joint") is offered but not used: J is unbounded below in the codes (h[l] = R h[l+1]
exactly lets s2_{l+1} -> 0), and on digits (2 layers, 10 steps, 5 EM iterations) it drifts
that way: s2 = [9.2, 0.002] and a rendering error of 13-27 per pixel, against
[0.0003, 0.0002] and 0.003 for "greedy" at equal held-out accuracy.

Each step is a projected, diagonally preconditioned gradient step with an exact line search
per sample: t* = -<g, d> / <d, H d> along the direction d needs one render of d per layer
(``R_l d[l] - d[l-1]`` is the change of layer l's residual per unit step). The step is then
projected onto h >= 0; a sample keeps the projected point only where its objective is no
larger than at the longest feasible step along d (``min(t*, the step where the first unit
reaches 0)``, whose value is known in closed form and never above the current one), so no
step ever raises any sample's objective. Every quantity is per sample, so a sample's refined
codes do not depend on the batch it is in. Cost per step and layer: one adjoint and one or
two renders.

The gradient needs the adjoint of render, R_l^T: a matching read at the argmax positions
(``ops.match_at``) for a pooling layer, the dense matching (``match_switch_pool`` with
``leak=1``, zero bias, pool 1) times the switches for a layer without pooling, as in
:meth:`fastdrmm._network.Network.backprop_render`.
"""

from __future__ import annotations

import numpy as np

from . import ops

__all__ = ["refine_codes", "refine", "rendering_objective"]

#: how :func:`refine_codes` moves the codes (see :func:`refine`)
BLOCKS = "greedy"


def _per_sample_dot(a, b):
    """sum over all but the first axis of a * b, per sample, in float64."""
    n = a.shape[0]
    return np.einsum("ni,ni->n", a.reshape(n, -1), b.reshape(n, -1), dtype=np.float64)


def _render(net, p, l, code, idxs, switches):
    layer = net.layers[l]
    return ops.render(code, idxs[l], p[f"W{l}"], net.shapes[l].input_hw, padding=layer.padding,
                      switches=switches[l], check_idx=False, backend=net.backend)


def _adjoint(net, p, l, g, idxs, switches):
    """R_l^T g: the code gradient of <g, render(code)>, zero where the switch is off."""
    layer = net.layers[l]
    W = p[f"W{l}"]
    if layer.pool is None:
        # every plane position is a unit: the dense matching is cheaper than a gather
        zeros = np.zeros(layer.n_templates, g.dtype)
        out, _ = ops.match_switch_pool(g, W, zeros, padding=layer.padding, pool=1, leak=1.0,
                                       backend=net.backend)
        return out * switches[l]
    return ops.match_at(g, W, idxs[l], padding=layer.padding, switches=switches[l],
                        check_idx=False, backend=net.backend)


def _weights(p, n_layers):
    """1 / s2_l per layer (float64), s2 floored so that a zero variance cannot divide."""
    s2 = np.asarray(p["noise_variance"], np.float64).reshape(-1)[:n_layers]
    return 1.0 / np.maximum(s2, 1e-30)


def _residuals(net, p, hs, idxs, switches):
    """e[l] = h[l-1] - R_l h[l] for l = 1..L (listed from index 0)."""
    return [hs[l] - _render(net, p, l, hs[l + 1], idxs, switches)
            for l in range(net.n_layers)]


def _objective(es, w):
    """J per sample (float64) from the residuals (a term of weight 0 is not computed)."""
    return sum(w[l] * 0.5 * _per_sample_dot(e, e) for l, e in enumerate(es) if w[l])


def rendering_objective(net, p, hs, idxs, switches):
    """J(h) = sum_l J_l per sample (float64, (N,)) of the codes hs = [x, h[1], ..., h[L]]
    at the given latents and the noise variances ``p["noise_variance"]``."""
    return _objective(_residuals(net, p, hs, idxs, switches), _weights(p, net.n_layers))


def _preconditioner(net, p, w, dtype):
    """A diagonal approximation of J's Hessian per code value, as (1, K, 1, 1) arrays:
    ||W_l[k]||^2 / s2_l (the unit's own rendering; edge cropping ignored) + 1 / s2_{l+1}
    (the unit as a target of the layer above). Only the direction depends on it."""
    out = []
    L = net.n_layers
    for l in range(L):
        W = np.asarray(p[f"W{l}"], np.float64)
        diag = w[l] * np.einsum("kcij,kcij->k", W, W)
        if l + 1 < L:
            diag = diag + w[l + 1]
        diag = np.where(diag > 0, diag, 1.0)
        out.append((1.0 / diag).astype(dtype)[None, :, None, None])
    return out


def refine(net, p, x, idxs, switches, codes, steps, *, blocks="greedy", history=False):
    """Monotone projected-gradient steps from ``codes`` ([h[1], ..., h[L]]; switched-off
    units are set to 0), the latents ``idxs``/``switches`` fixed.

    ``blocks``:

    * "greedy" (bottom-up, layer by layer): ``steps`` steps on h[1] alone minimising layer
      1's term ||x - R_1 h[1]||^2, then ``steps`` on h[2] rendering the refined h[1], and so
      on (each layer's code renders the layer below, whatever the layer above renders);
    * "joint": ``steps`` steps on J itself, every layer's code moving in each;
    * "layerwise": ``steps`` steps on J, step s moving only layer s mod L's code.

    Whatever ``blocks``, no sample's J ends above its start: where "greedy" would raise it
    (the layers above losing more than the layers below gain), the sample keeps its starting
    codes. Returns the refined codes [h[1], ..., h[L]] in the codes' dtype and, with ``history``,
    a float64 array (n_steps, 2, N): every step's objective (J, or the one layer's term for
    "greedy") per sample before and after it."""
    L = net.n_layers
    dtype = np.asarray(codes[0]).dtype
    hs = [x] + [np.array(np.maximum(h, 0) * switches[l], dtype=dtype)
                for l, h in enumerate(codes)]
    w = _weights(p, L)
    es = _residuals(net, p, hs, idxs, switches)
    if blocks == "greedy":
        plan = [((l,), np.where(np.arange(L) == l, w, 0.0)) for l in range(L)
                for _ in range(int(steps))]
    elif blocks == "joint":
        plan = [(tuple(range(L)), w)] * int(steps)
    elif blocks == "layerwise":
        plan = [((s % L,), w) for s in range(int(steps))]
    else:
        raise ValueError(f"blocks must be 'greedy', 'joint' or 'layerwise', got {blocks!r}")
    record = []
    pres = {}
    if blocks == "greedy" and L > 1:
        # each phase lowers one layer's term, not J: kept to compare at the end
        start, J_start = list(hs), _objective(es, w)
    for active, weights in plan:
        key = active + (weights.tobytes(),)
        if key not in pres:
            pres[key] = _preconditioner(net, p, weights, dtype)
        J0, J1 = _step(net, p, x, idxs, switches, hs, es, active, weights, pres[key])
        if history:
            record.append((J0, J1))
    if blocks == "greedy" and L > 1:
        # a sample whose J the greedy phases raised (the layers above fit worse than they
        # gained below) keeps its starting codes: J never rises for any sample
        worse = (_objective(es, w) > J_start)[:, None, None, None]
        if worse.any():
            hs = [x] + [np.where(worse, h0, h) for h0, h in zip(start[1:], hs[1:])]
    out = [np.ascontiguousarray(h, dtype=dtype) for h in hs[1:]]
    if history:
        return out, np.array(record).reshape(len(record), 2, x.shape[0])
    return out


def _step(net, p, x, idxs, switches, hs, es, active, w, pre):
    """One step on the codes of the layers ``active`` for the objective with layer weights
    ``w`` (1 / s2, or 0 for a term left out); updates ``hs`` and the residuals ``es`` in
    place and returns that objective per sample before and after."""
    L = net.n_layers
    n = x.shape[0]
    dtype = hs[1].dtype
    J = _objective(es, w)
    # the negative gradient -dJ/dh[l] = w_l R_l^T e_l - w_{l+1} e_{l+1}, preconditioned
    ds = [None] * L
    for l in active:
        d = _adjoint(net, p, l, es[l], idxs, switches) * dtype.type(w[l])
        if l + 1 < L and w[l + 1]:
            d -= es[l + 1] * dtype.type(w[l + 1])
        d *= pre[l]
        d *= switches[l]
        # units held at 0 whose gradient pushes them below: the bound is active
        np.copyto(d, 0, where=(hs[l + 1] <= 0) & (d < 0))
        ds[l] = d
    # e_l(t) = e_l - t q_l with q_l = R_l d[l] - d[l-1]
    qs = []
    for l in range(L):
        q = None
        if ds[l] is not None:
            q = _render(net, p, l, ds[l], idxs, switches)
        if l >= 1 and ds[l - 1] is not None:
            q = -ds[l - 1] if q is None else q - ds[l - 1]
        qs.append(q)
    slope = np.zeros(n)  # -dJ/dt at t = 0
    curvature = np.zeros(n)
    for l, q in enumerate(qs):
        if q is not None and w[l]:
            slope += w[l] * _per_sample_dot(es[l], q)
            curvature += w[l] * _per_sample_dot(q, q)
    moving = (curvature > 0) & (slope > 0)
    if not moving.any():
        return J, J
    t_star = np.where(moving, slope / np.where(moving, curvature, 1.0), 0.0)
    # the longest step along d that keeps every unit >= 0
    t_bound = np.full(n, np.inf)
    for l in active:
        d, h = ds[l], hs[l + 1]
        neg = d < 0
        if neg.any():
            ratio = np.full(h.shape, np.inf, h.dtype)
            np.divide(h, -d, out=ratio, where=neg)
            t_bound = np.minimum(t_bound, ratio.reshape(n, -1).min(axis=1))
    t_clip = np.minimum(t_star, t_bound)
    J_clip = J - t_clip * slope + 0.5 * t_clip ** 2 * curvature
    blocked = moving & (t_bound < t_star)
    take = np.zeros(n, bool)
    if blocked.any():
        # the projected full step (its residuals need a render per layer)
        proj = [hs[l + 1] if ds[l] is None else
                np.maximum(hs[l + 1] + _col(t_star, dtype) * ds[l], 0) for l in range(L)]
        # only the residuals of the moved codes' own layers and of the layers they are
        # targets of change (a render each; the others are kept)
        full = [x] + proj
        es_proj = list(es)
        for k in sorted({k for l in active for k in (l, l + 1) if k < L}):
            es_proj[k] = full[k] - _render(net, p, k, full[k + 1], idxs, switches)
        # a sample keeps the projected point where it is no worse than the clipped one
        # (whose residual is e - t q exactly and whose J is never above the current one)
        take = (_objective(es_proj, w) <= J_clip) & blocked
    any_take = take.any()
    keep = take[:, None, None, None]
    tc = _col(np.where(moving, t_clip, 0.0), dtype)
    for l in range(L):
        if ds[l] is not None:
            # a unit the clipped step brings to 0 may land a rounding error below it
            h = np.maximum(hs[l + 1] + tc * ds[l], 0)
            hs[l + 1] = np.where(keep, proj[l], h) if any_take else h
        if qs[l] is not None:
            e = es[l] - tc * qs[l]
            es[l] = np.where(keep, es_proj[l], e) if any_take else e
    # J from the residuals (not the closed form), so that rounding in the running
    # residuals cannot hide an increase
    return J, _objective(es, w)


def _col(v, dtype):
    return np.asarray(v, dtype)[:, None, None, None]


def refine_codes(net, p, fw, switches, steps):
    """The codes [x, h[1], ..., h[L]] refined by ``steps`` projected-gradient steps per layer
    (:func:`refine`, ``blocks=BLOCKS``) with the latents (argmax positions ``fw.idxs``,
    ``switches``) fixed, in the codes' dtype; ``steps=0`` returns ``fw.hs`` itself."""
    if not steps:
        return fw.hs
    x = fw.hs[0]
    return [x] + refine(net, p, x, fw.idxs, switches, fw.hs[1:], steps, blocks=BLOCKS)
