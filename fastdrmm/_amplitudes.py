"""Coherent amplitudes: the E-step's codes refined, given the latents chosen bottom-up, so
that each layer's code renders the layer below in the least-squares sense (non-negative).

The bottom-up pass infers every unit's amplitude on its own (a match with W[k] / ||W[k]||^2),
but up to ~K * (kernel / pool)^2 units render each value of the layer below, so rendering the
codes together overshoots by a large factor. With the latents fixed (argmax positions idx[l]
and switches a[l] of every layer, x = h[0] given) the rendering objective of the codes is a
convex quadratic, separate for every sample::

    J(h) = sum_l ||h[l-1] - R_l h[l]||^2 / (2 s2_l),   R_l h = render(h, idx[l], W[l], a[l])

to be minimised over h[1..L] with h >= 0 on the switched-on units and h = 0 where the switch
is off. :func:`refine` runs projected (diagonally preconditioned) gradient steps on all layers
at once with an exact line search per sample: the step t* = -<g, d> / <d, H d> along the
direction d needs one render of d per layer (``R_l d[l] - d[l-1]`` is the change of layer l's
residual per unit step). The step is then projected onto h >= 0; a sample keeps the
projected point only where its J is no larger than at the longest feasible step along d
(``min(t*, the step where the first unit reaches 0)``, whose J is known in closed form and is
never above the current one), so no step ever increases any sample's J. Every quantity is
per sample, so a sample's refined codes do not depend on the batch it is in.

The gradient needs the adjoint of render, R_l^T: a matching read at the argmax positions
(``ops.match_at``) for a pooling layer, the dense matching (``match_switch_pool`` with
``leak=1``, zero bias, pool 1) times the switches for a layer without pooling, as in
:meth:`fastdrmm._network.Network.backprop_render`.
"""

from __future__ import annotations

import numpy as np

from . import ops

__all__ = ["refine_codes", "refine", "rendering_objective"]


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
    """J per sample (float64) from the residuals."""
    return sum(w[l] * 0.5 * _per_sample_dot(e, e) for l, e in enumerate(es))


def rendering_objective(net, p, hs, idxs, switches):
    """J(h) per sample (float64, (N,)) of the codes hs = [x, h[1], ..., h[L]] at the given
    latents and the noise variances ``p["noise_variance"]``."""
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


def refine(net, p, x, idxs, switches, codes, steps, *, blocks="joint", history=False):
    """``steps`` monotone projected-gradient steps on J (module docstring) from ``codes``
    ([h[1], ..., h[L]], switched off units zero), latents ``idxs``/``switches`` fixed.

    ``blocks``: "joint" (every layer's code moves in each step) or "layerwise" (step s moves
    only layer s mod L's code, bottom first: block coordinate descent). Returns the refined
    codes [h[1], ..., h[L]] in the codes' dtype and, with ``history``, the (steps + 1, N)
    array of every sample's J before the first and after every step (float64)."""
    L = net.n_layers
    dtype = np.asarray(codes[0]).dtype
    hs = [x] + [np.array(np.maximum(h, 0) * switches[l], dtype=dtype)
                for l, h in enumerate(codes)]
    w = _weights(p, L)
    wt = [dtype.type(v) for v in w]
    pre = _preconditioner(net, p, w, dtype)
    es = _residuals(net, p, hs, idxs, switches)
    J = _objective(es, w)
    record = [J.copy()] if history else None
    n = x.shape[0]
    for step in range(int(steps)):
        active = range(L) if blocks == "joint" else (step % L,)
        # the negative gradient -dJ/dh[l] = w_l R_l^T e_l - w_{l+1} e_{l+1}, preconditioned
        ds = [None] * L
        for l in active:
            neg = _adjoint(net, p, l, es[l], idxs, switches) * wt[l]
            if l + 1 < L:
                neg -= es[l + 1] * wt[l + 1]
            d = neg * pre[l] * switches[l]
            # units held at 0 whose gradient pushes them below: the bound is active
            d[(hs[l + 1] <= 0) & (d < 0)] = 0
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
        slope = np.zeros(n)  # -dJ/dt at t = 0, >= 0
        curvature = np.zeros(n)
        for l, q in enumerate(qs):
            if q is not None:
                slope += w[l] * _per_sample_dot(es[l], q)
                curvature += w[l] * _per_sample_dot(q, q)
        moving = (curvature > 0) & (slope > 0)
        if not moving.any():
            if history:
                record.append(J.copy())
            continue
        t_star = np.where(moving, slope / np.where(moving, curvature, 1.0), 0.0)
        # the longest step along d that keeps every unit >= 0
        t_bound = np.full(n, np.inf)
        for l in active:
            d, h = ds[l], hs[l + 1]
            neg = d < 0
            if neg.any():
                ratio = np.where(neg, h / np.where(neg, -d, 1), np.inf)
                t_bound = np.minimum(t_bound, ratio.reshape(n, -1).min(axis=1))
        t_clip = np.minimum(t_star, t_bound)
        J_clip = J - t_clip * slope + 0.5 * t_clip ** 2 * curvature
        blocked = moving & (t_bound < t_star)
        if blocked.any():
            # the projected full step (its residuals need a render per layer)
            proj = [hs[l + 1] if ds[l] is None else
                    np.maximum(hs[l + 1] + _col(t_star, dtype) * ds[l], 0) for l in range(L)]
            es_proj = _residuals(net, p, [x] + proj, idxs, switches)
            J_proj = _objective(es_proj, w)
            # a sample keeps the projected point where it is no worse than the clipped one;
            # the clipped one's residual is e - t q exactly
            take = (J_proj <= J_clip) & blocked
        else:  # no unit reaches 0: the full step is feasible and e - t* q is its residual
            take = np.zeros(n, bool)
        tc = _col(np.where(moving, t_clip, 0.0), dtype)
        keep = take[:, None, None, None]
        any_take = take.any()
        for l in range(L):
            if ds[l] is not None:
                # a unit the clipped step brings to 0 may land a rounding error below it
                h = np.maximum(hs[l + 1] + tc * ds[l], 0)
                hs[l + 1] = np.where(keep, proj[l], h) if any_take else h
            if qs[l] is not None:
                e = es[l] - tc * qs[l]
                es[l] = np.where(keep, es_proj[l], e) if any_take else e
        # J recomputed from the residuals (not the closed form) so that rounding in the
        # running residuals cannot hide an increase
        J = _objective(es, w)
        if history:
            record.append(J.copy())
    out = [np.ascontiguousarray(h, dtype=dtype) for h in hs[1:]]
    return (out, np.array(record)) if history else out


def _col(v, dtype):
    return np.asarray(v, dtype)[:, None, None, None]


def refine_codes(net, p, fw, switches, steps):
    """The codes [x, h[1], ..., h[L]] refined by ``steps`` projected-gradient steps on the
    rendering objective with the latents (argmax positions ``fw.idxs``, ``switches``) fixed;
    ``steps=0`` returns ``fw.hs`` itself."""
    if not steps:
        return fw.hs
    x = fw.hs[0]
    return [x] + refine(net, p, x, fw.idxs, switches, fw.hs[1:], steps)
