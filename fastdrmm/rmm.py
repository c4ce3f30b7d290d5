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

import math
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


def _check_magnitude(X, name="X"):
    """Refuse values whose squares overflow float64 in the model's sums.

    EM sums ``||x_n - mu_k||^2`` over samples (every template lies in the data's convex
    hull, so each term is at most ``4 D max|x|^2``): with ``4 N D max|x|^2`` finite, every
    squared distance, the noise variance and every M-step sum is finite. Beyond that the
    noise variance itself (about ``max|x|^2``) has no float64 value, so the model cannot be
    represented at that scale and X must be rescaled (the model is scale-equivariant: fitting
    ``X / s`` gives templates ``mu / s`` and noise variance ``sigma^2 / s^2``, with ``reg``
    scaled by ``1 / s^2``)."""
    largest = float(np.abs(X).max())
    limit = math.sqrt(np.finfo(np.float64).max / (4.0 * X.shape[0] * X[0].size))
    if largest > limit:
        raise ValueError(
            f"{name} holds values up to |x| = {largest:.3g}: their squares overflow float64 in "
            f"the model's sums (at most {limit:.3g} for {X.shape[0]} samples of "
            f"{X[0].size} features); rescale {name}, e.g. divide it by its largest value")


def _check_random_state(seed, name):
    try:
        return check_random_state(seed)
    except ValueError:
        raise ValueError(
            f"{name} must be None, an int or a numpy RandomState, got {seed!r}") from None


#: the Python types a label of an object array may have (NumPy scalars of these kinds too):
#: the types a saved model can give back exactly
_LABEL_TYPES = (str, bool, int, float)
_NUMPY_LABEL_KINDS = "biufU"


def _as_labels(y):
    """y as a 1-d-able array without losing any label's value.

    ``np.asarray`` turns a list of Python ints beyond int64 into float64 (2**64 - 1 becomes
    1.8446744073709552e19, another number); such lists are kept as object arrays instead."""
    arr = np.asarray(y)
    if not isinstance(y, np.ndarray) and arr.dtype.kind == "f" and arr.size:
        values = np.asarray(y, dtype=object).ravel().tolist()
        if any(isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)
               and float(v) != v for v in values):
            arr = np.asarray(y, dtype=object)
    return arr


def _check_object_label(value):
    """A label of an object array: a str, bool, int or finite float (or a NumPy scalar of
    those kinds), else a TypeError/ValueError showing it."""
    if isinstance(value, np.generic):
        usable = value.dtype.kind in _NUMPY_LABEL_KINDS
    else:
        usable = isinstance(value, _LABEL_TYPES)
    if not usable:
        raise TypeError(f"y holds the label {value!r:.80} of type {type(value).__name__}: "
                        "labels are ints, floats, strings or bools (None or -1 marks unlabeled)")
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        raise ValueError(f"y contains NaN or infinity ({value!r}); mark unlabeled samples "
                         "with -1 or None")


def _is_unlabeled_marker(value):
    """None, the string '-1', or a number equal to -1 (bools are labels, never markers)."""
    if value is None:
        return True
    if isinstance(value, (str, np.str_)):
        return value == "-1"
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (numbers.Number, np.number)):
        return value == -1
    return False


def _unlabeled_mask(y):
    """Entries marking an unlabeled sample: -1 (or the string '-1', or None in object arrays).

    The markers are recognised exactly: an unsigned array has no -1 (its largest value is a
    label like any other), and no value is ever cast to another type to be compared. Every
    other value is checked to be a usable label (finite; of a label type)."""
    kind = y.dtype.kind
    if kind == "u" or kind == "b":
        return np.zeros(y.shape, bool)
    if kind == "i":
        return y == -1
    if kind == "f":
        if not np.isfinite(y).all():
            bad = y[~np.isfinite(y)][0]
            raise ValueError(f"y contains NaN or infinity ({bad!r}): labels must be finite; "
                             "mark unlabeled samples with -1")
        return y == -1
    if kind == "U":
        return y == "-1"
    if kind == "S":
        return y == b"-1"
    if kind == "O":
        mask = np.fromiter((_is_unlabeled_marker(v) for v in y), bool, count=len(y))
        for value in y[~mask]:
            _check_object_label(value)
        return mask
    raise TypeError(f"y must hold class labels (numbers or strings), got dtype {y.dtype}")


