"""The Deep Rendering Mixture Model (DESIGN.md section 1) as a scikit-learn style estimator.

Model
-----
A class ``c ~ Cat(pi_c)`` picks a class template ``mu[c]`` (K_L numbers), placed on every
position of the top layer's plane (the adjoint of the global average pooling that reads it).
Each layer l = L..1 renders its code ``r[l]`` into the finer ``r[l-1]``::

    r[l-1] = render(r[l], idx[l], W[l], switches=a[l])       (fastdrmm.ops.render)

with per-unit nuisances: the switch ``a ~ Bernoulli(pi_a[l][k])`` (is the unit rendered at
all) and the translation ``t ~ Cat(pi_t[l])`` inside the pooling window (``idx`` is the chosen
position). The image is ``x = r[0] + noise``.

Inference (max-sum, bottom-up) is the convolutional network's forward pass (EG trains
these ``W`` and ``b`` directly, as a network's weights)::

    h[0] = x;  h[l], idx[l] = match_switch_pool(h[l-1], W[l], b[l])   (switch a = 1[h > 0])
    f = mean of h[L] over its plane;   score_c = class_scale * <mu[c], f> + beta[c]

and the top-down pass renders from the chosen class with the latents it recorded.

Hard EM (``algorithm="em"``)
----------------------------
EM reads the codes as amplitudes: layer l matches with ``W[l][k] / ||W[l][k]||^2`` (the
match of a patch ``a * W[l][k]`` is ``a``), so every code keeps the units of the code it
renders. With ``bias="generative"`` the M-step sets ``b[l][k] = -1/2 + s2_l ln(pa/(1-pa)) /
||W[l][k]||^2``: the switch's log-odds ``<W, p>/s2 - ||W||^2/(2 s2) + ln(pa/(1-pa))`` of the
generative model times the positive factor ``s2 / ||W[l][k]||^2``, so every switch and argmax
is the generative model's. ``bias="fixed"`` keeps the biases as they are.

The top of an EM model is a class-conditional Gaussian over the top feature with one
shared, shrunk covariance, ``f | c ~ N(mu_c, Sigma)`` (:mod:`fastdrmm._top`: scikit-learn's
linear discriminant estimate, shrinkage chosen by Ledoit-Wolf, OAS or fixed by
``shrinkage``), fitted after every M-step to the bottom-up features of every training
sample: the class score ``<Sigma^-1 mu_c, f> - 1/2 mu_c^T Sigma^-1 mu_c + ln pi_c`` (entries
``class_weights`` and ``beta``) is the class log-posterior up to a constant and linear in f,
so inference stays the network's forward pass. (The isotropic top it replaces, one noise
variance for every entry of f, threw away the correlated within-class variation that the
nuisances leave in the top code.) The bottom-up feature overshoots the coherent top code
that renders the layers below by a factor per feature; ``mu`` and ``top_covariance`` are
stored in the coherent code's units (scaled by the E-step's least-squares factor), so that
``reconstruct`` renders class templates and ``sample`` draws top codes at the data's scale,
while ``class_weights`` and ``beta`` read the bottom-up feature.

E-step: bottom-up inference records every latent (switches, argmax positions, the codes
h[l]); labeled samples take their label, unlabeled ones the best-scoring class (weighing
``unlabeled_weight``, and nothing where ``confidence_threshold`` > 0 and that class's
posterior is below it). Given those latents, ``amplitude_steps`` projected-gradient steps
refine the codes so that each renders the layer below in the least-squares sense, non-
negative (:mod:`fastdrmm._amplitudes`): the bottom-up amplitudes, matched under many
overlapping patches, overshoot. M-step, in
closed form (:mod:`fastdrmm._em` writes the objective out): the templates of layer 1 by
least squares of the *image* on the layer's code, ``render(h[1], idx[1], W, switches=a[1])
~ x`` (``W = solve(G + ridge I, B)``, ``B, G`` from :func:`fastdrmm.ops.template_stats`); those
of a deeper layer l the same way against the *bottom-up code* of the layer below,
``render(h[l], ...) ~ h[l-1]``; the noise variances from the residuals; the class templates
as the class means of ``f``; the class, switch and translation priors as the frequencies of
the E-step's choices. Given the latents this minimises the hard-EM objective exactly
(``objective_history_`` records it before and after every M-step; a test checks it never
rises). The templates are then scaled to unit norm, with the templates that render their
channels scaled inversely so that every rendering is unchanged: least squares fixes a
template's scale only together with the amplitudes, and without this the scale drifts
geometrically. The E-step is the bottom-up pass, exact max-sum within a layer but not
jointly over overlapping patches and layers, so a whole iteration is not guaranteed to lower
the objective (on small problems about one iteration in four raises it). With
``em_monotone=True`` every training sample keeps the better of its fresh and its previous
latents and the templates are neither rescaled nor re-seeded: then no iteration raises the
layers' and priors' part of the objective (``history_``'s ``layer_objective``; a test checks
it), at the memory of every sample's codes and, on digits, some accuracy. After every iteration the top is refitted to the new bottom-up features of
every training sample; after the last one the switch and translation priors and the noise
variances are refitted to the final latents (on at most 2,000 training samples).

Training: EG (``algorithm="eg"``)
---------------------------------
Minibatch Adam on, per step (N samples, N_L labeled, N_U unlabeled; terms minimised, every
sign as written)::

    loss = xent_weight           * (1/N_L) sum_{n labeled}   -ln softmax(score_n)[y_n]
         + entropy_weight        * (1/N_U) sum_{n unlabeled} -sum_c p_nc ln p_nc
         + reconstruction_weight * (1/N)   sum_n ||x_n - r_n[0]||^2 / D_0
         + nonnegativity_weight  * (1/N)   sum_n sum_{l=1..L} ||min(r_n[l], 0)||^2 / D_l
         + kl_weight             * sum_c pbar_c ln(pbar_c * n_classes)
         + consistency_weight    * (1/N_U) sum_{n unlabeled} sum_c t_nc ln(t_nc / p_nc)

``pbar`` is the mean of the unlabeled p_n over the batch: the KL term is KL(pbar || uniform
class prior), which keeps the entropy term from collapsing the unlabeled samples onto a few
classes. With ``translation = t > 0`` every training image of a step is moved by a
translation nuisance drawn uniformly from [-t, t]^2 pixels (zero fill) before the step (the
DRMM's translation nuisance, sampled), and ``t_n`` is the class posterior of the unmoved image
(computed first, held fixed; with ``teacher_decay`` d > 0 under the moving average of the
parameters, ``avg = d avg + (1 - d) params`` after every step): the consistency term is
KL(t_n || p_n), the model's statement that the class does not depend on the nuisance. With
``confidence_threshold`` tau > 0, t_n is one-hot on the most probable class where that
class's posterior is >= tau, and 0 (the sample left out) elsewhere.

``r_n`` is rendered top-down from the label (labeled) or the predicted class (unlabeled)
with the latents inferred bottom-up (held fixed: they are piecewise constant in the
parameters), D_l the size of a code. The gradients come from the project's kernels: through
the bottom-up pass the input gradient is :func:`fastdrmm.ops.render` and the template
gradient :func:`fastdrmm.ops.template_stats`; through the top-down pass the template
gradient is ``template_stats`` of the rendered code against the image gradient, and the code
gradient :func:`fastdrmm.ops.match_at`, the matching read at the argmax positions. ``class_scale``
stays fixed during EG. After EG the generative priors and noise variances are refitted from
the E-step's choices on (at most 2,000) training samples, so that :meth:`DRMM.sample` works.

Semi-supervised EG steps pair a batch of unlabeled samples with a batch of labeled ones
(cycled); an epoch is one pass over the larger set.

Layout
------
This module is the estimator. Its training run (the epoch loop, with EG and EM as two
strategies) is :mod:`fastdrmm._training`, the specification of its settings
:mod:`fastdrmm._drmm_params`, its saved form :mod:`fastdrmm._drmm_format` and its training
checkpoints :mod:`fastdrmm._checkpoint`.
"""


