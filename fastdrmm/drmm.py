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
is the generative model's; and ``class_scale = P / tau``, ``beta_c = -P ||mu_c||^2 / (2 tau) +
ln pi_c`` (P top positions), so the class score is the top Gaussian's log-likelihood plus the
log-prior. ``bias="fixed"`` keeps the biases as they are.

E-step: bottom-up inference records every latent (switches, argmax positions, the codes
h[l]); labeled samples take their label, unlabeled ones the best-scoring class. M-step, in
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
the objective. After the last iteration the class templates and priors are refitted to the
final codes (on at most 2,000 training samples).

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
"""

from __future__ import annotations

import functools
import hashlib
import numbers
import os
import time
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from . import _em, io, ops
from ._compiling import CompileClock
from ._validation import check_int as _check_int
from ._validation import check_real as _check_real
from ._network import (LossWeights, Network, eg_loss_and_grads, softmax, trainable_names,
                       translate)
from ._optim import SCHEDULES, Adam, learning_rate
from .kernels.buffers import StepBuffers
from .layers import Layer, resolve_layers

__all__ = ["DRMM"]

#: the backends the model layer computes on (its arrays live on the host)
_HOST_BACKENDS = ("auto", "cpu", "numpy")

#: samples per batch of every inference pass (bounded memory whatever N is)
INFERENCE_BATCH = 512
#: samples used to refit the generative priors after EG
PRIOR_SAMPLES = 2000
_ALGORITHMS = ("em", "eg")
_BIASES = ("generative", "fixed")
_INITS = ("auto", "he", "patches")
_DTYPES = {"float32": np.float32, "float64": np.float64}


# --------------------------------------------------------------------------------------------
# argument checking


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_images(X, name="X", input_shape=None, dtype=np.float32):
    """X as a C-contiguous (N, C, H, W) array of ``dtype`` with finite values."""
    try:
        arr = np.asarray(X)
    except Exception as exc:
        raise TypeError(f"{name} must be an array of numbers, got {type(X).__name__}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 4:
        hint = " (reshape (N, H, W) images to (N, 1, H, W))" if arr.ndim == 3 else ""
        raise ValueError(f"{name} must be a 4-d array (N, C, H, W), got shape {arr.shape}{hint}")
    if arr.shape[0] < 1 or 0 in arr.shape[1:]:
        raise ValueError(f"{name} holds no data (shape {arr.shape})")
    if input_shape is not None and tuple(arr.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{name} has images of shape {tuple(arr.shape[1:])}, but the model "
                         f"was fitted on {tuple(input_shape)}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def _check_labels(y, n, n_classes, name="y"):
    """y -> int64 class indices with -1 for unlabeled; None -> all unlabeled.

    Values are compared in y's own dtype before any cast (a cast would wrap 2**64-1 to -1 or
    1e20 to -2**63): only an exact -1 (of a signed or float y) marks an unlabeled sample, and
    a value out of range or not integral is refused, quoted as it was given."""
    if y is None:
        return np.full(n, -1, np.int64)
    try:
        arr = np.asarray(y)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{name} must hold integer class indices: {exc}") from None
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold integer class indices in [0, {n_classes}) or -1, "
                        f"got dtype {arr.dtype}")
    with np.errstate(invalid="ignore"):
        valid = (arr >= 0) & (arr < n_classes)
        if arr.dtype.kind != "u":
            valid |= arr == -1
        if arr.dtype.kind == "f":
            valid &= arr == np.floor(arr)
    if not valid.all():
        bad = arr[~valid][0].item()
        raise ValueError(f"{name} holds {bad!r}: labels must be integer class indices in "
                         f"[0, {n_classes}) (or -1 for an unlabeled sample)")
    return arr.astype(np.int64)


def _seed_of(random_state):
    if random_state is None:
        return int(np.random.SeedSequence().entropy % (2 ** 63))
    if isinstance(random_state, (numbers.Integral, np.integer)) and not isinstance(
            random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be >= 0, got {random_state!r}")
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2 ** 31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2 ** 63 - 1))
    raise TypeError("random_state must be None, an int, a numpy RandomState or Generator, got "
                    f"{random_state!r}")


def _batches(n, size):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _progress(total, desc, enabled):
    """A tqdm bar (or a silent stand-in when tqdm is absent or not wanted)."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def _say(message, enabled):
    if not enabled:
        return
    try:
        from tqdm.auto import tqdm
        tqdm.write(message)
    except ImportError:
        print(message, flush=True)


def _announcer(enabled):
    """What a CompileClock says its line with: ``_say`` where verbose, else nothing."""
    return (lambda message: _say(message, True)) if enabled else None