def _latent_classes(seen, extra):
    """``seen`` (sorted distinct labels) followed by ``extra`` new labels for the latent
    classes: numbers after the largest label when they fit the labels' dtype exactly (else the
    smallest unused non-negative integers), strings ``latent<i>`` for other labels (of the
    labels' string or bytes dtype; in an object array for bools and objects). A new label
    never equals a seen one nor the unlabeled marker -1."""
    kind = seen.dtype.kind
    if kind in "iuf":
        taken = set(seen.tolist())
        largest = seen.max()
        top = (int(largest) if kind in "iu" else math.floor(float(largest))) + 1
        new = list(range(top, top + extra))
        if not _fit_exactly(new, seen.dtype, taken):
            new = []
            candidate = 0
            while len(new) < extra:
                if candidate not in taken:
                    new.append(candidate)
                candidate += 1
        dtype = seen.dtype if _fit_exactly(new, seen.dtype, taken) else (
            np.float64 if kind == "f" else np.int64)
        return np.concatenate([seen.astype(dtype), np.array(new, dtype)])
    # strings stay strings (bytes stay bytes) so that the labels keep their dtype
    encode = (lambda name: name.encode()) if kind == "S" else (lambda name: name)
    taken = set(seen.tolist())
    names, i = [], 0
    while len(names) < extra:
        if encode(f"latent{i}") not in taken:
            names.append(encode(f"latent{i}"))
        i += 1
    dtype = None if kind in "US" else object
    return np.array([*seen.tolist(), *names], dtype=dtype)


def _fit_exactly(values, dtype, taken):
    """Whether every one of the Python ints ``values`` is a value of ``dtype`` (no rounding,
    no wrapping) and none is in ``taken``."""
    if not values or any(v in taken for v in values):
        return not values
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return info.min <= min(values) and max(values) <= info.max
    with np.errstate(over="ignore"):
        cast = np.array(values, dtype=object).astype(dtype)
    return all(np.isfinite(c) and int(c) == v for c, v in zip(cast.tolist(), values))


# --------------------------------------------------------------------------------------------
# small numerical helpers


