"""The shallow Rendering Mixture Model (DESIGN.md section 1) as a scikit-learn estimator.

The generative model over whole inputs ``x`` (``D = C*H*W`` pixels, or ``D`` features)::

    c ~ Cat(pi_c)           class,    class_prior_     (n_classes,)
    g ~ Cat(pi_g)           nuisance, nuisance_prior_  (n_nuisances,), shared by every class
    a ~ Bernoulli(pi_a)     switch,   switch_prior_    P(a = 1)
    x = a * mu[c, g] + noise,   noise ~ N(0, sigma^2 I),   noise_variance_ = sigma^2

``a = 0`` renders nothing: ``x`` is pure noise then, whatever ``c`` and ``g``. With
``w = mu / sigma^2`` and ``b = -||mu||^2 / (2 sigma^2) + ln(pi_a / (1 - pi_a))`` the log-joint is

    ln p(x, c, g, a) = base(x) + ln pi_c + ln pi_g + ln(1 - pi_a) + a * (<w[c,g], x> + b[c,g])
    base(x) = -D/2 ln(2 pi sigma^2) - ||x||^2 / (2 sigma^2)

so summing the switch out gives ``softplus(z)`` and maximising it gives ``ReLU(z)`` of the
match ``z = <w, x> + b``. The matches of all samples against all templates come from
:func:`fastdrmm.ops.match_switch_pool` (whole-input templates, a 1x1 plane, ``pool=1``; leak 1 is
the identity switch, leak 0 the ReLU), and the M-step's weighted sums from
:func:`fastdrmm.ops.template_stats`, so the model runs on any host backend.
"""

from __future__ import annotations

import numbers
import time
import warnings

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import _backends, io, ops
from ._validation import check_int as _check_int
from ._validation import check_real as _check_real

__all__ = ["RMM"]

#: probabilities are floored at this value (then renormalised) so that no log is ever -inf
PROB_FLOOR = 10 * np.finfo(np.float64).eps
#: a template whose effective (a = 1) count, relative to the total weight, falls below this is
#: empty and is re-seeded
EMPTY_FRACTION = 1e-10
#: samples per chunk are chosen so that one (chunk, max(K, D)) float64 array holds at most this
#: many elements; every per-sample quantity is computed chunk by chunk
_CHUNK_ELEMENTS = 1 << 21

_LOG_2PI = float(np.log(2 * np.pi))


# --------------------------------------------------------------------------------------------
# argument checking