def _serial_blas(method):
    """Run ``method`` with NumPy's BLAS on one thread.

    The model's own matrix products are small ((N, n_classes) x (n_classes, F) and the like);
    a multi-threaded BLAS runs them on its thread pool, whose threads then spin-wait and take
    the cores from the Numba kernels that follow: measured 313 -> 200 ms per conv-small EG
    step at batch 128 on 2 cores."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return method(*args, **kwargs)
    return wrapper


# --------------------------------------------------------------------------------------------
# the estimator


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
        the other unlabeled samples out of the term; 0 keeps the soft posteriors.
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
    init : {"auto", "he", "patches"}, default "auto"
        Random (He) templates, or templates drawn from the data's patches; "auto" picks
        "patches" for EM and "he" for EG.
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
        top_noise_variance.
    layers_ : tuple of Layer
    input_shape_ : (C, H, W)
    classes_ : ndarray, ``arange(n_classes)``
    algorithm_, top_, dtype_ : str
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

    def __init__(self, layers="conv-small", n_classes=10, *, algorithm="eg", max_iter=10,
                 batch_size=128, learning_rate=1e-3, lr_schedule="cosine", xent_weight=1.0,
                 reconstruction_weight=0.1, entropy_weight=0.1, nonnegativity_weight=0.01,
                 kl_weight=0.0, consistency_weight=0.0, translation=0, teacher_decay=0.0,
                 confidence_threshold=0.0, weight_decay=0.0, ridge=1e-3, bias="generative",
                 unlabeled_weight=1.0,
                 validation_fraction=0.1, n_iter_no_change=None, tol=1e-4, init="auto",
                 dtype="float32", backend="auto", random_state=None, verbose=0,
                 checkpoint=None, top="average"):
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

    # ---------------------------------------------------------------------------------------
    # configuration

    def _check_params(self):
        layers = resolve_layers(self.layers)
        _check_int(self.n_classes, "n_classes", 2)
        _check_choice(self.algorithm, "algorithm", _ALGORITHMS)
        _check_int(self.max_iter, "max_iter", 0)
        _check_int(self.batch_size, "batch_size", 1)
        _check_real(self.learning_rate, "learning_rate", 0.0, open_low=True)
        _check_choice(self.lr_schedule, "lr_schedule", SCHEDULES)
        weights = LossWeights(
            xent=_check_real(self.xent_weight, "xent_weight"),
            reconstruction=_check_real(self.reconstruction_weight, "reconstruction_weight"),
            entropy=_check_real(self.entropy_weight, "entropy_weight"),
            nonnegativity=_check_real(self.nonnegativity_weight, "nonnegativity_weight"),
            kl=_check_real(self.kl_weight, "kl_weight"),
            consistency=_check_real(self.consistency_weight, "consistency_weight"))
        _check_int(self.translation, "translation", 0)
        if _check_real(self.teacher_decay, "teacher_decay", 0.0, 1.0) == 1.0:
            raise ValueError("teacher_decay must be < 1 (1 would freeze the targets' model)")
        _check_real(self.confidence_threshold, "confidence_threshold", 0.0, 1.0)
        _check_real(self.weight_decay, "weight_decay")
        _check_real(self.ridge, "ridge", 0.0, open_low=True)
        _check_choice(self.bias, "bias", _BIASES)
        _check_real(self.unlabeled_weight, "unlabeled_weight")
        _check_real(self.validation_fraction, "validation_fraction", 0.0, 0.5)
        if self.n_iter_no_change is not None:
            _check_int(self.n_iter_no_change, "n_iter_no_change", 1)
        _check_real(self.tol, "tol")
        _check_choice(self.init, "init", _INITS)
        _check_choice(self.top, "top", ("average", "full"))
        _check_choice(self.dtype, "dtype", tuple(_DTYPES))
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a backend name, got {self.backend!r}")
        if self.backend not in _HOST_BACKENDS:
            raise ValueError(f"backend must be one of {_HOST_BACKENDS}, got {self.backend!r}: "
                             "the model keeps its arrays on the host (the GPU backends are "
                             "available through fastdrmm.ops)")
        _check_int(self.verbose, "verbose", 0)
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a path or None, got {self.checkpoint!r}")
        return layers, weights

    def _serial_params(self):
        """get_params() in JSON form (layers as dicts, the seed as an int or None)."""
        params = self.get_params()
        layers = params["layers"]
        if not isinstance(layers, str):
            params["layers"] = [layer.to_dict() for layer in resolve_layers(layers)]
        if not (params["random_state"] is None or isinstance(params["random_state"], int)):
            params["random_state"] = None
        if params["checkpoint"] is not None:
            params["checkpoint"] = os.fspath(params["checkpoint"])
        return params

    def _network(self, layers, input_shape):
        """The network the current settings describe (for fitting)."""
        return _build_network(layers, input_shape, self.n_classes, self.backend,
                              self.algorithm, self.top)

    @property
    def _np_dtype(self):
        return _DTYPES[self.dtype]

    # ---------------------------------------------------------------------------------------
    # initialisation

    def _init_params(self, net, X, yidx, seed):
        rng = np.random.default_rng([seed, 0])
        init = self.init
        if init == "auto":
            init = "patches" if self.algorithm == "em" else "he"
        dtype = self._np_dtype
        p = {}
        sample = rng.permutation(X.shape[0])[:min(X.shape[0], 1024)]
        sample.sort()
        h = X[sample]
        for l, (layer, shape) in enumerate(zip(net.layers, net.shapes)):
            k, c = layer.n_templates, shape.channels_in
            kh, kw = layer.kernel_size
            if init == "he":
                W = rng.standard_normal((k, c, kh, kw)) * np.sqrt(2.0 / (c * kh * kw))
                b = np.zeros(k)
                s2 = 1.0
            else:
                W = _em.random_patches(h, layer, k, rng)
                s2 = max(float(np.var(h)), 1e-12)
                b = _em.generative_bias_of(W, s2, np.full(k, 0.5))
            p[f"W{l}"] = W.astype(dtype)
            p[f"b{l}"] = b.astype(dtype)
            p[f"switch_prior{l}"] = np.full(k, 0.5)
            ph, pw = layer.window
            p[f"translation_prior{l}"] = np.full(ph * pw, 1.0 / (ph * pw))
            p.setdefault("noise_variance", []).append(s2)
            if init == "patches":
                h, _ = ops.match_switch_pool(h, net.matching_templates(p, l), p[f"b{l}"],
                                             padding=layer.padding,
                                             pool=layer.window, leak=layer.leak,
                                             backend=self.backend)
        p["noise_variance"] = np.array(p["noise_variance"], np.float64)
        k_top, n_cls = net.feature_size, net.n_classes
        p["class_prior"] = np.full(n_cls, 1.0 / n_cls)
        if init == "he":
            p["mu"] = (rng.standard_normal((n_cls, k_top)) / np.sqrt(k_top)).astype(dtype)
            p["beta"] = np.zeros(n_cls, dtype)
            p["top_noise_variance"] = np.float64(net.top_positions)
            p["class_scale"] = np.float64(1.0)
        else:
            f = np.asarray(net.top_feature(h), np.float64)
            ys = yidx[sample]
            mu = f[rng.integers(0, f.shape[0], n_cls)].copy()
            for c in range(n_cls):
                if np.any(ys == c):
                    mu[c] = f[ys == c].mean(axis=0)
            tau = max(float(np.var(h)), 1e-12)
            p["mu"] = mu.astype(dtype)
            p["top_noise_variance"] = np.float64(tau)
            p["class_scale"] = np.float64(net.top_positions / tau)
            p["beta"] = (-net.top_positions * np.sum(mu * mu, axis=1) / (2 * tau)
                         + np.log(p["class_prior"])).astype(dtype)
        return p

    # ---------------------------------------------------------------------------------------
    # fitting

    @_serial_blas
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
        X = _check_images(X, dtype=self._np_dtype)
        yidx = _check_labels(y, X.shape[0], self.n_classes)
        if not isinstance(resume, (bool, np.bool_)):
            raise TypeError(f"resume must be True or False, got {resume!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {callback!r}")
        if resume and self.checkpoint is None:
            raise ValueError("resume=True needs checkpoint= (the file to resume from)")
        _check_input_scale(X)
        net = self._network(layers, X.shape[1:])
        data = None
        if self.checkpoint is not None:
            _check_checkpoint_path(self.checkpoint)
            data = _data_identity(X, yidx)
        state = None
        if resume and os.path.exists(self.checkpoint):
            state = self._read_checkpoint(self.checkpoint, net, data)
            seed = state["seed"]
        else:
            seed = _seed_of(self.random_state)
        train, val = _validation_split(yidx, self.n_classes, float(self.validation_fraction),
                                       seed)
        run = _Run(self, net, weights, seed, X, yidx, train, val)
        run.callback = callback
        run.data_identity = data
        if state is not None:
            run.restore(state)
        else:
            run.params = self._init_params(net, X[train], yidx[train], seed)
        run.loop()
        self._finish(run)
        self._partial = None  # a later partial_fit starts from this fit, with a new optimizer
        return self

    def _optimizer(self, net, params):
        return Adam(params, trainable_names(net.n_layers),
                    average_decay=float(self.teacher_decay) if self.consistency_weight else 0.0)

    @_serial_blas
    def partial_fit(self, X, y=None):
        """One pass over (X, y): an EG epoch at the constant rate ``learning_rate`` with the
        optimizer state kept between calls, or one stepwise-EM update (the statistics of
        this batch blended into the running ones with weight (t + 2)^-0.7). The first call
        initialises the model from X; later ones need images of the same shape."""
        layers, weights = self._check_params()
        fitted = hasattr(self, "parameters_")
        if fitted:
            self._check_same_structure(layers)
        X = _check_images(X, input_shape=self.input_shape_ if fitted else None,
                          dtype=self._np_dtype)
        yidx = _check_labels(y, X.shape[0], self.n_classes)
        _check_input_scale(X)
        net = self._network(layers, X.shape[1:])
        state = getattr(self, "_partial", None)
        if not fitted or state is None:
            seed = _seed_of(self.random_state)
            params = (dict(self.parameters_) if fitted
                      else self._init_params(net, X, yidx, seed))
            state = {"seed": seed, "t": 0, "optimizer": None, "stats": None}
        else:
            params = dict(self.parameters_)
        every = np.arange(X.shape[0])
        run = _Run(self, net, weights, state["seed"], X, yidx, every, every[:0])
        run.params = params
        if self.algorithm == "eg":
            if state["optimizer"] is None:
                state["optimizer"] = self._optimizer(net, params)
            run.optimizer = state["optimizer"]
            run.eg_epoch(state["t"], constant_rate=True)
        else:
            stats = run.em_statistics()
            stats = stats.scaled(1.0 / stats.weight)
            eta = (state["t"] + 2.0) ** -0.7
            if state["stats"] is not None:
                stats = state["stats"].scaled(1 - eta).add(stats.scaled(eta))
            state["stats"] = stats
            generative = self.bias == "generative"
            run.params = _em.normalize_templates(net, _em.m_step(
                net, run.params, stats, float(self.ridge), generative), generative)
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
            params = run.refit_priors(params, top=self.algorithm == "em")
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
                    validation_score, best_iteration, converged):
        """Record the fitted state. Everything inference reads is recorded here (the network's
        structure, its matching, top, class count and working dtype), so that changing a
        hyper-parameter after fitting changes nothing until the next fit."""
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
        return _build_network(self.layers_, self.input_shape_, self.classes_.size,
                              self.backend, self.algorithm_, self.top_)

    def _inputs(self, X, name="X"):
        check_is_fitted(self, "parameters_")
        return _check_images(X, name, self.input_shape_, _DTYPES[self.dtype_])

    def _bottom_up_batches(self, X):
        net = self._net()
        X = self._inputs(X)
        for sl in _batches(X.shape[0], INFERENCE_BATCH):
            yield sl, net, net.bottom_up(self.parameters_, X[sl])

    @_serial_blas
    def decision_function(self, X):
        """Class scores (N, n_classes): ``class_scale * <mu_c, f> + beta_c``."""
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
                out = np.empty((_n_of(X), self.classes_.size))
            out[sl] = fw.scores
        return out

    def predict_proba(self, X):
        """Softmax of the class scores (N, n_classes)."""
        return softmax(self.decision_function(X))

    def predict(self, X):
        """The best-scoring class of every sample (N,)."""
        best = self.decision_function(X).argmax(axis=1)
        return self.classes_[best]

    def score(self, X, y, sample_weight=None):
        """Accuracy of :meth:`predict` on (X, y)."""
        return super().score(X, y, sample_weight=sample_weight)

    @_serial_blas
    def transform(self, X):
        """The top code f (N, K_L): the last layer's code averaged over its plane."""
        out = None
        for sl, _, fw in self._bottom_up_batches(X):
            if out is None:
                out = np.empty((_n_of(X), fw.f.shape[1]), fw.f.dtype)
            out[sl] = fw.f
        return out

    @_serial_blas
    def reconstruct(self, X, y=None):
        """Render X back top-down from its class and the latents inferred from it.

        The class is ``y`` where given (-1 entries and ``y=None`` use the predicted class);
        the switches and argmax positions of every layer are those of the bottom-up pass.
        Returns an array of X's shape.
        """
        X = self._inputs(X)
        n_classes = self.classes_.size
        yidx = _check_labels(y, X.shape[0], n_classes)
        out = np.empty_like(X)
        for sl, net, fw in self._bottom_up_batches(X):
            cls = np.where(yidx[sl] >= 0, yidx[sl], np.asarray(fw.scores).argmax(axis=1))
            q = np.eye(n_classes)[cls]
            rs, _ = net.top_down(self.parameters_, fw, q)
            out[sl] = rs[0]
        return out

    @_serial_blas
    def sample(self, classes, random_state=None):
        """Generate images of the given classes from the generative model.

        Every unit's switch is drawn from its layer's switch prior and its position in the
        pooling window from the translation prior; the class template is rendered down with
        those latents. ``classes`` is an int or an array of class indices; returns
        (len(classes), C, H, W).
        """
        net = self._net()
        n_classes = self.classes_.size
        cls = np.atleast_1d(np.asarray(classes))
        if cls.ndim != 1 or cls.dtype.kind not in "iu":
            raise TypeError("classes must be an int or a 1-d array of class indices")
        if cls.size and (cls.min() < 0 or cls.max() >= n_classes):
            raise ValueError(f"classes must lie in [0, {n_classes})")
        rng = np.random.default_rng(_seed_of(random_state))
        p = self.parameters_
        dtype = _DTYPES[self.dtype_]
        out = np.empty((cls.size, *self.input_shape_), dtype)
        for sl in _batches(cls.size, INFERENCE_BATCH):
            n = sl.stop - sl.start
            idxs, switches = [], []
            for l, layer in enumerate(net.layers):
                k, (hp, wp), wo = layer.n_templates, net.shapes[l].pooled, net.shapes[l].plane[1]
                ph, pw = layer.window
                prior = np.asarray(p[f"translation_prior{l}"], np.float64)
                offset = rng.choice(ph * pw, size=(n, k, hp, wp), p=prior / prior.sum())
                di, dj = np.divmod(offset, pw)
                rows = np.arange(hp)[:, None] * ph + di
                cols = np.arange(wp)[None, :] * pw + dj
                idxs.append((rows * wo + cols).astype(np.int32))
                pa = np.asarray(p[f"switch_prior{l}"], np.float64)[None, :, None, None]
                switches.append((rng.random((n, k, hp, wp)) < pa).astype(dtype))
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
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        extra = {"user": metadata} if metadata is not None else None
        io.save_arrays(path, _param_arrays(self.parameters_), self._metadata(extra))

    def _metadata(self, extra=None):
        meta = {
            "model_class": "DRMM",
            "params": self._serial_params(),
            "fitted": {
                "layers": [layer.to_dict() for layer in self.layers_],
                "input_shape": list(self.input_shape_),
                "n_iter": int(self.n_iter_),
                "history": self.history_,
                "objective_history": [list(t) for t in self.objective_history_],
                "validation_score": self.validation_score_,
                "best_iteration": int(self.best_iteration_),
                "converged": bool(self.converged_),
                "algorithm": self.algorithm_,
                "top": self.top_,
                "n_classes": int(self.classes_.size),
                "dtype": self.dtype_,
            },
        }
        if extra:
            meta.update(extra)
        return meta

    @classmethod
    def _from_saved(cls, arrays, meta, path):
        try:
            fitted = _saved_fitted(meta)
            return cls._from_parts(arrays, meta, fitted, path)
        except _MetadataError as exc:
            raise ValueError(f"{path}: not a valid saved DRMM: {exc}") from None

    @classmethod
    def _from_checkpoint(cls, arrays, meta, path):
        """The model a checkpoint holds: its best parameters where it kept them, else the
        latest."""
        try:
            state = _checkpoint_state(meta)
            best = state["has_best"]
            chosen = {k[5:]: v for k, v in arrays.items() if k.startswith("best.")} if best \
                else {k: v for k, v in arrays.items() if not k.startswith(("best.", "adam."))}
            epoch = state["epoch"]
            params = _params_field(meta)
            fitted = {"input_shape": state["input_shape"], "n_iter": epoch,
                      "history": state["history"],
                      "objective_history": state["objective_history"],
                      "validation_score": state["best_score"],
                      "best_iteration": state["best_epoch"] if best else epoch,
                      "converged": state["converged"],
                      # a checkpoint is written by the run with these settings
                      "algorithm": params.get("algorithm"), "top": params.get("top", "average"),
                      "n_classes": params.get("n_classes"), "dtype": params.get("dtype")}
            return cls._from_parts(chosen, meta, fitted, path)
        except _MetadataError as exc:
            raise ValueError(f"{path}: not a valid DRMM checkpoint: {exc}") from None

    @classmethod
    def _from_parts(cls, arrays, meta, fitted, path):
        """The model of saved settings (``meta["params"]``), checked fitted state and arrays;
        every failure a _MetadataError naming the field."""
        params = _params_field(meta)
        try:
            model = cls(**params)
        except TypeError as exc:
            raise _MetadataError(f"the field 'params' holds unknown settings: {exc}") from None
        try:
            layers, _ = model._check_params()
            _seed_of(model.random_state)
        except (TypeError, ValueError) as exc:
            raise _MetadataError(f"the field 'params' holds an invalid setting: {exc}") from None
        settings = {"algorithm": (model.algorithm, _ALGORITHMS), "top": (model.top, _TOPS),
                    "n_classes": (model.n_classes, None), "dtype": (model.dtype, tuple(_DTYPES))}
        for name, (default, choices) in settings.items():
            value = fitted.get(name)
            if value is None:  # written before the fitted settings were recorded
                fitted[name] = default
            elif choices is None:
                fitted[name] = _check_field_int(value, f"fitted.{name}", 2)
            elif value not in choices:
                raise _MetadataError(f"the field 'fitted.{name}' must be one of "
                                     f"{list(choices)}, got {_short(value)}")
        if fitted.get("layers") is not None:
            layers = fitted["layers"]
        try:
            net = _build_network(layers, fitted["input_shape"], fitted["n_classes"],
                                 model.backend, fitted["algorithm"], fitted["top"])
            values = _params_from_arrays(arrays, net, _DTYPES[fitted["dtype"]])
        except (TypeError, ValueError, OverflowError) as exc:
            raise _MetadataError(str(exc)) from None
        model._set_fitted(net, values, n_iter=fitted["n_iter"], history=fitted["history"],
                          objective_history=fitted["objective_history"],
                          validation_score=fitted["validation_score"],
                          best_iteration=fitted["best_iteration"],
                          converged=fitted["converged"])
        model.user_metadata_ = meta.get("user")
        model._check_probe_scores()
        return model

    #: the largest image (in values) the load-time probe runs on
    _PROBE_LIMIT = 1 << 20

    def _check_probe_scores(self):
        """Refuse parameters that are finite but so large that inference overflows: the
        class scores of three probe images (zeros, halves, ones) must be finite."""
        if int(np.prod(self.input_shape_)) > self._PROBE_LIMIT:
            return
        probe = np.ones((3, *self.input_shape_), _DTYPES[self.dtype_])
        probe *= np.array([0.0, 0.5, 1.0], probe.dtype)[:, None, None, None]
        with np.errstate(all="ignore"):
            scores = self._raw_scores(probe)
        if not np.all(np.isfinite(scores)):
            raise _MetadataError("the parameters are finite but give non-finite class scores "
                                 "on a probe image (values too large for the model's dtype)")

    def _read_checkpoint(self, path, net, data):
        """The training state of the checkpoint at ``path``, checked against these settings,
        this network and this data (``data``: :func:`_data_identity` of X and y)."""
        arrays, meta = io.load_arrays(path)
        if meta.get("model_class") != "DRMM" or "checkpoint" not in meta:
            raise ValueError(f"{path}: not a DRMM checkpoint")
        try:
            _params_field(meta)  # checked; compared below as written (layers as dicts)
            theirs = meta["params"]
            state = _checkpoint_state(meta, for_resume=True)
        except _MetadataError as exc:
            raise ValueError(f"{path}: not a valid DRMM checkpoint: {exc}") from None
        mine = self._serial_params()
        free = {"max_iter", "verbose", "checkpoint", "backend", "n_iter_no_change"}
        defaults = DRMM().get_params()  # settings added after the file was written
        differ = sorted(k for k in mine
                        if k not in free and theirs.get(k, defaults[k]) != mine[k])
        if differ:
            raise ValueError(f"{path}: the checkpoint was written with other settings "
                             f"({', '.join(differ)}); refusing to resume")
        if tuple(state["input_shape"]) != net.input_shape:
            raise ValueError(f"{path}: the checkpoint is for images of shape "
                             f"{tuple(state['input_shape'])}, not {net.input_shape}")
        if state["data"] is not None:
            differences = _data_differences(state["data"], data)
            if differences:
                raise ValueError(f"{path}: the checkpoint was trained on other data "
                                 f"({'; '.join(differences)}); refusing to resume")
        try:
            state["params"] = _params_from_arrays(arrays, net, self._np_dtype)
            if state["has_best"]:
                state["best_params"] = _params_from_arrays(
                    {k[5:]: v for k, v in arrays.items() if k.startswith("best.")}, net,
                    self._np_dtype)
        except ValueError as exc:
            raise ValueError(f"{path}: not a valid DRMM checkpoint: {exc}") from None
        state["arrays"] = arrays
        return state