def _floor_probs(p):
    p = np.maximum(np.asarray(p, np.float64), PROB_FLOOR)
    return p / p.sum()


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
        classes beyond those are latent (unlabeled) classes learnt from unlabeled samples,
        labeled (in ``classes_``) by the next integers after the largest numeric label (the
        smallest unused non-negative ones where those do not fit the labels' dtype), else
        ``latent0``, ``latent1``, ...
    n_nuisances : int, default 1
        Templates per class (the nuisance variable's cardinality).
    inference : {"soft", "hard"}, default "soft"
        ``"soft"``: EM with sum-product responsibilities over every ``(c, g, a)``; the
        objective is the log-likelihood, which never decreases. ``"hard"``: max-sum
        (classification, zero-noise-limit) EM, each sample takes its single most probable
        ``(c, g, a)``; the objective is the mean maximal log-joint
        ``max_{c,g,a} ln p(x, c, g, a)``, which never decreases: its negative, the energy, never
        increases. Prediction follows the inference the model was fitted with
        (``inference_``; see :meth:`predict`): changing this parameter after a fit changes
        nothing until the next fit.
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
    inference_ : str, the ``inference`` of the fit, which prediction follows
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
        y = _as_labels(y)
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
        classes = _latent_classes(seen, extra)
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
        _check_finite_scores(out, X)
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
            Finite values whose squares the model's float64 sums can hold (``|x|`` below
            about ``sqrt(max_float / (4 N D))``, some ``1e150``), else a ValueError before
            any work: rescale such data (the model is scale-equivariant, see
            :func:`_check_magnitude`).
        y : None (unsupervised), or array (N,) of labels with -1 marking unlabeled samples
            (semi-supervised; all labeled is supervised). Labels are ints, floats, strings
            or bools (any of NumPy's integer, float, string or bool dtypes, or an object
            array of such values); ``-1`` (the int or float -1, the string ``"-1"``) and, in
            object arrays, ``None`` mark unlabeled samples, recognised exactly: an unsigned
            array has no ``-1`` (its largest value is a label). A list of Python ints beyond
            int64 keeps its exact values (as an object array).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            Besides bad arguments: when fitting ends with parameters that are not all finite
            (it never stores such a state; the previous fitted state, if any, is kept).
        """
        self._check_params()
        X = _as_samples(X)
        n = X.shape[0]
        feature_shape = tuple(X.shape[1:])
        X = X.reshape(n, -1)
        _check_magnitude(X)
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
        _check_fitted_values(params, objective, bounds)
        # every fitted attribute is set here, after the checks: a failed fit changes nothing
        self.classes_ = classes
        self.feature_shape_ = feature_shape
        self.n_features_in_ = X.shape[1]
        self.templates_ = params.mu.reshape(params.n_classes, params.n_nuisances,
                                            *feature_shape).copy()
        self.class_prior_ = params.pc.copy()
        self.nuisance_prior_ = params.pg.copy()
        self.switch_prior_ = float(params.pa)
        self.noise_variance_ = float(params.s2)
        self.inference_ = inference
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
    _FITTED_FIELDS = ("switch_prior", "noise_variance", "lower_bound", "lower_bounds",
                      "n_iter", "converged", "feature_shape", "inference", "classes")

    def save(self, path):
        """Write the fitted model to ``path`` atomically (read it back with
        :func:`fastdrmm.load`); the format is :mod:`fastdrmm.io`'s.

        Labels of a NumPy numeric, bool or string dtype are stored as the array ``classes``;
        labels of an object array (str, int, float, bool, NumPy scalars: the labels ``fit``
        accepts) as JSON values with a type tag each (``metadata['fitted']['classes']``), so
        that the loaded ``classes_`` holds the same values of the same types, without pickle.
        Parameters that :func:`fastdrmm.load` would refuse (set by ``set_params`` after the fit)
        are a ValueError/TypeError naming them, before anything is written.
        """
        check_is_fitted(self, "templates_")
        self._check_params()  # a file is never written that load would refuse
        self._fitted_params()
        params = self.get_params()
        if not (params["random_state"] is None or _is_int(params["random_state"])):
            params["random_state"] = None
        arrays = {name.rstrip("_"): np.asarray(getattr(self, name))
                  for name in self._SAVED_ARRAYS}
        classes = arrays.pop("classes")
        if classes.dtype.kind in _NATIVE_CLASS_KINDS:
            arrays["classes"] = classes
            class_entry = {"encoding": "array"}
        else:
            class_entry = _encode_object_classes(classes)
        fitted = {"switch_prior": float(self.switch_prior_),
                  "noise_variance": float(self.noise_variance_),
                  "lower_bound": float(self.lower_bound_),
                  "lower_bounds": [float(b) for b in self.lower_bounds_],
                  "n_iter": int(self.n_iter_), "converged": bool(self.converged_),
                  "feature_shape": [int(d) for d in self.feature_shape_],
                  "inference": self._fitted_inference(), "classes": class_entry}
        io.save_arrays(path, arrays, {"model_class": "RMM", "params": params,
                                      "fitted": fitted})

    @classmethod
    def _from_saved(cls, arrays, meta, path):
        """The model of a checked file, every value validated after its cast to the working
        dtype (finite; probabilities in (0, 1] summing to 1; the fitted arrays' shapes
        consistent with each other and with the feature shape; every metadata field present
        and of its type); anything else is a ValueError naming ``path`` and the field."""
        try:
            return cls._build_saved(arrays, meta)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid saved RMM: {exc}") from None

    @classmethod
    def _build_saved(cls, arrays, meta):
        _check_keys(meta, ("model_class", "params", "fitted"), (), "metadata")
        params = _require(meta, "params", dict, "metadata")
        names = cls._get_param_names()
        _check_keys(params, names, (), "metadata['params']")
        model = cls(**params)
        try:
            model._check_params()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata['params']: {exc}") from None
        seed = params["random_state"]
        if seed is not None and not _is_int(seed):
            raise ValueError(f"metadata['params']['random_state'] must be null or an int, got "
                             f"{seed!r:.80}")
        where = "metadata['fitted']"
        fitted = _require(meta, "fitted", dict, "metadata")
        # "inference" and "classes" are absent from files of earlier versions
        _check_keys(fitted, cls._FITTED_FIELDS[:7], cls._FITTED_FIELDS[7:], where)
        feature_shape = _require(fitted, "feature_shape", list, where)
        if len(feature_shape) not in (1, 3) or not all(
                _is_int(d) and d >= 1 for d in feature_shape):
            raise ValueError(f"{where}['feature_shape'] must be 1 or 3 positive ints, got "
                             f"{feature_shape!r:.100}")
        inference = fitted.get("inference", params["inference"])
        if inference not in ("soft", "hard"):
            raise ValueError(f"{where}['inference'] must be 'soft' or 'hard', got "
                             f"{inference!r:.80}")
        n_iter = _require(fitted, "n_iter", int, where)
        lower_bounds = _require(fitted, "lower_bounds", list, where)
        if n_iter < 0 or len(lower_bounds) != n_iter:
            raise ValueError(f"{where}: n_iter={n_iter} with {len(lower_bounds)} lower_bounds "
                             "(one per EM iteration)")
        bounds = [_finite_real(fitted["lower_bounds"], i, f"{where}['lower_bounds']")
                  for i in range(n_iter)]
        class_entry = fitted.get("classes", {"encoding": "array"})
        expected = ["templates", "class_prior", "nuisance_prior"]
        if isinstance(class_entry, dict) and class_entry.get("encoding") == "array":
            expected.append("classes")
        if sorted(arrays) != sorted(expected):
            raise ValueError(f"the file holds the arrays {sorted(arrays)}, expected "
                             f"{sorted(expected)}")
        model.templates_ = _float_array(arrays, "templates")
        model.class_prior_ = _float_array(arrays, "class_prior")
        model.nuisance_prior_ = _float_array(arrays, "nuisance_prior")
        model.switch_prior_ = _finite_real(fitted, "switch_prior", where)
        model.noise_variance_ = _finite_real(fitted, "noise_variance", where)
        model.feature_shape_ = tuple(int(d) for d in feature_shape)
        model.n_features_in_ = math.prod(model.feature_shape_)
        # the fitted shapes are the templates' (the parameters n_classes and n_nuisances may
        # have been changed by set_params after the fit: they shape the next fit only)
        if model.templates_.ndim != 2 + len(feature_shape) or \
                model.templates_.shape[2:] != model.feature_shape_:
            raise ValueError(f"arrays['templates'] has shape {model.templates_.shape}, expected "
                             f"(n_classes, n_nuisances, *{model.feature_shape_}) "
                             "(metadata['fitted']['feature_shape'])")
        n_classes = model.templates_.shape[0]
        model._fitted_params()  # every value checked (finite, probabilities, shapes)
        model.classes_ = _decode_classes(class_entry, arrays.get("classes"), n_classes,
                                         f"{where}['classes']")
        model.inference_ = inference
        model.lower_bound_ = _finite_real(fitted, "lower_bound", where)
        model.lower_bounds_ = bounds
        model.n_iter_ = n_iter
        model.converged_ = _require(fitted, "converged", bool, where)
        return model

    def _fitted_params(self):
        """The fitted attributes in working form, every value checked: finite templates of the
        fitted shape, priors in (0, 1] that sum to 1 (within ``_SUM_TOLERANCE``; renormalised
        exactly), a switch prior in (0, 1), a positive finite noise variance, and finite
        weights ``mu / sigma^2`` and biases ``||mu||^2 / (2 sigma^2)``. A ValueError names the
        attribute otherwise."""
        feature_shape = tuple(self.feature_shape_)
        mu = np.asarray(self.templates_, np.float64)
        if mu.ndim != 2 + len(feature_shape) or mu.shape[2:] != feature_shape:
            raise ValueError(f"templates_ has shape {mu.shape}, expected (n_classes, "
                             f"n_nuisances, *{feature_shape})")
        n_classes, n_nuisances = mu.shape[:2]
        mu = np.ascontiguousarray(mu.reshape(n_classes * n_nuisances, -1))
        if not np.isfinite(mu).all():
            raise ValueError("templates_ contains NaN or infinity")
        pc = _checked_distribution(self.class_prior_, n_classes, "class_prior_")
        pg = _checked_distribution(self.nuisance_prior_, n_nuisances, "nuisance_prior_")
        pa = _checked_real(self.switch_prior_, "switch_prior_")
        if not 0.0 < pa < 1.0:
            raise ValueError(f"switch_prior_ must be in (0, 1), got {pa!r}")
        s2 = _checked_real(self.noise_variance_, "noise_variance_")
        if not s2 > 0:
            raise ValueError(f"noise_variance_ must be positive and finite, got {s2!r}")
        with np.errstate(over="ignore", invalid="ignore"):
            bias = np.einsum("kd,kd->k", mu, mu) / (2.0 * s2)
            weight = np.abs(mu).max() / s2
        if not (np.isfinite(bias).all() and np.isfinite(weight)):
            raise ValueError(f"templates_ (max |mu| = {np.abs(mu).max():.3g}) and "
                             f"noise_variance_ ({s2:.3g}) give infinite match weights or biases")
        return _Params(mu, pc, pg, _clip_switch(pa), s2, feature_shape)

    def _fitted_inference(self):
        # models fitted (and pickled) before ``inference_`` existed predicted with the
        # ``inference`` parameter they were fitted with
        return getattr(self, "inference_", self.inference)

    # ---------------------------------------------------------------- prediction

    def decision_function(self, X):
        """Per-class scores whose argmax is :meth:`predict` and softmax :meth:`predict_proba`.

        With ``inference_ = "soft"``: ``ln p(x, c)`` (sum-product over g and a); ``"hard"``:
        ``max_{g,a} ln p(x, c, g, a)`` (max-sum), which is, up to a per-sample constant,
        ``max_g [ReLU(<w[c,g], x> + b[c,g]) + ln pi_c + ln pi_g]``. Shape (N, n_classes); with
        two classes, as scikit-learn expects, the difference (N,) second minus first column.
        """
        X = self._check_X_fitted(X)
        scores = self._class_scores(X, self._fitted_params(), self._fitted_inference())
        if scores.shape[1] == 2:
            return scores[:, 1] - scores[:, 0]
        return scores

    def predict(self, X):
        """The most probable class label.

        ``inference_`` (the fit's inference) ``"soft"``: ``argmax_c p(c | x)``. ``"hard"``:
        the max-sum rule of DESIGN.md section 1,
        ``argmax_c max_g [ReLU(<w[c,g], x> + b[c,g]) + ln pi_c + ln pi_g]`` with
        ``w = mu / sigma^2`` and ``b = -||mu||^2 / (2 sigma^2) + ln(pi_a / (1 - pi_a))``
        (the ReLU is :func:`fastdrmm.ops.match_switch_pool` with ``leak=0``). Ties go to the
        first class in ``classes_``. Inputs so far from the model's scale that their
        log-probabilities overflow float64 are a ValueError (never NaN probabilities), in
        every prediction method.
        """
        X = self._check_X_fitted(X)
        scores = self._class_scores(X, self._fitted_params(), self._fitted_inference())
        return self.classes_[np.argmax(scores, axis=1)]

    def predict_proba(self, X):
        """Class probabilities (N, n_classes), columns in the order of ``classes_``.

        ``inference_ = "soft"``: the posterior ``p(c | x)``. ``"hard"``: the softmax over c of
        the max-sum score ``max_{g,a} ln p(x, c, g, a)`` -- a max-sum analogue of the posterior
        (not the model's posterior) whose argmax is :meth:`predict`.
        """
        X = self._check_X_fitted(X)
        scores = self._class_scores(X, self._fitted_params(), self._fitted_inference())
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
        _check_finite_scores(out, X)
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
# checks of fitted and saved values


#: a distribution's entries may sum to 1 within this (relative to 1) to be a distribution
_SUM_TOLERANCE = 1e-6
#: class labels stored as an array as they are; others (object arrays) as tagged JSON values
_NATIVE_CLASS_KINDS = "biufUS"


def _check_finite_scores(scores, X):
    """Log-probabilities of inputs far beyond the model's scale overflow (-inf, or NaN where
    infinities cancel): refuse them rather than return NaN probabilities."""
    if not np.isfinite(scores).all():
        rows = ~np.isfinite(scores).reshape(scores.shape[0], -1).all(axis=1)
        largest = float(np.abs(X[rows]).max())
        raise ValueError(
            f"X holds {int(rows.sum())} sample(s) (values up to |x| = {largest:.3g}) so far "
            "from the fitted model's scale that their log-probabilities overflow float64")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_real(value, name):
    """A finite real number as a float, else a ValueError/TypeError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {value!r:.80}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _checked_distribution(p, size, name):
    """A 1-d probability vector of ``size`` entries in (0, 1] summing to 1, as float64 (cast
    first, then checked), renormalised exactly."""
    p = np.asarray(p)
    if p.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if p.shape != (size,):
        raise ValueError(f"{name} has shape {p.shape}, expected ({size},)")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or infinity")
    if not (p.min() > 0 and p.max() <= 1):
        raise ValueError(f"{name} must hold probabilities in (0, 1], got values in "
                         f"[{p.min()!r}, {p.max()!r}]")
    total = float(p.sum())
    if not abs(total - 1.0) <= _SUM_TOLERANCE:
        raise ValueError(f"{name} must sum to 1, sums to {total!r}")
    return p / total


def _check_fitted_values(params, objective, bounds):
    """The state a fit is about to store: every parameter finite and valid, else ValueError
    (reached only when the data's scale, or ``reg``, is beyond float64's range)."""
    problems = []
    if not np.isfinite(params.mu).all():
        problems.append("templates")
    if not (np.isfinite(params.s2) and params.s2 > 0):
        problems.append(f"noise variance {params.s2!r}")
    for name, p in (("class prior", params.pc), ("nuisance prior", params.pg)):
        if not (np.isfinite(p).all() and p.min() > 0):
            problems.append(name)
    if not 0.0 < params.pa < 1.0:
        problems.append(f"switch prior {params.pa!r}")
    if not (np.isfinite(objective) and np.isfinite(bounds).all()):
        problems.append("objective")
    if problems:
        raise ValueError(
            f"fitting produced non-finite parameters ({', '.join(problems)}): the data's scale "
            "or reg is beyond float64's range; rescale X or lower reg")


def _require(mapping, key, kind, where):
    """``mapping[key]`` of JSON type ``kind`` (int excludes bool), else a ValueError naming
    ``where[key]``."""
    if key not in mapping:
        raise ValueError(f"{where} has no field {key!r}")
    value = mapping[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise ValueError(f"{where}[{key!r}] must be a {kind.__name__}, got "
                         f"{type(value).__name__} {value!r:.80}")
    return value


def _check_keys(mapping, required, optional, where):
    """``mapping`` a dict holding every ``required`` key and no key outside ``optional``."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(mapping).__name__}")
    missing = [k for k in required if k not in mapping]
    unknown = [k for k in mapping if k not in required and k not in optional]
    if missing or unknown:
        raise ValueError(f"{where}: missing fields {missing}, unknown fields "
                         f"{[str(k)[:40] for k in unknown[:10]]}")


def _finite_real(mapping, key, where):
    """``mapping[key]`` a finite JSON number (not a bool), as a float."""
    try:
        value = mapping[key]
    except (KeyError, IndexError):
        raise ValueError(f"{where} has no field {key!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}[{key!r}] must be a number, got {type(value).__name__} "
                         f"{value!r:.80}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"{where}[{key!r}] must be finite, got {mapping[key]!r:.80}")
    return value


def _float_array(arrays, name):
    """A saved real array as float64, cast first, then checked finite."""
    arr = arrays[name]
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"arrays[{name!r}] must be real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):
        out = arr.astype(np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"arrays[{name!r}] holds NaN or infinity (as float64)")
    return out


def _label_entry(value):
    """(type tag, JSON value) of one label of an object array."""
    if isinstance(value, np.generic):
        if value.dtype.kind not in _NUMPY_LABEL_KINDS:
            raise TypeError(f"classes_ holds {value!r:.80} of dtype {value.dtype}, which cannot "
                            "be saved")
        return "numpy:" + value.dtype.str, value.item()
    for tag, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, kind):
            return tag, kind(value)
    raise TypeError(f"classes_ holds {value!r:.80} of type {type(value).__name__}, which "
                    "cannot be saved (labels are ints, floats, strings or bools)")


def _encode_object_classes(classes):
    entries = [_label_entry(v) for v in classes.tolist()]
    return {"encoding": "values", "types": [t for t, _ in entries],
            "values": [v for _, v in entries]}


def _label_value(tag, value, where):
    """The label of one saved (type tag, JSON value) pair, checked."""
    if tag in ("bool", "int", "float", "str"):
        kind = {"bool": "b", "int": "i", "float": "f", "str": "U"}[tag]
        make = {"bool": bool, "int": int, "float": float, "str": str}[tag]
    elif isinstance(tag, str) and tag.startswith("numpy:"):
        try:
            dtype = np.dtype(tag[6:])
        except (TypeError, ValueError, SyntaxError):
            dtype = None
        if dtype is None or dtype.str != tag[6:] or dtype.kind not in _NUMPY_LABEL_KINDS:
            raise ValueError(f"{where}: unknown label type {tag!r:.80}")
        kind, make = dtype.kind, dtype.type
    else:
        raise ValueError(f"{where}: unknown label type {tag!r:.80}")
    expected = {"b": bool, "i": int, "u": int, "f": (int, float), "U": str}[kind]
    if not isinstance(value, expected) or (kind != "b" and isinstance(value, bool)):
        raise ValueError(f"{where}: a {tag} label cannot be {value!r:.80}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            label = make(value)
    except (OverflowError, ValueError, RuntimeWarning):
        raise ValueError(f"{where}: {value!r:.80} is not a {tag} value") from None
    if kind == "f" and not math.isfinite(label):
        raise ValueError(f"{where}: label {value!r:.80} is not finite")
    if kind in "iu" and int(label) != value:
        raise ValueError(f"{where}: {value!r:.80} is not a {tag} value")
    return label


def _decode_classes(entry, array, n_classes, where):
    """``classes_`` of a saved model: the array, or the tagged values, checked (n_classes
    distinct finite labels)."""
    if not isinstance(entry, dict) or entry.get("encoding") not in ("array", "values"):
        raise ValueError(f"{where} must be {{'encoding': 'array'}} or "
                         f"{{'encoding': 'values', 'types': [...], 'values': [...]}}")
    if entry["encoding"] == "array":
        _check_keys(entry, ("encoding",), (), where)
        classes = array
        if classes.dtype.kind not in _NATIVE_CLASS_KINDS:
            raise ValueError(f"arrays['classes'] has dtype {classes.dtype}")
        if classes.shape != (n_classes,):
            raise ValueError(f"arrays['classes'] has shape {classes.shape}, expected "
                             f"({n_classes},)")
        if classes.dtype.kind == "f" and not np.isfinite(classes).all():
            raise ValueError("arrays['classes'] holds NaN or infinity")
        if np.unique(classes).size != n_classes:
            raise ValueError("arrays['classes'] holds repeated labels")
        return classes
    _check_keys(entry, ("encoding", "types", "values"), (), where)
    types, values = entry["types"], entry["values"]
    if not (isinstance(types, list) and isinstance(values, list)
            and len(types) == len(values) == n_classes):
        raise ValueError(f"{where}: 'types' and 'values' must be lists of n_classes="
                         f"{n_classes} entries")
    labels = [_label_value(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(types, values))]
    if len(set(labels)) != n_classes:
        raise ValueError(f"{where} holds repeated labels")
    classes = np.empty(n_classes, dtype=object)
    for i, label in enumerate(labels):
        classes[i] = label
    return classes


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