import os
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from . import _drmm_format
from ._checkpoint import check_checkpoint_path, data_identity, read_checkpoint
from ._drmm_params import DTYPES, LOSS_WEIGHTS, PARAMETER_CONSTRAINTS, check_host_backend
from ._inputs import check_images, check_labels, seed_of
from ._network import LossWeights, network_for, softmax
from ._amplitudes import refine_codes
from ._top import covariance_factor, draw_features
from ._progress import batches, serial_blas
from ._training import (EM, INFERENCE_BATCH, Training, check_input_scale, initial_parameters,
                        validation_split)
from .layers import resolve_layers

__all__ = ["DRMM"]

#: the EM iterations that ``init="em"`` runs before EG
EM_START_ITERATIONS = 3


class DRMM(ClassifierMixin, BaseEstimator):
    """Deep Rendering Mixture Model: max-sum inference, top-down rendering, EM and EG training.

    Parameters
    ----------
    layers : str or sequence of Layer, default "conv-small"
        A preset name (see :data:`fastdrmm.layers.PRESETS`: "conv-small", "two-layer") or
        the layers, bottom first.
    n_classes : int, default 10
        Classes are the integers 0 .. n_classes-1; -1 in y marks an unlabeled sample.
    algorithm : {"eg", "em"}, default "eg"
        Gradient training of the EG objective, or hard EM (see the module docstring).
    max_iter : int, default 10
        EG epochs, or EM iterations (full passes).
    batch_size : int, default 128
        Samples per EG step (and per labeled batch in semi-supervised EG).
    learning_rate : float, default 1e-3
        Adam's step size.
    lr_schedule : {"cosine", "constant", "step"}, default "cosine"
    xent_weight, reconstruction_weight, entropy_weight, nonnegativity_weight : float
        The weights of the EG terms (defaults 1.0, 0.1, 0.1, 0.01).
    kl_weight : float, default 0.0
        The weight of the EG class-balance term on unlabeled samples (see the module
        docstring).
    consistency_weight : float, default 0.0
        The weight of the EG translation-consistency term on unlabeled samples.
    translation : int, default 0
        EG moves every training image by a random translation of up to this many pixels
        per step (0: off).
    teacher_decay : float in [0, 1), default 0.0
        With ``consistency_weight``: the targets come from an exponential moving average of
        the parameters with this decay per step (a "mean teacher", e.g. 0.99), which lags the
        model's own mistakes; 0 takes them from the current parameters.
    confidence_threshold : float in [0, 1], default 0.0
        With ``consistency_weight``: > 0 replaces each target by its most probable class
        (the E-step's hard choice) where that class's posterior is at least this, and leaves
        the other unlabeled samples out of the term; 0 keeps the soft posteriors. EM: an
        unlabeled sample whose chosen class's posterior is below it weighs nothing in that
        iteration's statistics.
    weight_decay : float, default 0.0
        L2 penalty on the layer templates added to their EG gradient.
    ridge : float, default 1e-3
        EM's ridge, relative to the mean diagonal of each Gram matrix.
    bias : {"generative", "fixed"}, default "generative"
        How EM sets the biases.
    unlabeled_weight : float, default 1.0
        The weight of an unlabeled sample in EM's statistics.
    validation_fraction : float, default 0.1
        Fraction of the labeled training samples held out (stratified, seeded) to score
        every epoch; the best-scoring parameters are kept. 0 disables it.
    n_iter_no_change : int or None, default None
        Stop early after this many epochs without a better validation score.
    tol : float, default 1e-4
        EM stops when the objective (per sample) changes by less than this.
    init : {"auto", "he", "patches", "em"}, default "auto"
        Random (He) templates, templates drawn from the data's patches, or (EG) the model
        of ``EM_START_ITERATIONS`` (3) EM iterations, its shared-covariance top becoming the
        linear class scores EG trains on; "auto" picks "patches" for EM and "he" for EG.
    dtype : {"float32", "float64"}, default "float32"
        The working precision of the kernels (M-step solves are float64).
    backend : str, default "auto"
        The :mod:`fastdrmm.ops` backend: "auto" (cpu), "cpu" or "numpy". The model keeps its
        arrays on the host; the GPU backends serve :mod:`fastdrmm.ops` directly.
    random_state : None, int, RandomState or Generator
        Seeds initialisation, the validation split and the minibatch order; a fixed seed
        gives bit-identical results on the cpu backend.
    verbose : int, default 0
        0 silent; 1 a progress bar per epoch and one line per epoch.
    checkpoint : str or None, default None
        A file rewritten atomically after every epoch (parameters, optimizer state, history,
        the identity of the training data); ``fit(..., resume=True)`` continues from it.
        ``fit`` checks that it can be written (not a directory, in an existing writable
        directory) before training.
    amplitude_steps : int, default 5
        EM: the projected-gradient steps per E-step that refine the codes, given the
        latents chosen bottom-up, to render the layer below (0: the bottom-up codes).
    em_targets : {"bottom-up", "top-down"}, default "bottom-up"
        EM: each layer's templates fitted to render the layer below's (refined) code
        ("bottom-up"), or, as in the paper, to render it from the top-down rendering of
        the chosen class through the recorded latents ("top-down", top layer first: one
        pass over the data per layer; ``fit`` only, ``partial_fit`` fits bottom-up; the
        "after" entries of ``objective_history_`` are then the bottom-up objective at
        the top-down templates and may exceed "before"). Bottom-up measured better on
        digits (held-out 0.985-0.991 against 0.980-0.983, 2 layers).
    shrinkage : "auto", "oas" or float in [0, 1], default "auto"
        EM: the shrinkage of the top's shared covariance: Ledoit-Wolf (on standardized
        features), Oracle-Approximating Shrinkage, or fixed.
    em_monotone : bool, default False
        EM: keep every training sample's latents between iterations and let each sample
        take the better of its fresh and its previous ones (:mod:`fastdrmm._latents`), with
        the templates neither rescaled nor re-seeded: then no iteration raises the
        objective (the layers' and priors' terms). Costs the memory of every sample's codes.
        ``fit`` only (``partial_fit`` is stepwise EM over changing batches); not with
        ``em_targets="top-down"``, whose M-step does not minimise that objective.
    top : {"average", "full"}, default "average"
        How the class templates meet the top code: "average" (global average pooling, as in
        the paper's Conv-Small: a template of K_L numbers rendered on every top position) or
        "full" (a template of the whole top code K_L x Hp x Wp, the DRMM's top layer without
        the average; far better for EM, whose codes are not trained to be averaged).

    Attributes
    ----------
    parameters_ : dict of arrays
        W0.., b0.. (layer templates and biases), mu, beta, class_scale (top), and the
        generative noise_variance, switch_prior{l}, translation_prior{l}, class_prior,
        top_noise_variance; an EM model also class_weights and top_covariance. An EM
        model's class_weights and beta read the bottom-up feature f (``Sigma_f^-1 mu_f``
        of f's class means and shared covariance); its mu and top_covariance are those of
        the coherent top code, ``scale * mu_f`` and ``scale scale^T * Sigma_f`` with the
        per-feature factor ``scale`` from f to that code.
    layers_ : tuple of Layer
    input_shape_ : (C, H, W)
    classes_ : ndarray, ``arange(n_classes)``
    algorithm_, top_, dtype_ : str; amplitude_steps_ : int
        The settings the model was fitted with that inference reads: predictions depend
        only on the fitted state (``set_params`` changes nothing until the next ``fit``;
        ``partial_fit`` continues the fitted model and refuses a changed structure). Only
        ``backend``, where the kernels run, is read at predict time.
    n_iter_ : int, epochs/iterations run
    history_ : list of dict, one per epoch (loss terms, validation score, time, rate; and
        ``compile_time``, the seconds of it spent compiling kernels, where there were any:
        the kernels an epoch uses are compiled before the first one)
    objective_history_ : list of (before, after) EM objective around each M-step
    validation_score_ : float or None, best validation accuracy
    best_iteration_ : int, the epoch whose parameters were kept
    """

    #: what every setting may hold (checked by ``_validate_params``; see _drmm_params)
    _parameter_constraints = PARAMETER_CONSTRAINTS

    def __init__(self, layers="conv-small", n_classes=10, *, algorithm="eg", max_iter=10,
                 batch_size=128, learning_rate=1e-3, lr_schedule="cosine", xent_weight=1.0,
                 reconstruction_weight=0.1, entropy_weight=0.1, nonnegativity_weight=0.01,
                 kl_weight=0.0, consistency_weight=0.0, translation=0, teacher_decay=0.0,
                 confidence_threshold=0.0, weight_decay=0.0, ridge=1e-3, bias="generative",
                 unlabeled_weight=1.0,
                 validation_fraction=0.1, n_iter_no_change=None, tol=1e-4, init="auto",
                 dtype="float32", backend="auto", random_state=None, verbose=0,
                 checkpoint=None, top="average", amplitude_steps=5, em_targets="bottom-up",
                 shrinkage="auto", em_monotone=False):
        self.layers = layers
        self.n_classes = n_classes
        self.algorithm = algorithm
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.lr_schedule = lr_schedule
        self.xent_weight = xent_weight
        self.reconstruction_weight = reconstruction_weight
        self.entropy_weight = entropy_weight
        self.nonnegativity_weight = nonnegativity_weight
        self.kl_weight = kl_weight
        self.consistency_weight = consistency_weight
        self.translation = translation
        self.teacher_decay = teacher_decay
        self.confidence_threshold = confidence_threshold
        self.weight_decay = weight_decay
        self.ridge = ridge
        self.bias = bias
        self.unlabeled_weight = unlabeled_weight
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.init = init
        self.dtype = dtype
        self.backend = backend
        self.random_state = random_state
        self.verbose = verbose
        self.checkpoint = checkpoint
        self.top = top
        self.amplitude_steps = amplitude_steps
        self.em_targets = em_targets
        self.shrinkage = shrinkage
        self.em_monotone = em_monotone


    # ---------------------------------------------------------------------------------------
    # configuration

    def _check_params(self):
        """Check every setting (InvalidParameterError naming it, before any work) ->
        (layers resolved, the EG terms' weights)."""
        check_host_backend(self.backend)
        self._validate_params()
        weights = LossWeights(**{term: float(getattr(self, name))
                                 for name, term in LOSS_WEIGHTS.items()})
        return resolve_layers(self.layers), weights

    def _network(self, layers, input_shape):
        """The network the current settings describe (for fitting)."""
        return network_for(layers, input_shape, self.n_classes, self.backend, self.algorithm,
                           self.top)

    @property
    def _np_dtype(self):
        return DTYPES[self.dtype]

    def _init_params(self, net, X, yidx, seed):
        init = self.init
        if init == "auto":
            init = "patches" if self.algorithm == "em" else "he"
        if init == "em":
            if self.algorithm == "eg":
                return self._em_start(X, yidx, seed)
            init = "patches"  # EM itself starts from the data's patches
        return initial_parameters(net, X, yidx, seed, init, self._np_dtype, self.backend)

    def _em_start(self, X, yidx, seed):
        """EG's starting parameters from ``EM_START_ITERATIONS`` iterations of EM (init="em").

        EM's templates end at unit norm, where its normalised matching is EG's tied one,
        so the network is the same; the shared-covariance top becomes EG's linear class
        scores (``mu`` := the class weights ``Sigma^-1 mu_c``, ``class_scale`` 1, the same
        ``beta``): the EG run starts from exactly the EM model's predictions."""
        # em_monotone=False: its iterations end at unit-norm templates (a monotone run does
        # not rescale them), and a starting point needs no monotone guarantee
        em = clone(self).set_params(algorithm="em", init="patches",
                                    max_iter=EM_START_ITERATIONS, validation_fraction=0.0,
                                    n_iter_no_change=None, checkpoint=None, random_state=seed,
                                    em_monotone=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            em.fit(X, yidx)
        p = dict(em.parameters_)
        weights = p.pop("class_weights", None)
        p.pop("top_covariance", None)
        if weights is not None:
            p["mu"] = np.asarray(weights, self._np_dtype)
            p["class_scale"] = np.float64(1.0)
        return p

    # ---------------------------------------------------------------------------------------
    # fitting

    @serial_blas
    def fit(self, X, y=None, *, resume=False, callback=None):
        """Fit by EG or hard EM.

        Parameters
        ----------
        X : array (N, C, H, W)
        y : None (unsupervised) or array (N,) of class indices, -1 for unlabeled samples
        resume : bool, default False
            Continue from ``self.checkpoint`` when that file exists (the same model settings
            and the same data required: the checkpoint records the number of samples, the
            shape and the sha256 of X and of y, and other data is a ValueError before any
            training); the run then ends exactly as an uninterrupted one would.
        callback : callable or None
            Called after every epoch as ``callback(snapshot, record)``: ``snapshot`` is a
            fitted DRMM holding the current parameters (e.g. to score a test set), ``record``
            the epoch's history entry; a dict it returns is merged into that entry (and so
            into ``history_`` and the checkpoint). It must not change the snapshot's
            parameters.

        Returns
        -------
        self
        """
        layers, weights = self._check_params()
        if self.algorithm == "em" and self.em_monotone and self.em_targets == "top-down":
            raise ValueError("em_monotone=True needs em_targets='bottom-up': the top-down "
                             "M-step does not minimise the objective it keeps from rising")
        X = check_images(X, dtype=self._np_dtype)
        yidx = check_labels(y, X.shape[0], self.n_classes)
        if not isinstance(resume, (bool, np.bool_)):
            raise TypeError(f"resume must be True or False, got {resume!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {callback!r}")
        if resume and self.checkpoint is None:
            raise ValueError("resume=True needs checkpoint= (the file to resume from)")
        check_input_scale(X)
        net = self._network(layers, X.shape[1:])
        data = state = None
        if self.checkpoint is not None:
            check_checkpoint_path(self.checkpoint)
            data = data_identity(X, yidx)
        if resume and os.path.exists(self.checkpoint):
            state = read_checkpoint(self, self.checkpoint, net, data, self._np_dtype)
        seed = seed_of(self.random_state) if state is None else state["seed"]
        train, val = validation_split(yidx, self.n_classes, float(self.validation_fraction),
                                      seed)
        run = Training(self, net, weights, seed, X, yidx, train, val, callback=callback,
                       data_identity=data)
        if state is not None:
            run.restore(state)
        else:
            run.params = self._init_params(net, X[train], yidx[train], seed)
        run.loop()
        self._finish(run)
        self._partial = None  # a later partial_fit starts from this fit, with a new optimizer
        return self

    @serial_blas
    def partial_fit(self, X, y=None):
        """One pass over (X, y): an EG epoch at the constant rate ``learning_rate`` with the
        optimizer state kept between calls, or one stepwise-EM update (the statistics of
        this batch blended into the running ones with weight (t + 2)^-0.7). The first call
        initialises the model from X; later ones need images of the same shape."""
        layers, weights = self._check_params()
        fitted = hasattr(self, "parameters_")
        if fitted:
            self._check_same_structure(layers)
        X = check_images(X, input_shape=self.input_shape_ if fitted else None,
                         dtype=self._np_dtype)
        yidx = check_labels(y, X.shape[0], self.n_classes)
        check_input_scale(X)
        net = self._network(layers, X.shape[1:])
        state = getattr(self, "_partial", None)
        if not fitted or state is None:
            seed = seed_of(self.random_state)
            params = (dict(self.parameters_) if fitted
                      else self._init_params(net, X, yidx, seed))
            state = {"seed": seed, "t": 0, "optimizer": None, "stats": None}
        else:
            params = dict(self.parameters_)
        every = np.arange(X.shape[0])
        run = Training(self, net, weights, state["seed"], X, yidx, every, every[:0])
        run.params, run.epoch = params, state["t"]
        if self.algorithm == "eg":
            run.strategy.optimizer = state["optimizer"]
            run.strategy.start(run)
            state["optimizer"] = run.strategy.optimizer
            run.strategy.epoch(run, constant_rate=True)
        else:
            state["stats"] = EM.stepwise(run, state["stats"], state["t"])
        state["t"] += 1
        run.epoch = state["t"]
        self._finish(run, refit_priors=False)
        self._partial = state
        return self

    def _check_same_structure(self, layers):
        """partial_fit continues the fitted model: refuse settings that changed its structure
        since (``fit`` starts again from them)."""
        fitted = {"layers": tuple(self.layers_), "n_classes": self.classes_.size,
                  "algorithm": self.algorithm_, "top": self.top_, "dtype": self.dtype_}
        current = {"layers": tuple(layers), "n_classes": int(self.n_classes),
                   "algorithm": self.algorithm, "top": self.top, "dtype": self.dtype}
        changed = [name for name in fitted if fitted[name] != current[name]]
        if changed:
            raise ValueError(f"partial_fit continues the fitted model, but {', '.join(changed)} "
                             "changed since it was fitted; call fit() to start again with the "
                             "new settings")

    def _finish(self, run, refit_priors=True):
        params = run.best_params if run.best_params is not None else run.params
        if refit_priors and run.epoch > 0:
            # EM's top was refitted to every training sample after the last iteration
            params = run.refit_priors(params)
        best = run.best_epoch if run.best_params is not None else run.epoch
        self._set_fitted(run.net, params, n_iter=run.epoch, history=run.history,
                         objective_history=run.objective_history,
                         validation_score=run.best_score, best_iteration=best,
                         converged=run.converged)
        if (self.algorithm == "em" and not run.converged and run.epoch == self.max_iter
                and self.max_iter > 0 and run.validation_size == 0):
            warnings.warn("EM did not converge within max_iter iterations; increase max_iter "
                          "or tol", ConvergenceWarning)

    def _set_fitted(self, net, params, *, n_iter, history, objective_history,
                    validation_score, best_iteration, converged, amplitude_steps=None):
        """Record the fitted state. Everything inference reads is recorded here (the network's
        structure, its matching, top, class count, working dtype and the E-step's amplitude
        steps; ``amplitude_steps`` None: the current setting's), so that changing a
        hyper-parameter after fitting changes nothing until the next fit."""
        self.amplitude_steps_ = int(self.amplitude_steps if amplitude_steps is None
                                    else amplitude_steps)
        self.parameters_ = params
        self.layers_ = net.layers
        self.input_shape_ = net.input_shape
        self.classes_ = np.arange(net.n_classes)
        self.algorithm_ = "em" if net.matching == "normalized" else "eg"
        self.top_ = net.top
        self.dtype_ = np.dtype(np.asarray(params["W0"]).dtype).name
        self.n_iter_ = int(n_iter)
        self.history_ = list(history)
        self.objective_history_ = [tuple(t) for t in objective_history]
        self.validation_score_ = validation_score
        self.best_iteration_ = int(best_iteration)
        self.converged_ = bool(converged)
        return self

    # ---------------------------------------------------------------------------------------
    # inference

    def _net(self):
        """The fitted network (only the backend, an execution choice, is read from the
        current settings)."""
        check_is_fitted(self, "parameters_")
        return network_for(self.layers_, self.input_shape_, self.classes_.size, self.backend,
                           self.algorithm_, self.top_)

    def _inputs(self, X, name="X"):
        check_is_fitted(self, "parameters_")
        return check_images(X, name, self.input_shape_, DTYPES[self.dtype_])

    def _bottom_up_batches(self, X):
        net = self._net()
        X = self._inputs(X)
        for sl in batches(X.shape[0], INFERENCE_BATCH):
            yield sl, net, net.bottom_up(self.parameters_, X[sl])

    @serial_blas
    def decision_function(self, X):
        """Class scores (N, n_classes): ``<class_weights_c, f> + beta_c`` (EM), else
        ``class_scale * <mu_c, f> + beta_c``."""
        with np.errstate(over="ignore", invalid="ignore"):
            out = self._raw_scores(X)
        if not np.all(np.isfinite(out)):
            rows = np.flatnonzero(~np.all(np.isfinite(out), axis=1))
            peak = float(np.max(np.abs(np.asarray(X, np.float64)[rows])))
            raise ValueError(f"the class scores of {rows.size} sample(s) of X overflow "
                             f"{self.dtype_} (first: sample {rows[0]}, its values up to "
                             f"{peak:.3g}); rescale X to the range the model was fitted on")
        return out

    def _raw_scores(self, X):
        out = None
        for sl, _, fw in self._bottom_up_batches(X):
            if out is None:
                out = np.empty((np.shape(X)[0], self.classes_.size))
            out[sl] = fw.scores
        return out

    def predict_proba(self, X):
        """Softmax of the class scores (N, n_classes)."""
        return softmax(self.decision_function(X))

    def predict(self, X):
        """The best-scoring class of every sample (N,)."""
        best = self.decision_function(X).argmax(axis=1)
        return self.classes_[best]

    @serial_blas
    def transform(self, X):
        """The top code f (N, K_L): the last layer's code averaged over its plane."""
        out = None
        for sl, _, fw in self._bottom_up_batches(X):
            if out is None:
                out = np.empty((np.shape(X)[0], fw.f.shape[1]), fw.f.dtype)
            out[sl] = fw.f
        return out

    @serial_blas
    def reconstruct(self, X, y=None, *, source="class"):
        """Render X back top-down through the latents inferred from it.

        ``source="class"`` renders the class template ``mu_c`` of the class ``y`` where
        given (-1 entries and ``y=None`` use the predicted class); ``source="code"`` renders
        the sample's own top code (an EM model's made coherent by ``amplitude_steps`` steps,
        as in its E-step; ``y`` is not read). The switches and argmax positions of every
        layer are those of the bottom-up pass. Returns an array of X's shape.
        """
        if source not in ("class", "code"):
            raise ValueError(f"source must be 'class' or 'code', got {source!r}")
        X = self._inputs(X)
        n_classes = self.classes_.size
        yidx = check_labels(y, X.shape[0], n_classes)
        out = np.empty_like(X)
        p = self.parameters_
        for sl, net, fw in self._bottom_up_batches(X):
            if source == "code":
                switches = [fw.switches(l, X.dtype) for l in range(net.n_layers)]
                steps = self.amplitude_steps_ if self.algorithm_ == "em" else 0
                top = refine_codes(net, p, fw, switches, steps)[-1]
                out[sl] = net.render_down(p, top, fw.idxs, switches)[0]
                continue
            cls = np.where(yidx[sl] >= 0, yidx[sl], np.asarray(fw.scores).argmax(axis=1))
            q = np.eye(n_classes)[cls]
            rs, _ = net.top_down(p, fw, q)
            out[sl] = rs[0]
        return out

    @serial_blas
    def sample(self, classes, random_state=None):
        """Generate images of the given classes from the generative model.

        Every unit's switch is drawn from its layer's switch prior and its position in the
        pooling window from the translation prior; the top code (an EM model's: drawn from
        its class's Gaussian ``N(mu_c, Sigma)``; else the class template ``mu_c``) is
        rendered down with those latents. ``classes`` is an int or an array of class indices; returns
        (len(classes), C, H, W).
        """
        net = self._net()
        n_classes = self.classes_.size
        cls = np.atleast_1d(np.asarray(classes))
        if cls.ndim != 1 or cls.dtype.kind not in "iu":
            raise TypeError("classes must be an int or a 1-d array of class indices")
        if cls.size and (cls.min() < 0 or cls.max() >= n_classes):
            raise ValueError(f"classes must lie in [0, {n_classes})")
        rng = np.random.default_rng(seed_of(random_state))
        p, dtype = self.parameters_, DTYPES[self.dtype_]
        out = np.empty((cls.size, *self.input_shape_), dtype)
        factor = covariance_factor(p["top_covariance"]) if "top_covariance" in p else None
        for sl in batches(cls.size, INFERENCE_BATCH):
            idxs, switches = net.draw_latents(p, sl.stop - sl.start, rng, dtype)
            if factor is not None:  # the shared-covariance top: f ~ N(mu_c, Sigma)
                top = net.top_plane_of(draw_features(p, cls[sl], rng, factor), dtype)
            else:
                top = net.top_code(p, np.eye(n_classes)[cls[sl]], dtype)
            out[sl] = net.render_down(p, top, idxs, switches)[0]
        return out

    # ---------------------------------------------------------------------------------------
    # persistence

    def save(self, path, metadata=None):
        """Write the fitted model to ``path`` atomically (see :func:`fastdrmm.load`).

        ``metadata``: an optional JSON-able dict stored with the model (e.g. the dataset it
        was trained on); it comes back as ``user_metadata_`` after loading."""
        check_is_fitted(self, "parameters_")
        _drmm_format.save(self, path, metadata)