# --------------------------------------------------------------------------------------------
# saved metadata, checked field by field


class _MetadataError(ValueError):
    """A field of a file's metadata is missing or malformed (the message names the field)."""


_TOPS = ("average", "full")


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _kind_of(value):
    return "null" if value is None else type(value).__name__


def _get(node, key, where, kinds, what):
    """``node[key]`` when it is one of ``kinds`` (bool never counts as a number)."""
    if key not in node:
        raise _MetadataError(f"the field '{where}{key}' is missing")
    value = node[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _MetadataError(f"the field '{where}{key}' must be {what}, got "
                             f"{_kind_of(value)} {_short(value)}")
    return value


def _check_field_int(value, field, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _MetadataError(f"the field '{field}' must be an integer >= {minimum}, got "
                             f"{_short(value)}")
    return value


def _int_field(node, key, where, minimum=0):
    return _check_field_int(_get(node, key, where, (int,), "an integer"), where + key, minimum)


def _number_field(node, key, where, optional=False):
    if optional and node.get(key, 0) is None:
        return None
    value = _get(node, key, where, (int, float), "a number" + (" or null" if optional else ""))
    if not np.isfinite(value):
        raise _MetadataError(f"the field '{where}{key}' must be finite, got {value!r}")
    return float(value)


def _shape_field(node, key, where):
    shape = _get(node, key, where, (list,), "a list of 3 integers (C, H, W)")
    if len(shape) != 3:
        raise _MetadataError(f"the field '{where}{key}' must be a list of 3 integers (C, H, "
                             f"W), got {_short(shape)}")
    return [_check_field_int(v, f"{where}{key}[{i}]", 1) for i, v in enumerate(shape)]


def _history_fields(node, where):
    """(history, objective_history): a list of records and a list of (before, after)."""
    history = _get(node, "history", where, (list,), "a list of records")
    for i, record in enumerate(history):
        if not isinstance(record, dict):
            raise _MetadataError(f"the field '{where}history[{i}]' must be a record, got "
                                 f"{_short(record)}")
    pairs = _get(node, "objective_history", where, (list,), "a list of (before, after) pairs")
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)):
            raise _MetadataError(f"the field '{where}objective_history[{i}]' must be a pair "
                                 f"of numbers, got {_short(pair)}")
        out.append((float(pair[0]), float(pair[1])))
    return list(history), out