def _as_samples(X, name="X"):
    """X as a float64 C-contiguous array of shape (N, D) or (N, C, H, W)."""
    try:
        arr = np.asarray(X)
    except Exception as exc:
        raise TypeError(f"{name} must be an array of numbers, got {type(X).__name__}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim not in (2, 4):
        hint = " (reshape (N, H, W) images to (N, 1, H, W))" if arr.ndim == 3 else ""
        raise ValueError(
            f"{name} must be a 2-d array (N, D) or a 4-d array (N, C, H, W), got shape "
            f"{arr.shape}{hint}"
        )
    if arr.shape[0] < 1:
        raise ValueError(f"{name} holds no samples (shape {arr.shape})")
    if 0 in arr.shape[1:]:
        raise ValueError(f"{name} has an empty feature dimension (shape {arr.shape})")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def _check_random_state(seed, name):
    try:
        return check_random_state(seed)
    except ValueError:
        raise ValueError(
            f"{name} must be None, an int or a numpy RandomState, got {seed!r}") from None


def _unlabeled_mask(y):
    """Entries marking an unlabeled sample: -1 (or the string '-1', or None in object arrays)."""
    kind = y.dtype.kind
    if kind in "iuf":
        return y == -1
    if kind == "b":
        return np.zeros(y.shape, bool)
    if kind == "U":
        return y == "-1"
    if kind == "S":
        return y == b"-1"
    if kind == "O":
        def unlabeled(value):
            if value is None:
                return True
            if isinstance(value, str):
                return value == "-1"
            if isinstance(value, (numbers.Number, np.number)) and not isinstance(value, bool):
                return value == -1
            return False
        return np.fromiter((unlabeled(v) for v in y), bool, count=len(y))
    raise TypeError(f"y must hold class labels (numbers or strings), got dtype {y.dtype}")


# --------------------------------------------------------------------------------------------
# small numerical helpers


def _floor_probs(p):
    p = np.maximum(np.asarray(p, np.float64), PROB_FLOOR)
    return p / p.sum()


def _valid_probs(p):
    """Fitted priors as they are when positive (so that predictions use them exactly), else
    floored and renormalised."""
    p = np.asarray(p, np.float64)
    if not (np.isfinite(p).all() and p.min() > 0):
        p = _floor_probs(np.where(np.isfinite(p), p, 0.0))
    return p


def _clip_switch(p):
    return float(np.clip(p, PROB_FLOOR, 1.0 - PROB_FLOOR))


def _logsumexp_rows(t):
    """Row-wise log-sum-exp of a 2-d array with at least one finite entry per row."""
    m = t.max(axis=1)
    with np.errstate(under="ignore"):
        return m + np.log(np.exp(t - m[:, None]).sum(axis=1))


def _chunks(n, width):
    size = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class _Params:
    """The parameters in working form: flat templates mu (K, D) with k = c * n_nuisances + g,
    the priors, the noise variance, and the shapes."""

    __slots__ = ("mu", "pc", "pg", "pa", "s2", "feature_shape")

    def __init__(self, mu, pc, pg, pa, s2, feature_shape):
        self.mu, self.pc, self.pg = mu, pc, pg
        self.pa, self.s2 = float(pa), float(s2)
        self.feature_shape = tuple(feature_shape)

    @property
    def n_classes(self):
        return self.pc.shape[0]

    @property
    def n_nuisances(self):
        return self.pg.shape[0]

    @property
    def shape4(self):
        """One sample as the ops see it: (C, H, W), or (1, 1, D) for flat features."""
        shape = self.feature_shape
        return shape if len(shape) == 3 else (1, 1, shape[0])

    @property
    def log_prior(self):
        """ln pi_c + ln pi_g over the flat component index k = c * n_nuisances + g."""
        return (np.log(self.pc)[:, None] + np.log(self.pg)[None, :]).ravel()

    def replace(self, **changes):
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return _Params(**values)


# --------------------------------------------------------------------------------------------
# the estimator


class RMM(ClassifierMixin, BaseEstimator):
    """Shallow Rendering Mixture Model fitted by (soft or hard) EM.

    A class ``c``, a nuisance ``g`` and a switch ``a`` render ``x = a * mu[c, g] + noise``
    (DESIGN.md section 1): ``n_classes * n_nuisances`` templates, one class prior, one nuisance
    prior shared by all classes, one switch probability and one isotropic noise variance.

    Parameters
    ----------
    n_classes : int
        Number of classes. With labels it must be at least the number of distinct labels;
        classes beyond those are latent (unlabeled) classes learnt from unlabeled samples.
    n_nuisances : int, default 1
        Templates per class (the nuisance variable's cardinality).
    inference : {"soft", "hard"}, default "soft"
        ``"soft"``: EM with sum-product responsibilities over every ``(c, g, a)``; the
        objective is the log-likelihood, which never decreases. ``"hard"``: max-sum
        (classification, zero-noise-limit) EM, each sample takes its single most probable
        ``(c, g, a)``; the objective is the mean maximal log-joint
        ``max_{c,g,a} ln p(x, c, g, a)``, which never decreases: its negative, the energy, never
        increases. Prediction follows the same inference (see :meth:`predict`).
    max_iter : int, default 100
        EM iterations per initialisation (0 fits the initialisation only).
    tol : float, default 1e-4
        EM stops when the mean objective changes by less than ``tol`` in one iteration.
    n_init : int, default 1
        Initialisations; the one with the largest final objective is kept.
    reg : float, default 1e-6
        Added to the noise variance in every M-step. It is the MAP estimate under the
        (improper) prior ``ln p(sigma^2) = -D * reg * W / (2 sigma^2)``, so the objective
        reported in ``lower_bounds_`` includes the term ``-D * reg / (2 sigma^2)`` per sample:
        with it, EM is exactly monotone.
    unlabeled_weight : float, default 1.0
        The EM-lambda of Nigam et al. (2000): unlabeled samples' responsibilities are scaled by
        it in the M-step, i.e. the objective is ``sum_labeled ln p(x, y) + lambda *
        sum_unlabeled ln p(x)`` (divided by the total weight ``W = n_labeled + lambda *
        n_unlabeled``).
    random_state : int, RandomState instance or None
        Seeds the k-means++ initialisation (and :meth:`sample` when called without one).
    warm_start : bool, default False
        Start :meth:`fit` from the current parameters (then ``n_init`` is ignored).
    verbose : int, default 0
        1 prints the objective every iteration, 2 adds the time per iteration.
    backend : str, default "auto"
        The :mod:`fastdrmm.ops` backend for the matches and the M-step statistics.

    Attributes
    ----------
    templates_ : ndarray (n_classes, n_nuisances, *feature_shape)
    class_prior_ : ndarray (n_classes,)
    nuisance_prior_ : ndarray (n_nuisances,)
    switch_prior_ : float, P(a = 1)
    noise_variance_ : float, sigma^2
    classes_ : ndarray (n_classes,), the class labels (``arange(n_classes)`` unsupervised)
    lower_bound_ : float, the mean objective at the returned parameters (best over n_init)
    lower_bounds_ : list of float, the mean objective after each EM iteration of the kept run
    n_iter_ : int, EM iterations of the kept run
    converged_ : bool
    n_features_in_ : int, D
    feature_shape_ : tuple, the shape of one sample, ``(D,)`` or ``(C, H, W)``

    Notes
    -----
    Fitting: ``fit(X)`` / ``fit(X, None)`` is unsupervised; labels with ``-1`` marking the
    unlabeled samples fit semi-supervised; all labeled fits supervised (each labeled sample's
    class is fixed to its label). The M-step is closed form (``q1``, ``q0`` are the weighted
    responsibilities of ``(c, g, a=1)`` and ``(c, g, a=0)``)::

        mu[c,g]  = sum_n q1[n,c,g] x_n / sum_n q1[n,c,g]
        pi_c     = sum_{n,g,a} q[n,c,g,a] / W,   pi_g = sum_{n,c,a} q / W,   pi_a = sum q1 / W
        sigma^2  = (sum q1[n,c,g] ||x_n - mu[c,g]||^2 + sum q0[n,c,g] ||x_n||^2) / (W D) + reg

    Priors are floored at ``10 * eps`` and renormalised, so no log is ever ``-inf``.
    Initialisation is k-means++ (D^2 sampling): per class from its labeled samples, topped up
    from the unlabeled samples nearest to that class when it has fewer labels than
    ``n_nuisances``; unsupervised, ``n_classes`` class seeds first, then ``n_nuisances`` seeds
    inside each class seed's cell. A template whose ``a = 1`` count falls below
    ``1e-10 * W`` is re-seeded to the worst explained sample allowed for its class (labeled
    with it, or unlabeled).

    Semi-supervised: with few labels, a small ``unlabeled_weight`` (about 0.1) and
    ``n_nuisances`` about the number of labels per class work best on the 8x8 digits: the
    seeds then all come from labeled samples and the labeled samples keep anchoring the
    classes while the unlabeled ones refine the templates; with ``unlabeled_weight=1`` the
    unlabeled majority can pull the templates towards clusters that are not the classes.
    """

    def __init__(self, n_classes, n_nuisances=1, inference="soft", max_iter=100, tol=1e-4,
                 n_init=1, reg=1e-6, unlabeled_weight=1.0, random_state=None,
                 warm_start=False, verbose=0, backend="auto"):
        self.n_classes = n_classes
        self.n_nuisances = n_nuisances
        self.inference = inference
        self.max_iter = max_iter
        self.tol = tol
        self.n_init = n_init
        self.reg = reg
        self.unlabeled_weight = unlabeled_weight
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.backend = backend

    # ---------------------------------------------------------------- parameters and inputs

    def _check_params(self):
        _check_int(self.n_classes, "n_classes", 1)
        _check_int(self.n_nuisances, "n_nuisances", 1)
        if not isinstance(self.inference, str) or self.inference not in ("soft", "hard"):
            raise ValueError(f"inference must be 'soft' or 'hard', got {self.inference!r}")
        _check_int(self.max_iter, "max_iter", 0)
        _check_real(self.tol, "tol", 0.0)
        _check_int(self.n_init, "n_init", 1)
        _check_real(self.reg, "reg", 0.0)
        _check_real(self.unlabeled_weight, "unlabeled_weight", 0.0)
        if not isinstance(self.warm_start, (bool, np.bool_)):
            raise TypeError(f"warm_start must be True or False, got {self.warm_start!r}")
        _check_int(self.verbose, "verbose", 0)
        _backends._check_name(self.backend)

    def _check_X_fitted(self, X):
        """X at predict time -> float64 (N, D); flat (N, D) input is accepted for images."""
        check_is_fitted(self, "templates_")
        arr = _as_samples(X)
        shape = tuple(self.feature_shape_)
        if arr.shape[1:] != shape and not (arr.ndim == 2 and arr.shape[1] == self.n_features_in_):
            raise ValueError(
                f"X has samples of shape {arr.shape[1:]} but the model was fitted on samples "
                f"of shape {shape}"
            )
        return arr.reshape(arr.shape[0], -1)

    def _labels(self, y, n_samples, warm):
        """-> (classes_, yidx) with yidx the class index of each sample, -1 if unlabeled."""
        n_classes = self.n_classes
        if y is None:
            classes = self.classes_ if warm else np.arange(n_classes)
            return classes, np.full(n_samples, -1, np.intp)
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.ravel()
        if y.ndim != 1:
            raise ValueError(f"y must be a 1-d array of labels, got shape {y.shape}")
        if y.shape[0] != n_samples:
            raise ValueError(f"y holds {y.shape[0]} labels but X holds {n_samples} samples")
        if y.dtype.kind == "c":
            raise TypeError(f"y must hold class labels, got complex dtype {y.dtype}")
        if y.dtype.kind == "f" and np.isnan(y).any():
            raise ValueError("y contains NaN; mark unlabeled samples with -1")
        unlabeled = _unlabeled_mask(y)
        labeled_values = y[~unlabeled]
        yidx = np.full(n_samples, -1, np.intp)
        if warm:
            classes = self.classes_
            if labeled_values.size:
                known, pos = _lookup(classes, labeled_values)
                if not known.all():
                    raise ValueError(
                        f"y holds labels {np.unique(labeled_values[~known]).tolist()} that the "
                        f"warm-started model does not know (classes_ = {classes.tolist()})"
                    )
                yidx[~unlabeled] = pos
            return classes, yidx
        if labeled_values.size == 0:
            return np.arange(n_classes), yidx
        try:
            seen = np.unique(labeled_values)
        except TypeError as exc:
            raise TypeError(f"y holds labels that cannot be compared: {exc}") from None
        if seen.size > n_classes:
            raise ValueError(
                f"n_classes={n_classes} is smaller than the {seen.size} distinct labels in y"
            )
        yidx[~unlabeled] = np.searchsorted(seen, labeled_values)
        extra = n_classes - seen.size
        if extra == 0:
            return seen, yidx
        if not unlabeled.any() or self.unlabeled_weight == 0:
            raise ValueError(
                f"n_classes={n_classes} but y holds only {seen.size} distinct labels and no "
                "(weighted) unlabeled samples (label -1) to learn the other classes from"
            )
        if seen.dtype.kind in "iuf":
            new = seen.max() + 1 + np.arange(extra)
            classes = np.concatenate([seen, new.astype(seen.dtype)])
        else:
            classes = np.array([*seen.tolist(), *[f"latent{i}" for i in range(extra)]],
                               dtype=object)
        return classes, yidx

    # ---------------------------------------------------------------- matches via fastdrmm.ops

    def _matches(self, X, params, leak):
        """z[n, k] = <w_k, x_n> + b_k switched with slope ``leak`` (1: z, 0: ReLU(z))."""
        s2 = params.s2
        mu = params.mu
        shape4 = params.shape4
        weights = (mu / s2).reshape(mu.shape[0], *shape4)
        bias = -np.einsum("kd,kd->k", mu, mu) / (2 * s2) + (np.log(params.pa)
                                                            - np.log1p(-params.pa))
        h, _ = ops.match_switch_pool(X.reshape(X.shape[0], *shape4), weights, bias, pool=1,
                                     leak=leak, backend=self.backend)
        return h.reshape(X.shape[0], mu.shape[0])

    def _base(self, X, params):
        """base(x) + ln(1 - pi_a): the log-joint of every component with a = 0."""
        d = X.shape[1]
        xsq = np.einsum("nd,nd->n", X, X)
        return (-0.5 * d * (_LOG_2PI + np.log(params.s2)) - xsq / (2 * params.s2)
                + np.log1p(-params.pa)), xsq

    def _class_scores(self, X, params, inference):
        """(N, C): soft ln p(x, c); hard max_{g,a} ln p(x, c, g, a)."""
        n_classes, n_nuisances = params.n_classes, params.n_nuisances
        out = np.empty((X.shape[0], n_classes))
        log_prior = params.log_prior
        for sl in _chunks(X.shape[0], max(log_prior.size, X.shape[1])):
            x = X[sl]
            base, _ = self._base(x, params)
            if inference == "hard":
                t = self._matches(x, params, 0.0) + log_prior
                t = t.reshape(-1, n_classes, n_nuisances).max(axis=2)
            else:
                t = np.logaddexp(0.0, self._matches(x, params, 1.0)) + log_prior
                t = _logsumexp_rows(t.reshape(-1, n_nuisances)).reshape(-1, n_classes)
            out[sl] = base[:, None] + t
        return out

    # ---------------------------------------------------------------- E-step and M-step

    def _e_step(self, X, params, yidx, weights, inference, stats=True):
        """One pass over the data, chunk by chunk.

        Returns the per-sample objective ``ell`` (soft: ln p(x, y) for labeled, ln p(x) for
        unlabeled samples; hard: the maximal log-joint ``max_{c,g,a} ln p(x, c, g, a)`` with c
        fixed to the label where there is one) and, with ``stats``, the M-step's sufficient
        statistics: ``B[k] = sum_n q1[n,k] x_n`` and ``s1[k] = sum_n q1[n,k]`` (from
        :func:`fastdrmm.ops.template_stats`), ``A[k] = sum_n q1[n,k] ||x_n||^2``, the
        responsibility mass ``count[k]`` over both switch states, ``n1 = sum q1`` and
        ``r0x = sum_n q0[n] ||x_n||^2``.
        """
        n, d = X.shape
        n_classes, n_nuisances = params.n_classes, params.n_nuisances
        k = n_classes * n_nuisances
        shape4 = params.shape4
        log_prior = params.log_prior
        ell = np.empty(n)
        acc = None
        if stats:
            acc = dict(B=np.zeros((k, d)), s1=np.zeros(k), A=np.zeros(k), count=np.zeros(k),
                       n1=0.0, r0x=0.0)
        for sl in _chunks(n, max(k, d)):
            x = X[sl]
            m = x.shape[0]
            rows = np.arange(m)
            base, xsq = self._base(x, params)
            lab = yidx[sl]
            labeled = lab >= 0
            if inference == "hard":
                h = self._matches(x, params, 0.0)  # ReLU(z): a = 1 exactly where h > 0
                t = h + log_prior
            else:
                z = self._matches(x, params, 1.0)
                t = np.logaddexp(0.0, z) + log_prior  # softplus: the switch summed out
            if labeled.any():  # a labeled sample's class is fixed to its label
                allowed = np.ones((m, n_classes), bool)
                allowed[labeled] = False
                allowed[rows[labeled], lab[labeled]] = True
                t = np.where(np.repeat(allowed, n_nuisances, axis=1), t, -np.inf)
            if inference == "hard":
                best = np.argmax(t, axis=1)  # ties: the first (c, g); a = 0 on z = 0
                ell[sl] = base + t[rows, best]
            else:
                lse = _logsumexp_rows(t)
                ell[sl] = base + lse
            if not stats:
                continue
            w = weights[sl]
            if inference == "hard":
                q = np.zeros((m, k))
                q[rows, best] = w
                q1 = np.where(h > 0, q, 0.0)
            else:
                with np.errstate(under="ignore"):
                    q = np.exp(t - lse[:, None]) * w[:, None]
                q1 = q * expit(z)  # P(a = 1 | x, c, g) = sigmoid(z)
            big_b, s1, _ = ops.template_stats(
                x.reshape(m, *shape4), q1.reshape(m, k, 1, 1), np.zeros((m, k, 1, 1), np.int32),
                kernel_size=shape4[1:], gram=False, backend=self.backend)
            q_sum = q.sum(axis=1)
            q1_sum = q1.sum(axis=1)
            acc["B"] += big_b.reshape(k, d)
            acc["s1"] += s1
            acc["A"] += xsq @ q1
            acc["count"] += q.sum(axis=0)
            acc["n1"] += float(q1_sum.sum())
            acc["r0x"] += float((q_sum - q1_sum) @ xsq)
        return ell, acc

    def _objective(self, ell, weights, total, params):
        """Weighted mean of ell minus the MAP penalty D * reg / (2 sigma^2) of ``reg``."""
        d = params.mu.shape[1]
        return float(weights @ ell) / total - d * self.reg / (2.0 * params.s2)

    def _m_step(self, X, acc, ell, params, yidx, weights, total, s2_floor):
        """Closed-form maximiser of the expected complete objective, with empty re-seeding."""
        n_classes, n_nuisances = params.n_classes, params.n_nuisances
        s1, big_b = acc["s1"], acc["B"]
        empty = ~(s1 >= EMPTY_FRACTION * total)
        mu = params.mu.copy()
        full = ~empty
        mu[full] = big_b[full] / s1[full, None]
        if empty.any():
            _reseed(mu, empty.reshape(n_classes, n_nuisances), X, ell, yidx, weights)
        count = acc["count"].reshape(n_classes, n_nuisances)
        pc = _floor_probs(count.sum(axis=1) / total)
        pg = _floor_probs(count.sum(axis=0) / total)
        pa = _clip_switch(acc["n1"] / total)
        # sum_k sum_n q1[n,k] ||x_n - mu_k||^2 + sum_n q0[n] ||x_n||^2
        resid = (acc["A"].sum() - 2.0 * np.einsum("kd,kd->", mu, big_b)
                 + s1 @ np.einsum("kd,kd->k", mu, mu) + acc["r0x"])
        s2 = max(resid, 0.0) / (total * X.shape[1]) + self.reg
        return params.replace(mu=mu, pc=pc, pg=pg, pa=pa, s2=max(s2, s2_floor))

    # ---------------------------------------------------------------- initialisation

    def _initialize(self, X, yidx, weights, total, rng, feature_shape, s2_floor):
        """k-means++ seeds for the templates, then priors and variance from the nearest seed."""
        n, d = X.shape
        n_classes, n_nuisances = int(self.n_classes), int(self.n_nuisances)
        xsq = np.einsum("nd,nd->n", X, X)
        active = weights > 0
        unl = np.flatnonzero(active & (yidx < 0))
        seeds = [[] for _ in range(n_classes)]
        labeled_classes = np.unique(yidx[yidx >= 0]).tolist()

        if not labeled_classes:
            # unsupervised: n_classes class seeds, then n_nuisances seeds in each one's cell
            pool = np.flatnonzero(active)
            heads = _dsq_sample(X, pool, n_classes, rng)
            cell = np.argmin(_sqdist(X[pool], xsq[pool], X[heads]), axis=1)
            for c in range(n_classes):
                seeds[c] = _dsq_sample(X, pool[cell == c], n_nuisances, rng,
                                       start=[heads[c]], distinct=True)
                if len(seeds[c]) < n_nuisances:
                    seeds[c] = _dsq_sample(X, pool, n_nuisances, rng, start=seeds[c])
        else:
            lab_idx = np.flatnonzero(yidx >= 0)
            near = np.empty(unl.size, np.intp)  # class of each unlabeled sample's nearest label
            for sl in _chunks(unl.size, lab_idx.size):
                dist = _sqdist(X[unl[sl]], xsq[unl[sl]], X[lab_idx])
                near[sl] = yidx[lab_idx[np.argmin(dist, axis=1)]]
            for c in labeled_classes:
                own = np.flatnonzero(yidx == c)
                seeds[c] = _dsq_sample(X, own, n_nuisances, rng, distinct=True)
                if len(seeds[c]) < n_nuisances and unl.size:
                    cell = unl[near == c]
                    seeds[c] = _dsq_sample(X, cell if cell.size else unl, n_nuisances,
                                           rng, start=seeds[c], distinct=True)
                if len(seeds[c]) < n_nuisances:  # nothing new left: repeat (see re-seeding)
                    seeds[c] = _dsq_sample(X, own, n_nuisances, rng, start=seeds[c])
            chosen = [i for c in labeled_classes for i in seeds[c]]
            for c in range(n_classes):  # latent classes without labels, from the unlabeled
                if c in labeled_classes:
                    continue
                seeds[c] = _dsq_sample(X, unl, len(chosen) + n_nuisances, rng,
                                       start=chosen)[len(chosen):]
                chosen += seeds[c]
        mu = X[np.concatenate([np.asarray(s, np.intp) for s in seeds])].copy()

        # priors and variance from each sample's nearest allowed seed
        nearest_d2 = np.empty(n)
        nearest_class = np.empty(n, np.intp)
        for sl in _chunks(n, max(mu.shape[0], d)):
            dist = _sqdist(X[sl], xsq[sl], mu).reshape(-1, n_classes, n_nuisances).min(axis=2)
            lab = yidx[sl]
            labeled = lab >= 0
            own = dist[labeled, lab[labeled]]
            dist[labeled] = np.inf
            dist[labeled, lab[labeled]] = own
            nearest_class[sl] = np.argmin(dist, axis=1)
            nearest_d2[sl] = dist[np.arange(dist.shape[0]), nearest_class[sl]]
        pc = _floor_probs(np.bincount(nearest_class, weights=weights, minlength=n_classes)
                          / total)
        pg = np.full(n_nuisances, 1.0 / n_nuisances)
        pa = float(np.clip(weights @ (nearest_d2 < xsq) / total, 0.05, 0.95))
        s2 = float(weights @ np.minimum(nearest_d2, xsq)) / (total * d)
        if not s2 > 0:
            centred = X - (weights @ X) / total
            s2 = float(weights @ np.einsum("nd,nd->n", centred, centred)) / (total * d)
        if not s2 > 0:
            s2 = 1.0
        return _Params(mu, pc, pg, pa, max(s2 + self.reg, s2_floor), feature_shape)

    # ---------------------------------------------------------------- fitting

    def fit(self, X, y=None):
        """Fit the model by EM.

        Parameters
        ----------
        X : array (N, D) or (N, C, H, W)
        y : None (unsupervised), or array (N,) of labels with -1 marking unlabeled samples
            (semi-supervised; all labeled is supervised)

        Returns
        -------
        self
        """
        self._check_params()
        X = _as_samples(X)
        n = X.shape[0]
        feature_shape = tuple(X.shape[1:])
        X = X.reshape(n, -1)
        warm = bool(self.warm_start) and hasattr(self, "templates_")
        if warm:
            want = (self.n_classes, self.n_nuisances, *feature_shape)
            if tuple(self.templates_.shape) != want:
                raise ValueError(
                    f"warm_start=True but the fitted templates have shape "
                    f"{tuple(self.templates_.shape)}, not {want} (n_classes, n_nuisances and "
                    "the sample shape must stay the same); refit with warm_start=False"
                )
        classes, yidx = self._labels(y, n, warm)
        weights = np.where(yidx >= 0, 1.0, float(self.unlabeled_weight))
        total = float(weights.sum())
        if not total > 0:
            raise ValueError("unlabeled_weight=0 and no labeled samples: nothing to fit")

        scale = float(np.einsum("nd,nd->", X, X)) / X.size
        s2_floor = 1e-12 * scale if scale > 0 else 1e-12
        inference = self.inference
        max_iter, tol, verbose = int(self.max_iter), float(self.tol), int(self.verbose)

        rng = _check_random_state(self.random_state, "random_state")
        n_init = 1 if warm else int(self.n_init)
        best = None
        for init in range(n_init):
            if verbose:
                print(f"Initialization {init}")
            if warm:
                params = self._fitted_params()
            else:
                params = self._initialize(X, yidx, weights, total, rng, feature_shape, s2_floor)
            ell, acc = self._e_step(X, params, yidx, weights, inference, stats=max_iter > 0)
            objective = self._objective(ell, weights, total, params)
            bounds = []
            converged = False
            n_iter = 0
            for n_iter in range(1, max_iter + 1):
                tic = time.perf_counter()
                params = self._m_step(X, acc, ell, params, yidx, weights, total, s2_floor)
                ell, acc = self._e_step(X, params, yidx, weights, inference)
                new = self._objective(ell, weights, total, params)
                change = new - objective
                objective = new
                bounds.append(new)
                if verbose:
                    line = f"  Iteration {n_iter}\t objective {new:.6f}\t change {change:.3e}"
                    if verbose >= 2:
                        line += f"\t time {time.perf_counter() - tic:.3f} s"
                    print(line)
                if abs(change) < tol:
                    converged = True
                    break
            if verbose:
                print("Initialization converged." if converged
                      else "Initialization did not converge.")
            if best is None or objective > best[0]:
                best = (objective, params, bounds, n_iter, converged)

        objective, params, bounds, n_iter, converged = best
        self.classes_ = classes
        self.feature_shape_ = feature_shape
        self.n_features_in_ = X.shape[1]
        self.templates_ = params.mu.reshape(params.n_classes, params.n_nuisances,
                                            *feature_shape).copy()
        self.class_prior_ = params.pc.copy()
        self.nuisance_prior_ = params.pg.copy()
        self.switch_prior_ = float(params.pa)
        self.noise_variance_ = float(params.s2)
        self.lower_bound_ = objective
        self.lower_bounds_ = bounds
        self.n_iter_ = n_iter
        self.converged_ = converged
        if not converged and max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
            )
        return self

    # ---------------------------------------------------------------- persistence

    _SAVED_ARRAYS = ("templates_", "class_prior_", "nuisance_prior_", "classes_")

    def save(self, path):
        """Write the fitted model to ``path`` atomically (read it back with
        :func:`fastdrmm.load`); the format is :mod:`fastdrmm.io`'s."""
        check_is_fitted(self, "templates_")
        params = self.get_params()
        if not (params["random_state"] is None or isinstance(params["random_state"], int)):
            params["random_state"] = None
        arrays = {name.rstrip("_"): np.asarray(getattr(self, name))
                  for name in self._SAVED_ARRAYS}
        fitted = {"switch_prior": float(self.switch_prior_),
                  "noise_variance": float(self.noise_variance_),
                  "lower_bound": float(self.lower_bound_),
                  "lower_bounds": [float(b) for b in self.lower_bounds_],
                  "n_iter": int(self.n_iter_), "converged": bool(self.converged_),
                  "feature_shape": list(self.feature_shape_)}
        io.save_arrays(path, arrays, {"model_class": "RMM", "params": params,
                                      "fitted": fitted})

    @classmethod
    def _from_saved(cls, arrays, meta, path):
        try:
            model = cls(**meta["params"])
            model._check_params()
            fitted = meta["fitted"]
            for name in cls._SAVED_ARRAYS:
                setattr(model, name, np.array(arrays[name.rstrip("_")]))
            model.switch_prior_ = float(fitted["switch_prior"])
            model.noise_variance_ = float(fitted["noise_variance"])
            model.lower_bound_ = float(fitted["lower_bound"])
            model.lower_bounds_ = list(fitted["lower_bounds"])
            model.n_iter_ = int(fitted["n_iter"])
            model.converged_ = bool(fitted["converged"])
            model.feature_shape_ = tuple(fitted["feature_shape"])
            model.n_features_in_ = int(np.prod(model.feature_shape_))
            want = (model.n_classes, model.n_nuisances, *model.feature_shape_)
            if model.templates_.shape != want:
                raise ValueError(f"templates have shape {model.templates_.shape}, expected "
                                 f"{want}")
            model._fitted_params()  # every value checked (finite, probabilities)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid saved RMM: {exc}") from None
        return model

    def _fitted_params(self):
        """The fitted attributes in working form (floored, so that every log is finite)."""
        mu = np.asarray(self.templates_, np.float64)
        n_classes, n_nuisances = mu.shape[:2]
        mu = np.ascontiguousarray(mu.reshape(n_classes * n_nuisances, -1))
        if not np.isfinite(mu).all():
            raise ValueError("templates_ contains NaN or infinity")
        s2 = float(self.noise_variance_)
        if not (np.isfinite(s2) and s2 > 0):
            raise ValueError(f"noise_variance_ must be positive and finite, got {s2!r}")
        return _Params(mu, _valid_probs(self.class_prior_), _valid_probs(self.nuisance_prior_),
                       _clip_switch(self.switch_prior_), s2, self.feature_shape_)

    # ---------------------------------------------------------------- prediction

    def decision_function(self, X):
        """Per-class scores whose argmax is :meth:`predict` and softmax :meth:`predict_proba`.

        ``inference="soft"``: ``ln p(x, c)`` (sum-product over g and a); ``"hard"``:
        ``max_{g,a} ln p(x, c, g, a)`` (max-sum), which is, up to a per-sample constant,
        ``max_g [ReLU(<w[c,g], x> + b[c,g]) + ln pi_c + ln pi_g]``. Shape (N, n_classes); with
        two classes, as scikit-learn expects, the difference (N,) second minus first column.
        """
        X = self._check_X_fitted(X)
        scores = self._class_scores(X, self._fitted_params(), self.inference)
        if scores.shape[1] == 2:
            return scores[:, 1] - scores[:, 0]
        return scores

    def predict(self, X):
        """The most probable class label.

        ``inference="soft"``: ``argmax_c p(c | x)``. ``"hard"``: the max-sum rule of DESIGN.md
        section 1, ``argmax_c max_g [ReLU(<w[c,g], x> + b[c,g]) + ln pi_c + ln pi_g]`` with
        ``w = mu / sigma^2`` and ``b = -||mu||^2 / (2 sigma^2) + ln(pi_a / (1 - pi_a))``
        (the ReLU is :func:`fastdrmm.ops.match_switch_pool` with ``leak=0``). Ties go to the
        first class in ``classes_``.
        """
        X = self._check_X_fitted(X)
        scores = self._class_scores(X, self._fitted_params(), self.inference)
        return self.classes_[np.argmax(scores, axis=1)]

    def predict_proba(self, X):
        """Class probabilities (N, n_classes), columns in the order of ``classes_``.

        ``inference="soft"``: the posterior ``p(c | x)``. ``"hard"``: the softmax over c of the
        max-sum score ``max_{g,a} ln p(x, c, g, a)`` -- a max-sum analogue of the posterior
        (not the model's posterior) whose argmax is :meth:`predict`.
        """
        X = self._check_X_fitted(X)
        scores = self._class_scores(X, self._fitted_params(), self.inference)
        scores -= scores.max(axis=1, keepdims=True)
        proba = np.exp(scores)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def score_samples(self, X):
        """The log-likelihood ``ln p(x)`` of each sample (sum-product, for either inference)."""
        X = self._check_X_fitted(X)
        params = self._fitted_params()
        out = np.empty(X.shape[0])
        log_prior = params.log_prior
        for sl in _chunks(X.shape[0], max(log_prior.size, X.shape[1])):
            x = X[sl]
            base, _ = self._base(x, params)
            t = np.logaddexp(0.0, self._matches(x, params, 1.0)) + log_prior
            out[sl] = base + _logsumexp_rows(t)
        return out

    def score(self, X, y=None):
        """The mean log-likelihood ``mean_n ln p(x_n)``, as GaussianMixture's (y is ignored).

        Not the accuracy (ClassifierMixin's score): use ``np.mean(model.predict(X) == y)``.
        """
        return float(self.score_samples(X).mean())

    def sample(self, n_samples=1, random_state=None):
        """Draw samples from the fitted model.

        ``random_state=None`` uses the estimator's ``random_state`` (as GaussianMixture does).

        Returns
        -------
        X : ndarray (n_samples, *feature_shape_)
        y : ndarray (n_samples,), the class labels (from ``classes_``) of the samples
        """
        check_is_fitted(self, "templates_")
        n_samples = _check_int(n_samples, "n_samples", 1)
        if random_state is None:
            rng = _check_random_state(self.random_state, "random_state")
        else:
            rng = _check_random_state(random_state, "random_state")
        params = self._fitted_params()
        n_nuisances = params.n_nuisances
        c = rng.choice(params.n_classes, size=n_samples, p=params.pc)
        g = rng.choice(n_nuisances, size=n_samples, p=params.pg)
        a = rng.random_sample(n_samples) < params.pa
        X = rng.standard_normal((n_samples, params.mu.shape[1])) * np.sqrt(params.s2)
        X[a] += params.mu[c[a] * n_nuisances + g[a]]
        return X.reshape(n_samples, *params.feature_shape), self.classes_[c]


