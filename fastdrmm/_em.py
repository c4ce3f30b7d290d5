"""Hard EM for the DRMM: the E-step's sufficient statistics, the closed-form M-step, and the
hard-EM objective evaluated from the statistics for any parameters.

Latents (chosen by the E-step, fixed in the M-step) of sample n: its class c (the label, or
the best-scoring class when unlabeled) and, at every layer, the argmax positions idx[l], the
switches a[l] = 1[h[l] > 0] and the amplitudes h[l] inferred bottom-up (the network matches
with W[k] / ||W[k]||^2, see :meth:`fastdrmm._network.Network.matching_templates`). With
T[0] = x and T[l] = h[l] the targets, the objective is, per unit weight (labeled samples
weigh 1, unlabeled ``unlabeled_weight``), summed over samples and divided by the total
weight::

    J = sum_l [ (RSS_l(W_l) + ridge_l ||W_l||^2) / (2 s2_l) + D_l/2 ln(2 pi s2_l) ]
        + RSS_top(mu) / (2 tau) + D_top/2 ln(2 pi tau)
        - ln pi_c - sum_l sum_units [ a ln pa_l[k] + (1 - a) ln(1 - pa_l[k]) + a ln pt_l[t] ]

    RSS_l(W) = sum_n ||T[l-1] - render(h[l], idx[l], W, switches=a[l])||^2  (layers 1..L)
    RSS_top(mu) = sum_n ||h[L] - mu[c] on every position||^2

Every term is quadratic in one layer's templates given the statistics
``B, G = template_stats(T[l-1], h[l], idx[l], switches=a[l])``:
``RSS_l(W) = ||T||^2 - 2 <W, B> + sum_c W[:, c]^T G W[:, c]``, so the M-step minimises J
exactly: ``W_l = solve(G + ridge_l I, B)``, then ``s2_l``, ``mu`` (class means of f),
``tau``, and the prior frequencies. ``ridge_l = ridge * trace(G) / dim(G)`` (relative, so
it is free of the data's scale). A template no unit chose is re-seeded from a data patch.
"""

from __future__ import annotations

import numpy as np

from . import _amplitudes, _top, ops
from ._elementwise import sum_squares
from ._network import softmax

_LOG_2PI = float(np.log(2 * np.pi))
#: probabilities are kept in [PROB_FLOOR, 1 - PROB_FLOOR] so that every log is finite
PROB_FLOOR = 1e-12
#: the most samples stepwise EM (partial_fit) keeps for the shared-covariance top
TOP_SAMPLES = 20000
#: the Statistics entries that are per-sample lists (batch by batch), not sums
_PER_SAMPLE = ("features", "feature_classes", "feature_weights", "feature_kept",
               "feature_labeled")


def _newest(batches, limit):
    """The trailing batches holding at most ``limit`` rows (a batch cut at its tail end)."""
    out, kept = [], 0
    for batch in reversed(batches):
        if kept >= limit:
            break
        take = min(len(batch), limit - kept)
        out.append(batch[len(batch) - take:])
        kept += take
    return out[::-1]


def _mat(arr):
    """(K, C, kh, kw) -> (K*kh*kw, C), the layout of the Gram matrix's rows."""
    k, c, kh, kw = arr.shape
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1)).reshape(k * kh * kw, c)


def _unmat(mat, shape):
    k, c, kh, kw = shape
    return np.ascontiguousarray(mat.reshape(k, kh, kw, c).transpose(0, 3, 1, 2))