def _params_field(meta):
    params = _get(meta, "params", "", (dict,), "an object of settings")
    layers = params.get("layers")
    if isinstance(layers, list):
        try:
            params = dict(params, layers=list(resolve_layers(layers)))
        except (TypeError, ValueError) as exc:
            raise _MetadataError(f"the field 'params.layers' is invalid: {exc}") from None
    elif layers is not None and not isinstance(layers, str):
        raise _MetadataError(f"the field 'params.layers' must be a preset name or a list of "
                             f"layers, got {_short(layers)}")
    return dict(params)


def _saved_fitted(meta):
    """The checked ``fitted`` record of a saved model."""
    node = _get(meta, "fitted", "", (dict,), "an object")
    w = "fitted."
    history, objective_history = _history_fields(node, w)
    fitted = {"input_shape": _shape_field(node, "input_shape", w),
              "n_iter": _int_field(node, "n_iter", w),
              "history": history, "objective_history": objective_history,
              "validation_score": _number_field(node, "validation_score", w, optional=True),
              "best_iteration": _int_field(node, "best_iteration", w),
              "converged": _get(node, "converged", w, (bool,), "true or false")}
    for name in ("algorithm", "top", "n_classes", "dtype"):
        fitted[name] = node.get(name)
    layers = _get(node, "layers", w, (list,), "a list of layers")
    try:
        fitted["layers"] = resolve_layers(layers)
    except (TypeError, ValueError) as exc:
        raise _MetadataError(f"the field 'fitted.layers' is invalid: {exc}") from None
    return fitted