# --------------------------------------------------------------------------------------------
# helpers of the M-step and of the initialisation


def _reseed(mu, empty, X, ell, yidx, weights):
    """Move every empty template to the worst explained (lowest ``ell``) sample allowed for its
    class: a sample labeled with the class or an unlabeled one, of positive weight, each used
    once before any is reused."""
    order = np.argsort(ell, kind="stable")
    order = order[weights[order] > 0]
    used = np.zeros(X.shape[0], bool)
    n_nuisances = empty.shape[1]
    for c in np.flatnonzero(empty.any(axis=1)):
        cand = order[(yidx[order] == c) | (yidx[order] == -1)]
        if cand.size == 0:
            continue  # nothing to seed from: the template keeps its (finite) value
        picks = np.concatenate([cand[~used[cand]], cand])
        for j, g in enumerate(np.flatnonzero(empty[c])):
            i = picks[j % picks.size]
            used[i] = True
            mu[c * n_nuisances + g] = X[i]


def _lookup(classes, values):
    """(known mask, positions) of values among classes (-1 where unknown)."""
    index = {value: i for i, value in enumerate(classes.tolist())}
    pos = np.array([index.get(v, -1) for v in values.tolist()], np.intp)
    return pos >= 0, pos


def _sqdist(X, xsq, centers):
    """Squared distances (n, m), clipped at 0."""
    out = xsq[:, None] - 2.0 * (X @ centers.T) + np.einsum("md,md->m", centers, centers)[None]
    return np.maximum(out, 0.0)