class Statistics:
    """The E-step's sums (float64), added batch by batch."""

    def __init__(self, net, features=True):
        self.net = net
        #: whether the E-step keeps the top features (see below)
        self.keep_features = bool(features)
        L = net.n_layers
        self.weight = 0.0
        self.B = [None] * L
        self.G = [None] * L
        self.TT = np.zeros(L)
        self.n_on = [np.zeros(layer.n_templates) for layer in net.layers]
        self.n_units = [0.0] * L  # units per template (Hp*Wp), weighted
        self.offsets = [np.zeros(layer.window[0] * layer.window[1]) for layer in net.layers]
        self.class_weight = np.zeros(net.n_classes)
        self.class_sum = np.zeros((net.n_classes, net.feature_size))
        self.top_sq = 0.0
        #: candidate patches per layer (from the first batch) to re-seed unused templates
        self.patches = [None] * L
        #: the bottom-up top features, their classes and weights, batch by batch: the
        #: shared-covariance top (:mod:`fastdrmm._top`) is fitted by scikit-learn's
        #: estimators on the samples themselves
        self.features = []
        self.feature_classes = []
        self.feature_weights = []  # before the confidence threshold
        self.feature_kept = []  # after it (the E-step's own posteriors)
        self.feature_labeled = []

    def scaled(self, factor):
        """A copy with every sum (and every sample's weight) times ``factor`` (stepwise
        EM)."""
        out = Statistics(self.net)
        for name, value in vars(self).items():
            if name in ("net", "keep_features", *_PER_SAMPLE) and name != "feature_weights":
                value = list(value) if isinstance(value, list) else value
            elif name == "patches":
                pass
            elif isinstance(value, list):
                value = [None if v is None else v * factor for v in value]
            else:
                value = value * factor
            setattr(out, name, value)
        return out

    def add(self, other):
        for name, value in vars(self).items():
            if name in ("net", "keep_features"):
                continue
            o = getattr(other, name)
            if name in _PER_SAMPLE:
                # the newest TOP_SAMPLES samples (stepwise EM: a sliding window)
                setattr(self, name, _newest(value + o, TOP_SAMPLES))
            elif name == "patches":
                setattr(self, name, [b if a is None else a for a, b in zip(value, o)])
            elif isinstance(value, list):
                setattr(self, name, [b if a is None else (a if b is None else a + b)
                                     for a, b in zip(value, o)])
            else:
                setattr(self, name, value + o)
        return self


def e_step(net, p, x, yidx, unlabeled_weight, stats, layers=True, *, amplitude_steps=0,
           threshold=0.0, choose=None):
    """Infer the latents of batch x and add their statistics to ``stats`` (``layers=False``:
    only those of the top, which is all :func:`fit_top` reads).

    ``amplitude_steps``: the codes are refined that many steps towards rendering the layer
    below (:func:`fastdrmm._amplitudes.refine_codes`) before the layers' statistics are
    taken. ``threshold`` > 0: an unlabeled sample whose chosen class has a posterior below it
    weighs nothing this iteration. ``choose(x, latents) -> latents``: the latents (codes
    h[1..L], argmax positions, switches) the layers' statistics are taken from, given the
    fresh ones (the monotone E-step's per-sample choice, :mod:`fastdrmm._latents`)."""
    n = x.shape[0]
    fw = net.bottom_up(p, x)
    labeled = yidx >= 0
    classes = np.where(labeled, yidx, np.asarray(fw.scores).argmax(axis=1))
    switches = [fw.switches(l, x.dtype) for l in range(net.n_layers)]
    w = np.where(labeled, 1.0, float(unlabeled_weight))
    unthresholded = w
    if threshold > 0 and not labeled.all():
        posterior = _posterior_of_best(fw.scores)
        w = np.where(labeled | (posterior >= threshold), w, 0.0)
    weighted = not np.all(w == 1.0)
    root = np.sqrt(w).astype(x.dtype)[:, None, None, None]
    hs = (_amplitudes.refine_codes(net, p, fw, switches, amplitude_steps)
          if layers and amplitude_steps else fw.hs)
    idxs = fw.idxs
    if layers and choose is not None:
        codes, idxs, switches = choose(x, (list(hs[1:]), list(fw.idxs), switches))
        hs = [x, *codes]
    for l, layer in enumerate(net.layers if layers else ()):
        target, code = hs[l], hs[l + 1]
        if weighted:  # ||sqrt(w) (T - render(r))||^2 = ||sqrt(w) T - render(sqrt(w) r)||^2
            target, code = target * root, code * root
        B, _, G = ops.template_stats(target, code, idxs[l], layer.kernel_size,
                                     padding=layer.padding, switches=switches[l], gram=True,
                                     check_idx=False, backend=net.backend)
        B, G = np.asarray(B, np.float64), np.asarray(G, np.float64)
        stats.B[l] = B if stats.B[l] is None else stats.B[l] + B
        stats.G[l] = G if stats.G[l] is None else stats.G[l] + G
        stats.TT[l] += sum_squares(target)
        on = switches[l]
        if stats.patches[l] is None:
            rng = np.random.default_rng([n, l, layer.n_templates])
            stats.patches[l] = random_patches(hs[l], layer, layer.n_templates, rng)
        stats.n_on[l] += np.einsum("nkij,n->k", on, w, dtype=np.float64)
        stats.n_units[l] += float(w.sum()) * on[0, 0].size
        stats.offsets[l] += _offset_counts(net, l, idxs[l], on, w)
    f = np.asarray(fw.f, np.float64)
    if net.matching == "normalized" and stats.keep_features:
        stats.features.append(np.array(fw.f))
        stats.feature_classes.append(classes)
        stats.feature_weights.append(unthresholded)
        stats.feature_kept.append(w > 0)
        stats.feature_labeled.append(labeled)
    stats.class_weight += np.bincount(classes, weights=w, minlength=net.n_classes)
    np.add.at(stats.class_sum, classes, f * w[:, None])
    h_top = fw.hs[-1]
    stats.top_sq += float(np.einsum("nkij,nkij,n->", h_top, h_top, w, dtype=np.float64))
    stats.weight += float(w.sum())
    return fw, classes