def _checkpoint_state(meta, for_resume=False):
    """The checked ``checkpoint`` record of a training checkpoint (the fields that loading
    reads; with ``for_resume`` also those that resuming reads)."""
    node = _get(meta, "checkpoint", "", (dict,), "an object")
    w = "checkpoint."
    history, objective_history = _history_fields(node, w)
    state = {"input_shape": _shape_field(node, "input_shape", w),
             "epoch": _int_field(node, "epoch", w),
             "history": history, "objective_history": objective_history,
             "best_score": _number_field(node, "best_score", w, optional=True),
             "best_epoch": _int_field(node, "best_epoch", w),
             "converged": _get(node, "converged", w, (bool,), "true or false"),
             "has_best": (_get(node, "has_best", w, (bool,), "true or false")
                          if "has_best" in node else False)}
    if for_resume:
        state.update(seed=_int_field(node, "seed", w), step=_int_field(node, "step", w),
                     no_improve=_int_field(node, "no_improve", w),
                     adam_t=_int_field(node, "adam_t", w),
                     data=_data_field(node, w))
    return state


def _data_field(node, where):
    """The identity of the training data a checkpoint records (None: not recorded)."""
    if node.get("data") is None:
        return None
    data = _get(node, "data", where, (dict,), "an object")
    w = where + "data."
    shape = _get(data, "shape", w, (list,), "a list of integers")
    return {"n_samples": _int_field(data, "n_samples", w),
            "shape": [_check_field_int(v, f"{w}shape[{i}]") for i, v in enumerate(shape)],
            "x_sha256": _get(data, "x_sha256", w, (str,), "a hex digest"),
            "y_sha256": _get(data, "y_sha256", w, (str,), "a hex digest")}


# --------------------------------------------------------------------------------------------
# the identity of the training data (refuses to resume a run on other data)


def _data_identity(X, yidx):
    """Size, shape and sha256 of the (checked) images and labels of a run."""
    return {"n_samples": int(X.shape[0]), "shape": [int(s) for s in X.shape],
            "x_sha256": hashlib.sha256(memoryview(np.ascontiguousarray(X)).cast("B"))
            .hexdigest(),
            "y_sha256": hashlib.sha256(np.ascontiguousarray(yidx, np.int64).tobytes())
            .hexdigest()}


