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

Layout: this module is the estimator (parameters, fit, prediction, sampling, save/load);
the EM steps and loop are in :mod:`fastdrmm._rmm_em`, the initialisation in
:mod:`fastdrmm._rmm_init`, the labels in :mod:`fastdrmm._rmm_labels` and the fitted state's
checks and saved form in :mod:`fastdrmm._rmm_saved`.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _rmm_em as em
from . import _rmm_saved as saved
from . import io
from ._inputs import (NON_NEGATIVE, RANDOM_STATE, BackendName, Count, check_magnitude,
                      check_random_state, check_samples)
from ._progress import say
from ._rmm_init import initialize
from ._rmm_labels import class_indices
from ._validation import check_int as _check_int

__all__ = ["RMM"]

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
        with it, EM is exactly monotone. (An absolute floor on the variance, as
        GaussianMixture's ``reg_covar``; not the DRMM's ``ridge``, which is a relative
        Tikhonov penalty on the templates' normal equations: the two names differ because the
        two settings do.)
    unlabeled_weight : float, default 1.0
        The EM-lambda of Nigam et al. (2000): unlabeled samples' responsibilities are scaled by
        it in the M-step, i.e. the objective is ``sum_labeled ln p(x, y) + lambda *
        sum_unlabeled ln p(x)`` (divided by the total weight ``W = n_labeled + lambda *
        n_unlabeled``).
    random_state : None, int >= 0, RandomState or Generator
        Seeds the k-means++ initialisation (and :meth:`sample` when called without one),
        through NumPy's ``RandomState`` as scikit-learn seeds it (a Generator, or an int of
        2**32 or more, seeds one from :func:`fastdrmm._inputs.seed_of`).
    warm_start : bool, default False
        Start :meth:`fit` from the current parameters (then ``n_init`` is ignored).
    verbose : int, default 0
        1 writes the objective every iteration, 2 adds the time per iteration (the DRMM's
        way: through tqdm when it is installed, else printed; see :mod:`fastdrmm._progress`).
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

    #: every parameter's valid values (scikit-learn's declarative validation, checked by
    #: ``_validate_params`` before a fit or a save and when a file is loaded)
    _parameter_constraints = {
        "n_classes": [Count(1)],
        "n_nuisances": [Count(1)],
        "inference": [StrOptions({"soft", "hard"})],
        "max_iter": [Count(0)],
        "tol": [NON_NEGATIVE],
        "n_init": [Count(1)],
        "reg": [NON_NEGATIVE],
        "unlabeled_weight": [NON_NEGATIVE],
        "random_state": RANDOM_STATE,
        "warm_start": [bool, np.bool_],
        "verbose": [Count(0)],
        "backend": [BackendName()],
    }

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

    # ---------------------------------------------------------------- inputs

    def _check_X_fitted(self, X):
        """X at predict time -> float64 (N, D); flat (N, D) input is accepted for images."""
        check_is_fitted(self, "templates_")
        arr = check_samples(X)
        shape = tuple(self.feature_shape_)
        if arr.shape[1:] != shape and not (arr.ndim == 2 and arr.shape[1] == self.n_features_in_):
            raise ValueError(
                f"X has samples of shape {arr.shape[1:]} but the model was fitted on samples "
                f"of shape {shape}"
            )
        return arr.reshape(arr.shape[0], -1)

    def _training_data(self, X, y, warm):
        """(classes_, em.Data, feature_shape) of a fit on X, y."""
        X = check_samples(X)
        n = X.shape[0]
        feature_shape = tuple(X.shape[1:])
        X = X.reshape(n, -1)
        check_magnitude(X)
        if warm:
            want = (self.n_classes, self.n_nuisances, *feature_shape)
            if tuple(self.templates_.shape) != want:
                raise ValueError(
                    f"warm_start=True but the fitted templates have shape "
                    f"{tuple(self.templates_.shape)}, not {want} (n_classes, n_nuisances and "
                    "the sample shape must stay the same); refit with warm_start=False"
                )
        classes, yidx = class_indices(y, n, self.n_classes, self.unlabeled_weight,
                                      self.classes_ if warm else None)
        weights = np.where(yidx >= 0, 1.0, float(self.unlabeled_weight))
        total = float(weights.sum())
        if not total > 0:
            raise ValueError("unlabeled_weight=0 and no labeled samples: nothing to fit")
        scale = float(np.einsum("nd,nd->", X, X)) / X.size
        s2_floor = 1e-12 * scale if scale > 0 else 1e-12
        return classes, em.Data(X, yidx, weights, total, s2_floor), feature_shape

    # ---------------------------------------------------------------- fitting

    def fit(self, X, y=None):
        """Fit the model by EM.

        Parameters
        ----------
        X : array (N, D) or (N, C, H, W)
            Finite values whose squares the model's float64 sums can hold (``|x|`` below
            about ``sqrt(max_float / (4 N D))``, some ``1e150``), else a ValueError before
            any work: rescale such data (the model is scale-equivariant, see
            :func:`fastdrmm._inputs.check_magnitude`).
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
        self._validate_params()
        warm = bool(self.warm_start) and hasattr(self, "templates_")
        classes, data, feature_shape = self._training_data(X, y, warm)
        settings = em.Settings(self.inference, self.reg, self.backend)
        max_iter, tol, verbose = int(self.max_iter), float(self.tol), int(self.verbose)

        rng = check_random_state(self.random_state)
        best = None
        for init in range(1 if warm else int(self.n_init)):
            say(f"Initialization {init}", verbose)
            if warm:
                params = self._fitted_params()
            else:
                params = initialize(data, int(self.n_classes), int(self.n_nuisances),
                                    settings.reg, rng, feature_shape)
            result = em.run(data, params, settings, max_iter, tol, verbose)
            if best is None or result.objective > best.objective:
                best = result

        objective, params, bounds, n_iter, converged = best
        saved.check_fitted_values(params, objective, bounds)
        # every fitted attribute is set here, after the checks: a failed fit changes nothing
        self.classes_ = classes
        self.feature_shape_ = feature_shape
        self.n_features_in_ = data.X.shape[1]
        self.templates_ = params.mu.reshape(params.n_classes, params.n_nuisances,
                                            *feature_shape).copy()
        self.class_prior_ = params.pc.copy()
        self.nuisance_prior_ = params.pg.copy()
        self.switch_prior_ = float(params.pa)
        self.noise_variance_ = float(params.s2)
        self.inference_ = settings.inference
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

    def save(self, path):
        """Write the fitted model to ``path`` atomically (read it back with
        :func:`fastdrmm.load`); the format is :mod:`fastdrmm.io`'s (see
        :mod:`fastdrmm._rmm_saved`).

        Labels of a NumPy numeric, bool or string dtype are stored as the array ``classes``;
        labels of an object array (str, int, float, bool, NumPy scalars: the labels ``fit``
        accepts) as JSON values with a type tag each (``metadata['fitted']['classes']``), so
        that the loaded ``classes_`` holds the same values of the same types, without pickle.
        Parameters that :func:`fastdrmm.load` would refuse (set by ``set_params`` after the fit)
        are a ValueError/TypeError naming them, before anything is written.
        """
        check_is_fitted(self, "templates_")
        self._validate_params()  # a file is never written that load would refuse
        arrays, metadata = saved.saved_contents(self, self.get_params())
        io.save_arrays(path, arrays, metadata)

    @classmethod
    def _from_saved(cls, arrays, meta, path):
        """The model of a checked file, every value validated after its cast to the working
        dtype (finite; probabilities in (0, 1] summing to 1; the fitted arrays' shapes
        consistent with each other and with the feature shape; every metadata field present
        and of its type); anything else is a ValueError naming ``path`` and the field."""
        try:
            model = cls(**saved.read_params(meta, cls._get_param_names()))
            try:
                model._validate_params()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"the field 'params': {exc}") from None
            return saved.read_fitted(model, arrays, meta)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid saved RMM: {exc}") from None

    def _fitted_params(self):
        """The fitted attributes in working form, every value checked (a ValueError names the
        attribute otherwise): see :func:`fastdrmm._rmm_saved.fitted_params`."""
        return saved.fitted_params(self)

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
        scores = em.class_scores(X, self._fitted_params(), self._fitted_inference(),
                                 self.backend)
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
        scores = em.class_scores(X, self._fitted_params(), self._fitted_inference(),
                                 self.backend)
        return self.classes_[np.argmax(scores, axis=1)]

    def predict_proba(self, X):
        """Class probabilities (N, n_classes), columns in the order of ``classes_``.

        ``inference_ = "soft"``: the posterior ``p(c | x)``. ``"hard"``: the softmax over c of
        the max-sum score ``max_{g,a} ln p(x, c, g, a)`` -- a max-sum analogue of the posterior
        (not the model's posterior) whose argmax is :meth:`predict`.
        """
        X = self._check_X_fitted(X)
        scores = em.class_scores(X, self._fitted_params(), self._fitted_inference(),
                                 self.backend)
        scores -= scores.max(axis=1, keepdims=True)
        proba = np.exp(scores)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def score_samples(self, X):
        """The log-likelihood ``ln p(x)`` of each sample (sum-product, for either inference)."""
        X = self._check_X_fitted(X)
        return em.log_likelihood(X, self._fitted_params(), self.backend)

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
        rng = check_random_state(self.random_state if random_state is None else random_state)
        params = self._fitted_params()
        n_nuisances = params.n_nuisances
        c = rng.choice(params.n_classes, size=n_samples, p=params.pc)
        g = rng.choice(n_nuisances, size=n_samples, p=params.pg)
        a = rng.random_sample(n_samples) < params.pa
        X = rng.standard_normal((n_samples, params.mu.shape[1])) * np.sqrt(params.s2)
        X[a] += params.mu[c[a] * n_nuisances + g[a]]
        return X.reshape(n_samples, *params.feature_shape), self.classes_[c]