def _posterior_of_best(scores):
    """The softmax probability of each row's best class."""
    return softmax(np.asarray(scores, np.float64)).max(axis=1)


def _offset_counts(net, l, idx, on, w):
    """Weighted counts of the chosen translation (offset in the pooling window) over the
    switched-on units of layer l."""
    ph, pw = net.layers[l].window
    if ph * pw == 1:
        return np.array([float(np.einsum("nkij,n->", on, w))])
    wo = net.shapes[l].plane[1]
    hp, wp = net.shapes[l].pooled
    # the argmax relative to its window's corner is di * wo + dj: count those (one pass
    # over the units), then read the ph x pw entries
    corner = (np.arange(hp)[:, None] * (ph * wo) + np.arange(wp)[None, :] * pw).astype(
        idx.dtype)
    units = on != 0
    rel = (idx - corner)[units]
    weights = np.broadcast_to(w[:, None, None, None], on.shape)[units] * on[units]
    counts = np.bincount(rel, weights=weights.astype(np.float64),
                         minlength=(ph - 1) * wo + pw)
    return counts[(np.arange(ph)[:, None] * wo + np.arange(pw)[None, :]).ravel()]


def random_patches(h, layer, k, rng):
    """k patches of h (padded as the layer pads), drawn with probability proportional to
    their squared norm (uniformly when every patch is zero).

    Only the chosen patches are copied: the squared norms come from a window sum of the
    channel-summed squares (copying every patch of a batch took seconds per layer)."""
    ph, pw = layer.padding
    kh, kw = layer.kernel_size
    hp = np.pad(np.asarray(h, np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    energy = np.einsum("ncij,ncij->nij", hp, hp)
    norms = np.lib.stride_tricks.sliding_window_view(energy, (kh, kw), axis=(1, 2)).sum(
        axis=(-2, -1)).ravel()
    n, ho, wo = energy.shape[0], energy.shape[1] - kh + 1, energy.shape[2] - kw + 1
    total = norms.sum()
    prob = norms / total if total > 0 else None
    available = norms.size if prob is None else int(np.count_nonzero(prob))
    chosen = rng.choice(norms.size, size=k, replace=available < k, p=prob)
    s, rest = np.divmod(chosen, ho * wo)
    i, j = np.divmod(rest, wo)
    return np.stack([hp[a, :, b:b + kh, c:c + kw] for a, b, c in zip(s, i, j)])


def _ridge(G, ridge):
    dim = G.shape[0]
    scale = float(np.trace(G)) / dim
    return ridge * (scale if scale > 0 else 1.0)


def _rss(stats, l, W):
    Wm = _mat(np.asarray(W, np.float64))
    Bm = _mat(stats.B[l])
    return stats.TT[l] - 2.0 * float(np.sum(Wm * Bm)) + float(np.sum(Wm * (stats.G[l] @ Wm)))


def _top_rss(stats, net, mu):
    mu = np.asarray(mu, np.float64)
    P = net.top_positions
    return (stats.top_sq - 2.0 * P * float(np.sum(mu * stats.class_sum))
            + P * float(np.sum(stats.class_weight * np.sum(mu * mu, axis=1))))


def residual_variances(net, p, stats):
    """The noise variances of the current templates of ``p`` (not of refitted ones): each
    layer's and the top's residual sum of squares per unit weight and value, floored at
    1e-12, as the entries ``noise_variance`` and ``top_noise_variance``."""
    s2 = []
    for l in range(net.n_layers):
        D = float(np.prod(net.shapes[l].input_hw)) * net.shapes[l].channels_in
        rss = _rss(stats, l, np.asarray(p[f"W{l}"], np.float64))
        s2.append(max(rss / (stats.weight * D), 1e-12))
    mu = np.asarray(p["mu"], np.float64)
    D_top = float(net.feature_size * net.top_positions)
    return {"noise_variance": np.array(s2),
            "top_noise_variance": np.float64(
                max(_top_rss(stats, net, mu) / (stats.weight * D_top), 1e-12))}


def _xlogy_sum(counts, probs):
    return float(np.sum(counts * np.log(np.clip(probs, PROB_FLOOR, None))))


def objective(net, p, stats, ridge, top=True):
    """The hard-EM objective J (see the module docstring) of parameters p at the latents
    whose statistics are ``stats``; lower is better. ``top=False``: without the top's and
    the class prior's terms (the part the monotone E-step never raises)."""
    total = stats.weight
    J = 0.0
    for l, layer in enumerate(net.layers):
        s2 = float(p["noise_variance"][l])
        W = np.asarray(p[f"W{l}"], np.float64)
        lam = _ridge(stats.G[l], ridge)
        D = float(np.prod(net.shapes[l].input_hw)) * net.shapes[l].channels_in
        J += (_rss(stats, l, W) + lam * float(np.sum(W * W))) / (2 * s2)
        J += total * D / 2 * (_LOG_2PI + np.log(s2))
        pa = np.clip(np.asarray(p[f"switch_prior{l}"], np.float64), PROB_FLOOR,
                     1 - PROB_FLOOR)
        J -= float(np.sum(stats.n_on[l] * np.log(pa)
                          + (stats.n_units[l] - stats.n_on[l])
                          * np.log1p(-pa)))
        J -= _xlogy_sum(stats.offsets[l], np.asarray(p[f"translation_prior{l}"], np.float64))
    if not top:
        return J / total
    if net.matching != "normalized":
        # the isotropic top; an EM model's shared-covariance top is scikit-learn's shrunk
        # estimate, not a minimiser of this objective (and its means are in the coherent
        # codes' units), so its term is left out at every iteration alike
        tau = float(p["top_noise_variance"])
        D_top = float(net.feature_size * net.top_positions)
        J += _top_rss(stats, net, p["mu"]) / (2 * tau) + total * D_top / 2 * (_LOG_2PI
                                                                              + np.log(tau))
    J -= _xlogy_sum(stats.class_weight, np.asarray(p["class_prior"], np.float64))
    return J / total


def generative_bias_of(W, s2, pa):
    """The bias that makes the normalized match (template W[k] / ||W[k]||^2) equal to the
    switch's log-odds ``<W,p>/s2 - ||W||^2/(2 s2) + ln(pa/(1-pa))`` times ``s2/||W[k]||^2``:
    ``-1/2 + s2 ln(pa/(1-pa)) / ||W[k]||^2`` (a positive factor per template, so every switch
    and argmax is the generative model's)."""
    norms = np.sum(np.asarray(W, np.float64) ** 2, axis=(1, 2, 3))
    logit = np.log(pa) - np.log1p(-pa)
    return -0.5 + s2 * logit / np.maximum(norms, 1e-30)


def _normalised(counts):
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if not total > 0:
        return np.full(counts.shape, 1.0 / counts.size)
    probs = np.maximum(counts / total, PROB_FLOOR)
    return probs / probs.sum()


def m_step(net, p, stats, ridge, generative_bias=True, variance_floor=1e-8, *,
           shrinkage="auto", top=True, reseed=True, threshold=0.0):
    """The parameters minimising the objective at these statistics (a new dict; p is not
    changed). Templates of layers whose statistics are empty are kept. ``top=False`` leaves
    the top's entries (:func:`fit_top`) as they are. ``reseed``: a template no unit chose
    is re-seeded from a data patch (which the objective's ridge term charges for; the
    minimiser is 0)."""
    new = dict(p)
    total = stats.weight
    dtype = np.asarray(p["W0"]).dtype
    s2_all = np.array(p["noise_variance"], np.float64)
    for l, layer in enumerate(net.layers):
        G = stats.G[l]
        lam = _ridge(G, ridge)
        W = np.linalg.solve(G + lam * np.eye(G.shape[0]), _mat(stats.B[l]))
        W = _unmat(W, np.asarray(p[f"W{l}"]).shape)
        unused = stats.n_on[l] <= 0
        if reseed and unused.any() and stats.patches[l] is not None:
            # a template no unit chose is re-seeded from a patch of the data (norm^2-weighted)
            W[unused] = stats.patches[l][unused]
        D = float(np.prod(net.shapes[l].input_hw)) * net.shapes[l].channels_in
        rss = _rss(stats, l, W) + lam * float(np.sum(W * W))
        floor = variance_floor * max(stats.TT[l] / (total * D), 1e-30)
        s2_all[l] = max(rss / (total * D), floor)
        per_k = stats.n_units[l]
        pa = np.clip(stats.n_on[l] / per_k if per_k > 0 else np.full(layer.n_templates, 0.5),
                     PROB_FLOOR, 1 - PROB_FLOOR)
        new[f"W{l}"] = W.astype(dtype)
        new[f"switch_prior{l}"] = pa
        new[f"translation_prior{l}"] = _normalised(stats.offsets[l])
        if generative_bias:
            new[f"b{l}"] = generative_bias_of(W, s2_all[l], pa).astype(dtype)
    new["noise_variance"] = s2_all
    if top:
        new.update(fit_top(net, p, stats, generative_bias, variance_floor, shrinkage,
                           threshold))
    return new


def fit_top(net, p, stats, generative_bias=True, variance_floor=1e-8, shrinkage="auto",
            threshold=0.0):
    """The M-step of the top, as a dict of its entries: class templates, top noise
    variance, class prior and the class scores.

    An EM model's class scores are those of class-conditional Gaussians with one shared,
    shrunk covariance (:mod:`fastdrmm._top`, fitted on the E-step's top features: entries
    ``class_weights``, ``top_covariance`` and ``beta``); otherwise (with
    ``generative_bias``) those of the isotropic top (``class_scale``, ``beta``).

    With labeled and unlabeled samples, the unlabeled ones' classes are chosen afresh by the
    top fitted to the labeled ones (the features are those of the current templates, which
    the top that chose their classes in the E-step may not have seen), and ``threshold``
    applies to that top's posteriors."""
    new = {}
    if net.matching == "normalized" and stats.features:
        new.update(_isotropic_top(net, p, stats, False, variance_floor))
        features = np.concatenate(stats.features)
        classes = np.concatenate(stats.feature_classes)
        weights = np.concatenate(stats.feature_weights)
        labeled = np.concatenate(stats.feature_labeled)
        if labeled.any() and not labeled.all():
            first = _top.fit_gaussian_top(features[labeled], classes[labeled],
                                          weights[labeled], net.n_classes, p["mu"], shrinkage)
            scores = (np.asarray(features[~labeled], np.float64) @ first["class_weights"].T
                      + first["beta"])
            classes = classes.copy()
            classes[~labeled] = scores.argmax(axis=1)
            if threshold > 0:
                weights = weights.copy()
                weights[~labeled] *= _posterior_of_best(scores) >= threshold
        elif threshold > 0:  # no labels to re-choose with: the E-step's own posteriors
            weights = weights * np.concatenate(stats.feature_kept)
        fitted = _top.fit_gaussian_top(features, classes, weights, net.n_classes, p["mu"],
                                       shrinkage)
        dtype = np.asarray(p["mu"]).dtype
        new["mu"] = fitted["mu"].astype(dtype)
        new["class_prior"] = fitted["class_prior"]
        new["class_weights"] = fitted["class_weights"].astype(dtype)
        new["beta"] = fitted["beta"].astype(dtype)
        new["top_covariance"] = fitted["top_covariance"]
        new["class_scale"] = np.float64(1.0)
        return new
    return _isotropic_top(net, p, stats, generative_bias, variance_floor)


def _isotropic_top(net, p, stats, generative_bias, variance_floor):
    """Class means, one noise variance, class prior (and the scores they imply)."""
    new = {}
    total = stats.weight
    dtype = np.asarray(p["mu"]).dtype
    mu = np.array(p["mu"], np.float64)
    seen = stats.class_weight > 0
    mu[seen] = stats.class_sum[seen] / stats.class_weight[seen, None]
    D_top = float(net.feature_size * net.top_positions)
    tau = max(_top_rss(stats, net, mu) / (total * D_top),
              variance_floor * max(stats.top_sq / (total * D_top), 1e-30))
    pc = _normalised(stats.class_weight)
    new["mu"] = mu.astype(dtype)
    new["top_noise_variance"] = np.float64(tau)
    new["class_prior"] = pc
    if generative_bias:
        # the class scores are the top Gaussian's log-likelihood + ln pi_c, up to constants
        new["class_scale"] = np.float64(net.top_positions / tau)
        new["beta"] = (-net.top_positions * np.sum(mu * mu, axis=1) / (2 * tau)
                       + np.log(pc)).astype(dtype)
    return new


def normalize_templates(net, p, generative_bias=True):
    """The same renderings with every layer template scaled to unit norm.

    A layer's least squares fixes a template's direction, but its scale only together with
    the codes it renders (the matching infers amplitudes as <W, patch> / ||W||^2, which
    absorb any scale); left alone the scale drifts geometrically from one iteration to the
    next (by about the number of overlapping patches). Dividing W[l][k] by its norm n_k
    multiplies the amplitudes of channel k by n_k, so the templates that render that channel
    (W[l+1][:, k], or mu[:, k] at the top) are multiplied by n_k: every rendering stays the
    same. The noise variances of the rescaled codes are scaled by the mean of n^2, and the
    biases recomputed."""
    new = dict(p)
    s2 = np.array(p["noise_variance"], np.float64)
    carry = None
    for l in range(net.n_layers):
        dtype = np.asarray(p[f"W{l}"]).dtype
        W = np.array(p[f"W{l}"], np.float64)
        if carry is not None:
            W *= carry[None, :, None, None]
            s2[l] *= float(np.mean(carry ** 2))
        norms = np.sqrt(np.sum(W * W, axis=(1, 2, 3)))
        norms = np.where(norms > 0, norms, 1.0)
        W /= norms[:, None, None, None]
        carry = norms
        new[f"W{l}"] = W.astype(dtype)
        if generative_bias:
            pa = np.asarray(p[f"switch_prior{l}"], np.float64)
            new[f"b{l}"] = generative_bias_of(W, s2[l], pa).astype(dtype)
    new["noise_variance"] = s2
    dtype = np.asarray(p["mu"]).dtype
    # mu's features are the channels ("average") or channel-major (channel, i, j) ("full")
    per_feature = np.repeat(carry, net.feature_size // carry.size)
    mu = np.asarray(p["mu"], np.float64) * per_feature[None, :]
    tau = float(p["top_noise_variance"]) * float(np.mean(carry ** 2))
    new["mu"] = mu.astype(dtype)
    new["top_noise_variance"] = np.float64(tau)
    if "class_weights" in p:
        # the shared-covariance top of features scaled by per_feature: the same scores
        new["class_weights"] = (np.asarray(p["class_weights"], np.float64)
                                / per_feature[None, :]).astype(dtype)
        new["top_covariance"] = (np.asarray(p["top_covariance"], np.float64)
                                 * np.outer(per_feature, per_feature))
    elif generative_bias:
        new["class_scale"] = np.float64(net.top_positions / tau)
        new["beta"] = (-net.top_positions * np.sum(mu * mu, axis=1) / (2 * tau)
                       + np.log(np.asarray(p["class_prior"], np.float64))).astype(dtype)
    return new