def _data_differences(recorded, given):
    """What differs between the data a checkpoint was trained on and the data given."""
    out = []
    if recorded["n_samples"] != given["n_samples"]:
        out.append(f"{recorded['n_samples']} samples, not {given['n_samples']}")
    elif list(recorded["shape"]) != list(given["shape"]):
        out.append(f"X of shape {tuple(recorded['shape'])}, not {tuple(given['shape'])}")
    elif recorded["x_sha256"] != given["x_sha256"]:
        out.append("the images X differ (sha256)")
    if recorded["n_samples"] == given["n_samples"] and recorded["y_sha256"] != given["y_sha256"]:
        out.append("the labels y differ (sha256: other labels or another labeled subset)")
    return out


def _build_network(layers, input_shape, n_classes, backend, algorithm, top):
    matching = "normalized" if algorithm == "em" else "tied"
    return Network(layers, input_shape, n_classes, backend, matching, top)


def _n_of(X):
    return np.shape(X)[0]


def _validation_split(yidx, n_classes, fraction, seed):
    """(train, validation) sample indices: ``fraction`` of each class's labeled samples
    (rounded, at least one where a class has two or more) held out, chosen by the seed."""
    n = yidx.shape[0]
    everything = np.arange(n)
    if fraction <= 0:
        return everything, everything[:0]
    rng = np.random.default_rng([seed, 1])
    held = []
    for c in range(n_classes):
        members = np.flatnonzero(yidx == c)
        if members.size < 2:
            continue
        take = max(1, int(round(fraction * members.size)))
        held.append(rng.permutation(members)[:take])
    if not held:
        return everything, everything[:0]
    val = np.sort(np.concatenate(held))
    keep = np.ones(n, bool)
    keep[val] = False
    return everything[keep], val


def _param_arrays(p):
    out = {}
    for name, value in p.items():
        out[name] = np.asarray(value)
    return out


def _expected_shapes(net):
    shapes = {}
    for l, layer in enumerate(net.layers):
        k, c = layer.n_templates, net.shapes[l].channels_in
        shapes[f"W{l}"] = (k, c, *layer.kernel_size)
        shapes[f"b{l}"] = (k,)
        shapes[f"switch_prior{l}"] = (k,)
        shapes[f"translation_prior{l}"] = (layer.window[0] * layer.window[1],)
    k_top = net.feature_size
    shapes.update({"noise_variance": (net.n_layers,), "mu": (net.n_classes, k_top),
                   "beta": (net.n_classes,), "class_prior": (net.n_classes,),
                   "top_noise_variance": (), "class_scale": ()})
    return shapes


def _params_from_arrays(arrays, net, dtype):
    """The parameter dict from saved arrays, every name, shape and value checked.

    Values are checked in the dtype the model computes with (a float64 1e300 is finite, its
    float32 cast is not): every value finite, every probability in (0, 1] (and each
    distribution summing to 1), every variance and the class scale > 0."""
    p = {}
    for name, shape in _expected_shapes(net).items():
        if name not in arrays:
            raise ValueError(f"the array {name!r} is missing")
        arr = np.asarray(arrays[name])
        if arr.shape != shape:
            raise ValueError(f"the array {name!r} has shape {arr.shape}, expected {shape}")
        if arr.dtype.kind != "f":
            raise ValueError(f"the array {name!r} has dtype {arr.dtype}, expected floats")
        trainable = name[:1] in "Wb" and name[1:].isdigit() or name in ("mu", "beta")
        with np.errstate(over="ignore"):
            p[name] = np.array(arr, dtype if trainable else np.float64)
        _check_parameter_values(name, p[name])
    return p


#: distributions: each array's entries are probabilities summing to 1
_DISTRIBUTIONS = ("translation_prior", "class_prior")
#: arrays of probabilities, one per unit
_PROBABILITIES = ("switch_prior",)
#: arrays that must be > 0
_POSITIVE = ("noise_variance", "top_noise_variance", "class_scale")


def _check_parameter_values(name, value):
    """Refuse a parameter whose values no fitted model holds (ValueError naming it)."""
    stem = name.rstrip("0123456789")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"the array {name!r} holds NaN or infinity (in {value.dtype})")
    if stem in _DISTRIBUTIONS + _PROBABILITIES and not np.all((value > 0) & (value <= 1)):
        raise ValueError(f"the array {name!r} holds probabilities outside (0, 1]")
    if stem in _DISTRIBUTIONS and abs(float(np.sum(value)) - 1.0) > 1e-6 * max(value.size, 1):
        raise ValueError(f"the array {name!r} is a distribution but sums to "
                         f"{float(np.sum(value))!r}, not 1")
    if stem in _POSITIVE and not np.all(value > 0):
        raise ValueError(f"the array {name!r} must be > 0")


def _check_input_scale(X, name="X"):
    """Refuse images so large that a sample's squared norm (the reconstruction term, the
    Gram matrices) overflows the working dtype, before any training: the failure would
    otherwise come later as a diverging loss that points at the learning rate."""
    peak = float(np.max(np.abs(X))) if X.size else 0.0
    finfo = np.finfo(X.dtype)
    size = float(np.prod(X.shape[1:]))
    # a margin of 1e6 for the sums over a batch and the products with the templates
    limit = float(np.sqrt(float(finfo.max) / 1e6 / size))
    if peak > limit:
        raise ValueError(f"{name} holds values up to {peak:.3g}: too large for {X.dtype} "
                         f"arithmetic (the squared norm of an image overflows above about "
                         f"{limit:.3g}); rescale X, e.g. to [0, 1]")