def _dsq_sample(X, pool, n_total, rng, start=(), distinct=False):
    """k-means++ D^2 sampling from ``pool`` until there are ``n_total`` seeds (``start`` counts).

    Without ``start`` the first seed is uniform; each next one is drawn with probability
    proportional to its squared distance to the nearest seed so far. When every candidate sits
    on a seed, ``distinct=True`` stops early; otherwise seeds repeat (uniformly).
    """
    seeds = [int(i) for i in start]
    pool = np.asarray(pool, np.intp)
    if pool.size == 0 or len(seeds) >= n_total:
        return seeds
    candidates = X[pool]

    def dist_to(i):  # exact (0 on duplicates), unlike the expanded form
        diff = candidates - X[i]
        return np.einsum("nd,nd->n", diff, diff)

    if not seeds:
        seeds.append(int(pool[rng.randint(pool.size)]))
    d2 = dist_to(seeds[0])
    for i in seeds[1:]:
        d2 = np.minimum(d2, dist_to(i))
    while len(seeds) < n_total:
        total = d2.sum()
        if not total > 0:
            if distinct:
                break
            pick = rng.randint(pool.size)
        else:
            pick = int(np.searchsorted(np.cumsum(d2), rng.random_sample() * total,
                                       side="right"))
            pick = min(pick, pool.size - 1)
        seeds.append(int(pool[pick]))
        d2 = np.minimum(d2, dist_to(seeds[-1]))
    return seeds
