"""The DRMM's passes over one batch, composed from :mod:`fastdrmm.ops` only.

* bottom-up (max-sum inference): ``h[l], idx[l] = match_switch_pool(h[l-1], W[l], b[l])``,
  ``f = mean over the plane of h[L]``, class scores ``s = scale * f @ mu.T + beta``;
* top-down (rendering): ``r[L] = mu[c]`` on every position of the top plane, then
  ``r[l-1] = render(r[l], idx[l], W[l], switches=a[l])`` with ``a[l] = 1[h[l] > 0]`` (the
  switches chosen bottom-up) and the argmax positions ``idx[l]``;
* the gradients of the EG objective: backpropagation through the bottom-up pass is a
  top-down render (input gradient) and ``template_stats`` (template gradient); through the
  top-down pass it is ``template_stats`` (template gradient) and a matching with the identity
  switch gathered at ``idx`` (code gradient);
* the hard-EM sufficient statistics: ``template_stats`` with the Gram matrix.

Parameters are a dict of arrays: ``W0..W{L-1}``, ``b0..``, ``mu`` (n_classes, K_L), ``beta``
(n_classes,), plus the generative ones that no gradient touches: ``noise_variance``
(L,), ``switch_prior{l}`` (K_l,), ``translation_prior{l}`` (ph*pw,), ``class_prior``
(n_classes,), ``top_noise_variance`` (0-d) and ``class_scale`` (0-d, the factor of the class
scores). See :mod:`fastdrmm.drmm` for the model and the objectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _elementwise as elementwise
from . import ops
from .layers import layer_shapes

#: names of the parameters the EG gradient covers, per layer and for the top
LAYER_PARAMS = ("W", "b")
TOP_PARAMS = ("mu", "beta")


def trainable_names(n_layers):
    return [f"{p}{l}" for l in range(n_layers) for p in LAYER_PARAMS] + list(TOP_PARAMS)


@dataclass
class Forward:
    """What the bottom-up pass chose: the codes h[0] = x .. h[L], argmax positions, top
    feature f (N, K_L) and class scores."""

    hs: list
    idxs: list
    f: np.ndarray
    scores: np.ndarray
    _switch_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def switches(self, l, dtype):
        """a[l]: 1 where layer l's pooled unit is on (h > 0), else 0.

        Made once per layer and dtype and shared by every caller (the top-down pass and the
        ReLU slopes of the backward pass), so it must not be modified."""
        key = (l, np.dtype(dtype))
        if key not in self._switch_cache:
            self._switch_cache[key] = elementwise.step_mask(self.hs[l + 1], 0, dtype)
        return self._switch_cache[key]


class Network:
    """A list of layers bound to an input shape (C, H, W), a class count and a backend."""

    def __init__(self, layers, input_shape, n_classes, backend="auto", matching="tied",
                 top="average"):
        if matching not in ("tied", "normalized"):
            raise ValueError(f"matching must be 'tied' or 'normalized', got {matching!r}")
        if top not in ("average", "full"):
            raise ValueError(f"top must be 'average' or 'full', got {top!r}")
        self.matching = matching
        self.top = top
        self.layers = tuple(layers)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.n_classes = int(n_classes)
        self.backend = backend
        self.shapes = layer_shapes(self.layers, self.input_shape)
        top = self.shapes[-1]
        self.top_plane = top.pooled
        k_top, plane = self.layers[-1].n_templates, top.pooled[0] * top.pooled[1]
        # "average": a class template of K_L numbers on each of the P top positions (read by
        # the global average); "full": one template of the whole top code (P = 1)
        self.top_positions = plane if self.top == "average" else 1
        self.feature_size = k_top if self.top == "average" else k_top * plane

    @property
    def n_layers(self):
        return len(self.layers)

    def code_shape(self, l):
        """(K, Hp, Wp) of layer l's pooled code."""
        return (self.layers[l].n_templates, *self.shapes[l].pooled)

    def parameter_shapes(self):
        """name -> shape of every parameter this network's model holds."""
        shapes = {}
        for l, layer in enumerate(self.layers):
            k, c = layer.n_templates, self.shapes[l].channels_in
            shapes[f"W{l}"] = (k, c, *layer.kernel_size)
            shapes[f"b{l}"] = (k,)
            shapes[f"switch_prior{l}"] = (k,)
            shapes[f"translation_prior{l}"] = (layer.window[0] * layer.window[1],)
        k_top = self.feature_size
        shapes.update({"noise_variance": (self.n_layers,), "mu": (self.n_classes, k_top),
                       "beta": (self.n_classes,), "class_prior": (self.n_classes,),
                       "top_noise_variance": (), "class_scale": ()})
        return shapes

    def optional_parameter_shapes(self):
        """name -> shape of the parameters a model of this network may hold: an EM model's
        shared-covariance top (absent from models saved before it existed, which score
        with the isotropic top)."""
        if self.matching != "normalized":
            return {}
        F = self.feature_size
        return {"class_weights": (self.n_classes, F), "top_covariance": (F, F)}

    def draw_latents(self, p, n, rng, dtype):
        """The latents of ``n`` samples drawn from the generative priors: per layer, the
        argmax positions (each unit's position in its pooling window from the translation
        prior) and the switches (from the switch prior)."""
        idxs, switches = [], []
        for l, layer in enumerate(self.layers):
            k, (hp, wp), wo = layer.n_templates, self.shapes[l].pooled, self.shapes[l].plane[1]
            ph, pw = layer.window
            prior = np.asarray(p[f"translation_prior{l}"], np.float64)
            offset = rng.choice(ph * pw, size=(n, k, hp, wp), p=prior / prior.sum())
            di, dj = np.divmod(offset, pw)
            rows = np.arange(hp)[:, None] * ph + di
            cols = np.arange(wp)[None, :] * pw + dj
            idxs.append((rows * wo + cols).astype(np.int32))
            pa = np.asarray(p[f"switch_prior{l}"], np.float64)[None, :, None, None]
            switches.append((rng.random((n, k, hp, wp)) < pa).astype(dtype))
        return idxs, switches

    # ---------------------------------------------------------------------------------------
    # bottom-up

    def matching_templates(self, p, l):
        """The templates layer l matches with: W itself ("tied", the network's weights), or
        W[k] / ||W[k]||^2 ("normalized": the match of a patch equal to ``a * W[k]`` is the
        amplitude ``a``, so every code keeps the units of the code it renders)."""
        W = p[f"W{l}"]
        if self.matching == "tied":
            return W
        norms = np.einsum("kcij,kcij->k", W, W, dtype=np.float64)
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return (W * inv[:, None, None, None]).astype(W.dtype)

    def bottom_up(self, p, x):
        hs, idxs = [x], []
        for l, layer in enumerate(self.layers):
            h, idx = ops.match_switch_pool(hs[-1], self.matching_templates(p, l), p[f"b{l}"],
                                           padding=layer.padding,
                                           pool=layer.window, leak=layer.leak,
                                           backend=self.backend)
            hs.append(h)
            idxs.append(idx)
        f = self.top_feature(hs[-1])
        scores = self.class_scores(p, f)
        return Forward(hs, idxs, f, scores)

    def top_feature(self, h):
        """f: the top code averaged over its plane ("average") or flattened ("full")."""
        if self.top == "average":
            return h.mean(axis=(2, 3))
        return h.reshape(h.shape[0], -1)

    def top_plane_of(self, f, dtype):
        """The top code whose feature is f (N, F): f on every top position ("average"),
        or f reshaped to the top code ("full")."""
        return self._to_top_plane(np.asarray(f), dtype)

    def _to_top_plane(self, v, dtype):
        """The adjoint of top_feature (up to the 1/P of the average): (N, F) -> top code."""
        n = v.shape[0]
        k = self.layers[-1].n_templates
        v = v.astype(dtype, copy=False)
        if self.top == "average":
            return np.ascontiguousarray(
                np.broadcast_to(v[:, :, None, None], (n, k, *self.top_plane)))
        return np.ascontiguousarray(v.reshape(n, k, *self.top_plane))

    @staticmethod
    def class_scores(p, f):
        """``<w_c, f> + beta_c`` with the shared-covariance top's ``class_weights`` (EM),
        else ``class_scale * <mu_c, f> + beta_c``."""
        if "class_weights" in p:
            return f @ p["class_weights"].T + p["beta"]
        return (f @ p["mu"].T) * p["class_scale"] + p["beta"]

    # ---------------------------------------------------------------------------------------
    # top-down

    def top_code(self, p, q, dtype):
        """r[L]: the class templates mixed by q (N, n_classes), on every top position."""
        # in the code's dtype: a float64 product of the whole top code then cast back cost
        # ~1.5 ms of a 120 ms conv-small step, for a sum of n_classes terms
        mu = p["mu"]
        if np.dtype(mu.dtype).itemsize < np.dtype(dtype).itemsize:
            mu = mu.astype(dtype)
        return self._to_top_plane(q.astype(mu.dtype, copy=False) @ mu, dtype)

    def render_down(self, p, top, idxs, switches, stop=0):
        """[r[stop], ..., r[L]] rendered from r[L] = top with the given latents (positions
        from this network's bottom-up pass or drawn on its planes: not checked again)."""
        rs = [top]
        for l in range(self.n_layers - 1, stop - 1, -1):
            layer = self.layers[l]
            rs.append(ops.render(rs[-1], idxs[l], p[f"W{l}"], self.shapes[l].input_hw,
                                 padding=layer.padding, switches=switches[l],
                                 check_idx=False, backend=self.backend))
        return rs[::-1]

    def top_down(self, p, fw, q):
        dtype = fw.hs[0].dtype
        switches = [fw.switches(l, dtype) for l in range(self.n_layers)]
        rs = self.render_down(p, self.top_code(p, q, dtype), fw.idxs, switches)
        return rs, switches

    # ---------------------------------------------------------------------------------------
    # gradients

    def backprop_scores(self, p, fw, g_scores, grads):
        """Add d(loss)/d(params) for d(loss)/d(scores) = g_scores through the bottom-up pass."""
        if self.matching != "tied":
            raise ValueError("gradients need tied matching templates")
        scale = float(p["class_scale"])
        grads["mu"] += scale * (g_scores.T @ fw.f)
        grads["beta"] += g_scores.sum(axis=0)
        # the scalars on the (N, n_classes) side: on the (N, F) product they were two more
        # passes over a top code (~1 ms of a conv-small step with top="full")
        g_f = (g_scores * (scale / self.top_positions)) @ p["mu"]
        g_h = self._to_top_plane(g_f, fw.hs[0].dtype)
        for l in range(self.n_layers - 1, -1, -1):
            layer = self.layers[l]
            # the switch's slope: 1 where the unit is on, else the leak (0: the ReLU's switch)
            dtype = fw.hs[l + 1].dtype
            slope = (fw.switches(l, dtype) if layer.leak == 0 else
                     elementwise.step_mask(fw.hs[l + 1], layer.leak, dtype))
            B, s, _ = ops.template_stats(fw.hs[l], g_h, fw.idxs[l], layer.kernel_size,
                                         padding=layer.padding, switches=slope, gram=False,
                                         check_idx=False, backend=self.backend)
            grads[f"W{l}"] += B
            grads[f"b{l}"] += s
            if l:
                g_h = ops.render(g_h, fw.idxs[l], p[f"W{l}"], self.shapes[l].input_hw,
                                 padding=layer.padding, switches=slope, check_idx=False,
                                 backend=self.backend)

    def backprop_render(self, p, fw, rs, switches, q, g_image, nonneg_weights, grads):
        """Add d(loss)/d(params) through the top-down pass, for d(loss)/d(r[0]) = g_image plus
        the penalty sum_l nonneg_weights[l-1] * ||min(r[l], 0)||^2 on r[1..L]. Returns
        [||min(r[l], 0)||^2 for l = 1..L] (float64 sums, as ``negative_sum_squares``)."""
        g = g_image
        code_sums = []
        for l in range(self.n_layers):
            layer = self.layers[l]
            code = rs[l + 1]
            B, _, _ = ops.template_stats(g, code, fw.idxs[l], layer.kernel_size,
                                         padding=layer.padding, switches=switches[l],
                                         gram=False, check_idx=False, backend=self.backend)
            grads[f"W{l}"] += B
            # the adjoint of render with respect to the code: correlate with the templates,
            # read at the argmax positions, times the switch. A pooling layer matches at
            # those positions only (1 / pool^2 of the plane, none where the switch is off);
            # without pooling every position is read, and the dense matching is cheaper.
            if layer.pool is None:
                zeros = np.zeros(layer.n_templates, g.dtype)
                g, _ = ops.match_switch_pool(g, p[f"W{l}"], zeros, padding=layer.padding,
                                             pool=1, leak=1.0, backend=self.backend)
                mask = switches[l]
            else:
                g = ops.match_at(g, p[f"W{l}"], fw.idxs[l], padding=layer.padding,
                                 switches=switches[l], check_idx=False, backend=self.backend)
                mask = None
            # the switch of a dense layer, the non-negativity penalty's gradient and its
            # value (sum(min(r, 0)^2), for the loss), in one pass
            g, total = elementwise.mask_add_negative(g, mask, code, 2.0 * nonneg_weights[l],
                                                     code_sum=True)
            code_sums.append(total)
        g_top = (g.sum(axis=(2, 3), dtype=np.float64) if self.top == "average"
                 else g.reshape(g.shape[0], -1))
        # q is one-hot: in g_top's dtype it is exact, and the product stays in BLAS (a float64
        # q made NumPy cast the whole (N, F) g_top first: ~1.4 ms with top="full")
        grads["mu"] += q.T.astype(g_top.dtype, copy=False) @ g_top
        return code_sums

    def zero_grads(self, p):
        return {name: np.zeros_like(p[name]) for name in trainable_names(self.n_layers)}