def _check_checkpoint_path(checkpoint):
    """A checkpoint path that a training run can write (checked before the first epoch):
    not a directory, not a special file, in an existing writable directory."""
    path = os.path.abspath(os.fspath(checkpoint))
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {checkpoint!s} is a directory; give the path of a file "
                         "to write")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"checkpoint {checkpoint!s} exists and is not a regular file")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(f"checkpoint {checkpoint!s}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"checkpoint {checkpoint!s}: the directory {parent} is not writable")


class _Run:
    """One training run: the loop over epochs, validation, checkpoints and progress."""

    def __init__(self, model, net, weights, seed, X, yidx, train, val):
        self.model, self.net, self.weights, self.seed = model, net, weights, seed
        self.X, self.yidx, self.train, self.val = X, yidx, train, val
        self.validation_size = int(val.size)
        self.params = None
        self.optimizer = None
        # the EG steps' intermediates reuse one step's memory (see kernels/buffers.py)
        self.step_buffers = StepBuffers()
        self.epoch = 0
        self.step = 0
        self.history = []
        self.objective_history = []
        self.best_params = None
        self.best_score = None
        self.best_epoch = 0
        self.no_improve = 0
        self.converged = False
        self.verbose = int(model.verbose)
        self.callback = None
        self.data_identity = None

    # -------------------------------------------------------------------------------- state

    def restore(self, state):
        self.params = state["params"]
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.objective_history = [tuple(t) for t in state["objective_history"]]
        self.best_score = state["best_score"]
        self.best_epoch = int(state["best_epoch"])
        self.no_improve = int(state["no_improve"])
        self.converged = bool(state["converged"])
        self.best_params = state.get("best_params")
        if self.model.algorithm == "eg":
            self.optimizer = self.model._optimizer(self.net, self.params)
            self.optimizer.load_state(state["arrays"], state["adam_t"])

    def save_checkpoint(self):
        path = self.model.checkpoint
        if path is None:
            return
        arrays = _param_arrays(self.params)
        if self.best_params is not None:
            arrays.update({f"best.{k}": v for k, v in _param_arrays(self.best_params).items()})
        if self.optimizer is not None:
            arrays.update(self.optimizer.state_arrays())
        state = {
            "seed": self.seed, "epoch": self.epoch, "step": self.step,
            "input_shape": list(self.net.input_shape), "history": self.history,
            "objective_history": [list(t) for t in self.objective_history],
            "best_score": self.best_score, "best_epoch": self.best_epoch,
            "no_improve": self.no_improve, "converged": self.converged,
            "has_best": self.best_params is not None,
            "adam_t": 0 if self.optimizer is None else self.optimizer.t,
            "data": self.data_identity,
        }
        meta = {"model_class": "DRMM", "params": self.model._serial_params(),
                "checkpoint": state}
        io.save_arrays(path, arrays, meta)

    # -------------------------------------------------------------------------------- loop

    def warm_up(self):
        """Run every kind of kernel call of an epoch once on a tiny batch (two samples, a
        labeled and an unlabeled one where there are both) so that the kernels compile (or
        load from Numba's disk cache) before the first epoch and the epoch times measure
        training. Kernels specialise on dtypes, dimensions and layouts, not on sizes, so a
        tiny batch of the run's dtype compiles what the epochs use. Works on copies: the
        run's parameters, optimizer and random streams are untouched."""
        labeled = self.train[self.yidx[self.train] >= 0][:1]
        unlabeled = self.train[self.yidx[self.train] < 0][:1]
        rows = np.sort(np.concatenate([labeled, unlabeled]))
        if rows.size < 2:
            rows = self.train[:2]
        if rows.size == 0:
            return 0.0
        model, net = self.model, self.net
        params = {k: np.copy(v) for k, v in self.params.items()}
        x, yidx = self.X[rows], self.yidx[rows]
        with CompileClock(_announcer(self.verbose)) as clock, np.errstate(all="ignore"):
            if model.algorithm == "eg":
                _, _, grads, _ = eg_loss_and_grads(net, params, x, yidx, self.weights,
                                                   buffers=StepBuffers())
                optimizer = model._optimizer(net, params)
                optimizer.step(params, grads, 1e-12, float(model.weight_decay))
                params = {k: np.copy(v) for k, v in self.params.items()}
            # validation and inference; the E-step (EM, and the priors refitted after EG)
            net.bottom_up(params, x)
            _em.e_step(net, params, x, yidx, 1.0, _em.Statistics(net), True)
        if clock.seconds > 0.5:
            _say(f"kernels ready in {clock.seconds:.1f} s", self.verbose)
        return clock.seconds

    def loop(self):
        model = self.model
        if model.algorithm == "eg" and self.optimizer is None:
            self.optimizer = model._optimizer(self.net, self.params)
        if self.epoch < int(model.max_iter) and not self.converged:
            self.warm_up()
        while self.epoch < int(model.max_iter) and not self.converged:
            tic = time.perf_counter()
            with CompileClock(_announcer(self.verbose)) as clock:
                if model.algorithm == "eg":
                    record = self.eg_epoch(self.epoch)
                else:
                    record = self.em_iteration()
            self.epoch += 1
            record["epoch"] = self.epoch
            if self.validation_size:
                score = self.validation_accuracy(self.params)
                record["validation_accuracy"] = score
                if self.best_score is None or score > self.best_score:
                    self.best_score, self.best_epoch = score, self.epoch
                    self.best_params = {k: np.copy(v) for k, v in self.params.items()}
                    self.no_improve = 0
                else:
                    self.no_improve += 1
                if model.n_iter_no_change is not None and self.no_improve >= int(
                        model.n_iter_no_change):
                    self.converged = True
            record["time"] = time.perf_counter() - tic
            if clock.seconds > 0.05:  # a kernel first used in this epoch (said, not hidden)
                record["compile_time"] = clock.seconds
            if self.callback is not None:
                extra = self.callback(self.snapshot(), record)
                if isinstance(extra, dict):
                    record.update(extra)
            self.history.append(record)
            _say(_epoch_line(record, int(model.max_iter)), self.verbose)
            self.save_checkpoint()

    def snapshot(self):
        """A fitted copy of the model holding the current parameters."""
        return clone(self.model)._set_fitted(
            self.net, self.params, n_iter=self.epoch, history=self.history,
            objective_history=self.objective_history, validation_score=self.best_score,
            best_iteration=self.epoch, converged=self.converged)

    def validation_accuracy(self, params):
        correct = 0
        for sl in _batches(self.val.size, INFERENCE_BATCH):
            rows = self.val[sl]
            fw = self.net.bottom_up(params, self.X[rows])
            correct += int(np.sum(np.asarray(fw.scores).argmax(axis=1) == self.yidx[rows]))
        return correct / self.val.size

    # -------------------------------------------------------------------------------- EG

    def _eg_steps(self, epoch):
        """The sample indices of every step of this epoch (seeded by (seed, epoch))."""
        rng = np.random.default_rng([self.seed, 2, epoch])
        bs = int(self.model.batch_size)
        labeled = self.train[self.yidx[self.train] >= 0]
        unlabeled = self.train[self.yidx[self.train] < 0]
        if labeled.size and unlabeled.size:
            order_u = rng.permutation(unlabeled)
            lb = min(bs, labeled.size)
            n_steps = -(-order_u.size // bs)
            cycle = np.concatenate([rng.permutation(labeled)
                                    for _ in range(-(-n_steps * lb // labeled.size))])
            return [np.concatenate([order_u[i * bs:(i + 1) * bs], cycle[i * lb:(i + 1) * lb]])
                    for i in range(n_steps)]
        order = rng.permutation(self.train)
        return [order[i:i + bs] for i in range(0, order.size, bs)]

    def _eg_inputs(self, rows):
        """One step's input and consistency targets. With ``translation`` > 0 every image is
        shifted by a translation nuisance drawn uniformly from [-t, t]^2 (seeded by the step);
        the targets are the class posteriors of the unshifted unlabeled images (under the
        moving average of the parameters when ``teacher_decay`` > 0)."""
        x = self.X[rows]
        t = int(self.model.translation)
        targets = None
        unlabeled = self.yidx[rows] < 0
        if self.weights.consistency and unlabeled.any():
            fw = self.net.bottom_up(self.optimizer.averaged(self.params), x[unlabeled])
            targets = softmax(np.asarray(fw.scores, np.float64))
            threshold = float(self.model.confidence_threshold)
            if threshold:  # the E-step's class where it is confident, nothing elsewhere
                best = targets.argmax(axis=1)
                sure = targets[np.arange(best.size), best] >= threshold
                targets = np.zeros_like(targets)
                targets[np.flatnonzero(sure), best[sure]] = 1.0
        if t:
            rng = np.random.default_rng([self.seed, 3, self.step])
            x = translate(x, rng.integers(-t, t + 1, size=(x.shape[0], 2)))
        return x, targets

    def eg_epoch(self, epoch, constant_rate=False):
        model = self.model
        steps = self._eg_steps(epoch)
        total_steps = len(steps) * int(model.max_iter)
        sums = {}
        bar = _progress(len(steps), f"epoch {epoch + 1}", self.verbose)
        try:
            for rows in steps:
                rows = np.sort(rows)
                lr = (float(model.learning_rate) if constant_rate else learning_rate(
                    float(model.learning_rate), model.lr_schedule, self.step, total_steps))
                x, targets = self._eg_inputs(rows)
                loss, terms, grads, _ = eg_loss_and_grads(self.net, self.params, x,
                                                          self.yidx[rows], self.weights,
                                                          targets=targets,
                                                          buffers=self.step_buffers)
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"the EG loss became {loss} at step {self.step}; lower learning_rate")
                self.optimizer.step(self.params, grads, lr, float(model.weight_decay))
                self.step += 1
                terms["loss"] = loss
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value
                bar.update(1)
                bar.set_postfix({k: f"{v / max(_bar_count(bar), 1):.4g}" for k, v in sums.items()
                                 if k in ("loss", "xent", "reconstruction")}, refresh=False)
        finally:
            bar.close()
        record = {name: value / max(len(steps), 1) for name, value in sums.items()}
        record["learning_rate"] = lr if steps else float(model.learning_rate)
        return record

    # -------------------------------------------------------------------------------- EM

    def em_statistics(self, rows=None, layers=True):
        rows = self.train if rows is None else rows
        stats = _em.Statistics(self.net)
        bar = _progress(-(-rows.size // INFERENCE_BATCH), "E-step", self.verbose)
        try:
            for sl in _batches(rows.size, INFERENCE_BATCH):
                chunk = rows[sl]
                _em.e_step(self.net, self.params, self.X[chunk], self.yidx[chunk],
                           float(self.model.unlabeled_weight), stats, layers)
                bar.update(1)
        finally:
            bar.close()
        if not stats.weight > 0:
            raise ValueError("unlabeled_weight=0 and no labeled samples: nothing to fit")
        return stats

    def em_iteration(self):
        model = self.model
        ridge = float(model.ridge)
        stats = self.em_statistics()
        before = _em.objective(self.net, self.params, stats, ridge)
        generative = model.bias == "generative"
        fitted = _em.m_step(self.net, self.params, stats, ridge, generative)
        after = _em.objective(self.net, fitted, stats, ridge)
        self.params = _em.normalize_templates(self.net, fitted, generative)
        # the M-step moved the codes the class templates were fitted to: refit the top to
        # the new codes (on a subsample) so that validation and the next E-step's class
        # choices read consistent parameters
        self.params = self.refit_priors(self.params, top=True, only_top=True)
        if self.objective_history and abs(before - self.objective_history[-1][0]) < float(
                model.tol):
            self.converged = True
        self.objective_history.append((before, after))
        return {"objective": before, "objective_after_m_step": after}

    def refit_priors(self, params, top=False, only_top=False):
        """The parameters with the generative priors and noise variances refitted from the
        E-step's choices on up to PRIOR_SAMPLES training samples, layer templates and biases
        unchanged. ``top``: also refit the class templates and class scores (after EM, whose
        last M-step moved the codes the class templates were fitted to)."""
        rng = np.random.default_rng([self.seed, 3])
        rows = np.sort(rng.permutation(self.train)[:PRIOR_SAMPLES])
        saved, self.params = self.params, params
        try:
            stats = self.em_statistics(rows, layers=not only_top)
        finally:
            self.params = saved
        out = dict(params)
        if only_top:  # the top's statistics only: no Gram matrices
            out.update(_em.fit_top(self.net, params, stats))
            return out
        fitted = _em.m_step(self.net, params, stats, float(self.model.ridge), top)
        for name in fitted:
            if name.startswith(("switch_prior", "translation_prior")) or name in (
                    "class_prior", "top_noise_variance"):
                out[name] = fitted[name]
        # the residual variance of the current templates (not of the refitted ones)
        s2 = []
        for l in range(self.net.n_layers):
            D = float(np.prod(self.net.shapes[l].input_hw)) * self.net.shapes[l].channels_in
            rss = _em._rss(stats, l, np.asarray(params[f"W{l}"], np.float64))
            s2.append(max(rss / (stats.weight * D), 1e-12))
        out["noise_variance"] = np.array(s2)
        mu = np.asarray(params["mu"], np.float64)
        D_top = float(self.net.feature_size * self.net.top_positions)
        out["top_noise_variance"] = np.float64(
            max(_em._top_rss(stats, self.net, mu) / (stats.weight * D_top), 1e-12))
        if top:
            for name in ("mu", "top_noise_variance", "class_scale", "beta"):
                out[name] = fitted[name]
        return out


def _bar_count(bar):
    return getattr(bar, "n", 1)


def _epoch_line(record, total):
    parts = [f"epoch {record['epoch']}/{total}"]
    for key in ("loss", "xent", "reconstruction", "entropy", "nonnegativity", "objective"):
        if key in record:
            parts.append(f"{key} {record[key]:.5g}")
    if "validation_accuracy" in record:
        parts.append(f"val acc {record['validation_accuracy']:.4f}")
    parts.append(f"{record.get('time', 0.0):.1f} s")
    if record.get("compile_time"):
        parts.append(f"(of which {record['compile_time']:.1f} s compiling kernels)")
    return "  ".join(parts)