def network_for(layers, input_shape, n_classes, backend, algorithm, top):
    """The network of a DRMM trained by ``algorithm``: EM matches with normalised templates
    (codes are amplitudes), EG with the templates themselves (a network's weights)."""
    matching = "normalized" if algorithm == "em" else "tied"
    return Network(layers, input_shape, n_classes, backend, matching, top)


def one_hot(classes, n_classes, dtype=np.float64):
    q = np.zeros((classes.shape[0], n_classes), dtype)
    q[np.arange(classes.shape[0]), classes] = 1
    return q


def softmax(scores):
    t = scores - scores.max(axis=1, keepdims=True)
    np.exp(t, out=t)
    t /= t.sum(axis=1, keepdims=True)
    return t


def log_softmax(scores):
    t = scores - scores.max(axis=1, keepdims=True)
    return t - np.log(np.exp(t).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class LossWeights:
    """The weights of the six EG terms (cross-entropy, reconstruction, entropy,
    nonnegativity, class-balance KL, translation consistency; see :mod:`fastdrmm.drmm`)."""

    xent: float = 1.0
    reconstruction: float = 0.1
    entropy: float = 0.1
    nonnegativity: float = 0.01
    kl: float = 0.0
    consistency: float = 0.0


def eg_loss_and_grads(net, p, x, yidx, weights, need_grads=True, targets=None, buffers=None):
    """The EG objective on one batch, its terms, and (need_grads) its gradients.

    ``yidx`` (N,) holds class indices, -1 for unlabeled samples. ``targets`` (N_U,
    n_classes), for the consistency term, are class posteriors of the unlabeled samples seen
    under another nuisance (held fixed); a row of zeros leaves its sample out of the term.
    Returns (loss, terms, grads, forward) with ``terms`` a dict of the unweighted terms.

    ``buffers`` (a :class:`fastdrmm.kernels.buffers.StepBuffers`): the step's intermediates
    reuse the previous step's memory; ``forward`` is then valid until the next step with the
    same buffers (``grads`` are always fresh arrays)."""
    if buffers is None:
        return _eg_loss_and_grads(net, p, x, yidx, weights, need_grads, targets)
    with buffers.step():
        return _eg_loss_and_grads(net, p, x, yidx, weights, need_grads, targets)


def _eg_loss_and_grads(net, p, x, yidx, weights, need_grads, targets):
    n = x.shape[0]
    fw = net.bottom_up(p, x)
    scores = fw.scores.astype(np.float64)
    logp = log_softmax(scores)
    prob = np.exp(logp)
    labeled = yidx >= 0
    n_lab, n_unl = int(labeled.sum()), int(n - labeled.sum())
    xent = -logp[labeled, yidx[labeled]].sum() / max(n_lab, 1)
    entropy = -(prob[~labeled] * logp[~labeled]).sum() / max(n_unl, 1)
    # KL(mean unlabeled prediction || uniform class prior): keeps the entropy term from
    # collapsing the unlabeled samples onto a few classes
    log_prior = -np.log(net.n_classes)
    p_bar = prob[~labeled].mean(axis=0) if n_unl else np.full(net.n_classes, np.exp(log_prior))
    log_ratio = np.log(np.maximum(p_bar, 1e-300)) - log_prior
    kl = float((p_bar * log_ratio).sum())
    # KL(targets || p): the class must not depend on the nuisance the targets were seen under
    use_targets = targets is not None and n_unl and weights.consistency
    if use_targets:
        targets = np.asarray(targets, np.float64)
        if targets.shape != (n_unl, net.n_classes):
            raise ValueError(f"targets must have shape {(n_unl, net.n_classes)}, "
                             f"got {targets.shape}")
        t_log_t = np.where(targets > 0, targets * np.log(np.maximum(targets, 1e-300)), 0.0)
        consistency = float((t_log_t - targets * logp[~labeled]).sum() / n_unl)
    else:
        consistency = 0.0
    classes = np.where(labeled, yidx, scores.argmax(axis=1))
    q = one_hot(classes, net.n_classes)

    want_render = weights.reconstruction or weights.nonnegativity
    if want_render:
        rs, switches = net.top_down(p, fw, q)
    else:
        rs, switches = [np.zeros_like(x)] + [None] * net.n_layers, None
    image_size = x[0].size
    residual = rs[0] - x
    reconstruction = elementwise.sum_squares(residual) / (
        n * image_size)
    code_sizes = [float(np.prod(net.code_shape(l))) for l in range(net.n_layers)]
    nonneg_weights = [weights.nonnegativity / (n * size) for size in code_sizes]

    def terms_and_loss(code_sums):
        """The terms and the loss, with code_sums[l] = sum(min(r[l + 1], 0)^2)."""
        nonneg = 0.0
        for total, size in zip(code_sums, code_sizes):
            nonneg += total / (n * size)
        terms = {"xent": float(xent), "entropy": float(entropy),
                 "reconstruction": reconstruction, "nonnegativity": nonneg, "kl": kl,
                 "consistency": consistency}
        loss = (weights.xent * terms["xent"] + weights.entropy * terms["entropy"]
                + weights.reconstruction * reconstruction + weights.nonnegativity * nonneg
                + weights.kl * kl + weights.consistency * consistency)
        return loss, terms

    if not need_grads:
        code_sums = ([elementwise.negative_sum_squares(r) for r in rs[1:]] if want_render
                     else [])
        return (*terms_and_loss(code_sums), None, fw)

    grads = net.zero_grads(p)
    g_scores = np.zeros_like(scores)
    if n_lab and weights.xent:
        g = prob[labeled].copy()
        g[np.arange(n_lab), yidx[labeled]] -= 1
        g_scores[labeled] += (weights.xent / n_lab) * g
    if n_unl and weights.entropy:
        pu, lu = prob[~labeled], logp[~labeled]
        h = -(pu * lu).sum(axis=1, keepdims=True)
        g_scores[~labeled] += (weights.entropy / n_unl) * (-pu * (lu + h))
    if n_unl and weights.kl:
        # d KL / d s_nj = (1/N_U) p_nj (v_j - sum_c p_nc v_c), v = ln(p_bar / prior)
        pu = prob[~labeled]
        g_scores[~labeled] += (weights.kl / n_unl) * pu * (
            log_ratio - (pu * log_ratio).sum(axis=1, keepdims=True))
    if use_targets:
        # d KL(t || p) / d s = (sum_c t_c) p - t: p - t for a posterior, 0 for a zero row
        mass = targets.sum(axis=1, keepdims=True)
        g_scores[~labeled] += (weights.consistency / n_unl) * (mass * prob[~labeled] - targets)
    if g_scores.any():
        net.backprop_scores(p, fw, g_scores.astype(x.dtype), grads)
    code_sums = []
    if want_render:
        g_image = ((2.0 * weights.reconstruction / (n * image_size)) * residual).astype(x.dtype)
        # the penalty's sums come from the gradient's own pass over every r[l]
        code_sums = net.backprop_render(p, fw, rs, switches, q, g_image, nonneg_weights, grads)
    loss, terms = terms_and_loss(code_sums)
    return loss, terms, grads, fw


def translate(x, shifts):
    """Every image of x (N, C, H, W) moved by its (dy, dx) in ``shifts`` (N, 2) pixels, the
    uncovered border filled with zeros: a draw of the translation nuisance."""
    n, c, h, w = x.shape
    t = int(np.abs(shifts).max()) if shifts.size else 0
    if t == 0:
        return x.copy()
    padded = np.zeros((n, c, h + 2 * t, w + 2 * t), x.dtype)
    padded[:, :, t:t + h, t:t + w] = x
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))
    # moving the image by +dy reads the padded image from row t - dy
    return np.ascontiguousarray(windows[np.arange(n), :, t - shifts[:, 0], t - shifts[:, 1]])
