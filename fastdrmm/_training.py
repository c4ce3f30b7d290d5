"""The DRMM's training run: one loop over epochs, with EG and EM as its two strategies.

:class:`Training` owns what every run does around an epoch, once: the validation score and
early stopping (the best parameters kept), the callback, the checkpoint after every epoch,
the progress and epoch lines, and the warm-up that compiles the kernels first. What an epoch
*is* comes from a strategy (scikit-learn's template method, as ``BaseMixture`` owns the EM
loop of its subclasses): :class:`EG` runs one pass of minibatch Adam on the EG objective,
:class:`EM` one hard-EM iteration (E-step over the training samples, closed-form M-step);
each returns the epoch's record. The model and its objectives are described in
:mod:`fastdrmm.drmm`.
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import clone

from . import _em, _em_topdown, _top, ops
from ._amplitudes import refine_codes
from ._checkpoint import write_checkpoint
from ._compiling import CompileClock
from ._latents import LatentStore, better_latents
from ._network import eg_loss_and_grads, softmax, trainable_names, translate
from ._optim import Adam, learning_rate
from ._progress import announcer, bar_count, batches, progress_bar, say
from .kernels.buffers import StepBuffers

__all__ = ["Training", "Strategy", "EG", "EM", "INFERENCE_BATCH", "PRIOR_SAMPLES",
           "initial_parameters", "validation_split", "check_input_scale"]

#: samples per batch of every inference pass (bounded memory whatever N is)
INFERENCE_BATCH = 512
#: samples used to refit the generative priors after EG
PRIOR_SAMPLES = 2000


class Training:
    """One training run of ``model`` (whose settings it reads) on the checked images ``X``
    and labels ``yidx`` (-1: unlabeled), split into ``train`` and ``val`` sample indices,
    with the network ``net``, the EG terms' ``weights`` and the run's ``seed``."""

    def __init__(self, model, net, weights, seed, X, yidx, train, val, *, callback=None,
                 data_identity=None):
        self.model, self.net, self.weights, self.seed = model, net, weights, seed
        self.X, self.yidx, self.train, self.val = X, yidx, train, val
        self.validation_size = int(val.size)
        self.strategy = EG() if model.algorithm == "eg" else EM()
        self.params = None
        self.epoch = 0
        self.step = 0
        self.history = []
        self.objective_history = []
        self.best_params = None
        #: every training sample's latents, kept between EM iterations (em_monotone)
        self.latents = None
        self.best_score = None
        self.best_epoch = 0
        self.no_improve = 0
        self.converged = False
        self.verbose = int(model.verbose)
        #: called after every epoch as callback(snapshot, record) (see DRMM.fit)
        self.callback = callback
        #: the identity of the training data, recorded in the checkpoint
        self.data_identity = data_identity

    # -------------------------------------------------------------------------------- state

    def restore(self, state):
        """Continue from a checkpoint's state (see :func:`fastdrmm._checkpoint.read_checkpoint`)."""
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
        self.latents = LatentStore.from_arrays(self.net, self.train.size,
                                               np.asarray(self.params["W0"]).dtype,
                                               state.get("arrays", {}))
        self.strategy.restore(self, state)

    def save_checkpoint(self):
        if self.model.checkpoint is not None:
            write_checkpoint(self, self.model.checkpoint)

    def snapshot(self):
        """A fitted copy of the model holding the current parameters."""
        return clone(self.model)._set_fitted(
            self.net, self.params, n_iter=self.epoch, history=self.history,
            objective_history=self.objective_history, validation_score=self.best_score,
            best_iteration=self.epoch, converged=self.converged)

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
        x, yidx = self.X[rows], self.yidx[rows]
        with CompileClock(announcer(self.verbose)) as clock, np.errstate(all="ignore"):
            self.strategy.warm_up(self, x, yidx)
            # validation and inference; the E-step (EM, and the priors refitted after EG)
            params = {k: np.copy(v) for k, v in self.params.items()}
            self.net.bottom_up(params, x)
            _em.e_step(self.net, params, x, yidx, 1.0, _em.Statistics(self.net), True)
        if clock.seconds > 0.5:
            say(f"kernels ready in {clock.seconds:.1f} s", self.verbose)
        return clock.seconds

    def loop(self):
        """Run epochs until ``max_iter``, early stopping or the strategy's convergence.
        ``max_iter`` is read from the model before each epoch (a callback may change it)."""
        self.strategy.start(self)
        if self.epoch < int(self.model.max_iter) and not self.converged:
            self.warm_up()
        while self.epoch < int(self.model.max_iter) and not self.converged:
            tic = time.perf_counter()
            with CompileClock(announcer(self.verbose)) as clock:
                record = self.strategy.epoch(self)
            self.epoch += 1
            record["epoch"] = self.epoch
            if self.validation_size:
                self._validate(record)
            record["time"] = time.perf_counter() - tic
            if clock.seconds > 0.05:  # a kernel first used in this epoch (said, not hidden)
                record["compile_time"] = clock.seconds
            if self.callback is not None:
                extra = self.callback(self.snapshot(), record)
                if isinstance(extra, dict):
                    record.update(extra)
            self.history.append(record)
            say(_epoch_line(record, int(self.model.max_iter)), self.verbose)
            self.save_checkpoint()

    def _validate(self, record):
        """Score the epoch on the held-out samples; keep the best parameters; stop early."""
        score = self.validation_accuracy(self.params)
        record["validation_accuracy"] = score
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            self.best_params = {k: np.copy(v) for k, v in self.params.items()}
            self.no_improve = 0
        else:
            self.no_improve += 1
        patience = self.model.n_iter_no_change
        if patience is not None and self.no_improve >= int(patience):
            self.converged = True

    def validation_accuracy(self, params):
        correct = 0
        for sl in batches(self.val.size, INFERENCE_BATCH):
            rows = self.val[sl]
            fw = self.net.bottom_up(params, self.X[rows])
            correct += int(np.sum(np.asarray(fw.scores).argmax(axis=1) == self.yidx[rows]))
        return correct / self.val.size

    # -------------------------------------------------------------------------------- E-step

    def em_statistics(self, params, rows=None, layers=True, features=None, keep=False):
        """The E-step's statistics of ``params`` on the samples ``rows`` (default: the
        training samples); ``layers=False``: the top's only. ``features``: keep every
        sample's top feature, which the shared-covariance top is fitted on (default: when
        ``layers`` is False). ``keep`` (the training samples): each sample takes the better
        of its fresh and its kept latents, which are then kept (the monotone E-step)."""
        rows = self.train if rows is None else rows
        stats = _em.Statistics(self.net, features=not layers if features is None else features)
        if keep and self.latents is None:
            self.latents = LatentStore(self.net, rows.size, np.asarray(params["W0"]).dtype)
        # the amplitude steps and the threshold are EM's (EG's priors refit reads neither)
        em = self.net.matching == "normalized"
        steps = int(self.model.amplitude_steps) if em else 0
        threshold = float(self.model.confidence_threshold) if em else 0.0
        bar = progress_bar(-(-rows.size // INFERENCE_BATCH), "E-step", self.verbose)
        try:
            for sl in batches(rows.size, INFERENCE_BATCH):
                chunk = rows[sl]
                _em.e_step(self.net, params, self.X[chunk], self.yidx[chunk],
                           float(self.model.unlabeled_weight), stats, layers,
                           amplitude_steps=steps, threshold=threshold,
                           choose=self._chooser(params, sl) if keep else None)
                bar.update(1)
        finally:
            bar.close()
        if not stats.weight > 0:
            if threshold > 0:
                raise ValueError(f"confidence_threshold={threshold:g} left no sample with any "
                                 "weight (no labeled sample, no unlabeled one that sure): "
                                 "nothing to fit; lower it")
            raise ValueError("unlabeled_weight=0 and no labeled samples: nothing to fit")
        return stats

    def _chooser(self, params, positions):
        """The monotone E-step's choice for the training samples at ``positions``."""
        positions = np.arange(positions.start, positions.stop)
        steps = int(self.model.amplitude_steps)

        def choose(x, fresh):
            previous = self.latents.get(positions)
            chosen = fresh if previous is None else better_latents(
                self.net, params, x, fresh, previous, steps)[0]
            self.latents.put(positions, chosen)
            return chosen

        return choose

    def coherent_scale(self, params):
        """Per top feature, the least-squares factor from the bottom-up feature to the
        coherent code's (refined ``amplitude_steps`` steps) under ``params``, on up to
        INFERENCE_BATCH training samples (seeded); 1 where a feature is never on."""
        steps = int(self.model.amplitude_steps)
        if not steps:
            return np.ones(self.net.feature_size)
        rng = np.random.default_rng([self.seed, 4, self.epoch])
        rows = np.sort(rng.permutation(self.train)[:INFERENCE_BATCH])
        fw = self.net.bottom_up(params, self.X[rows])
        switches = [fw.switches(l, self.X.dtype) for l in range(self.net.n_layers)]
        coherent = self.net.top_feature(refine_codes(self.net, params, fw, switches, steps)[-1])
        f, r = np.asarray(fw.f, np.float64), np.asarray(coherent, np.float64)
        cross, square = np.einsum("nf,nf->f", f, r), np.einsum("nf,nf->f", f, f)
        ok = square > 0
        return np.where(ok, cross / np.where(ok, square, 1.0), 1.0)

    def fit_top(self, params, stats):
        """The top's entries fitted to ``stats`` (see :func:`fastdrmm._em.fit_top`)."""
        return _em.fit_top(self.net, params, stats, shrinkage=self.model.shrinkage,
                           threshold=float(self.model.confidence_threshold))

    def refit_top(self, params, rows=None):
        """The parameters with the top refitted to the bottom-up features of the samples
        ``rows`` (default: every training sample; the shared-covariance top needs them all,
        not a subsample)."""
        out = dict(params)
        out.update(self.fit_top(params, self.em_statistics(params, rows, layers=False)))
        return out

    def refit_priors(self, params, top=False, only_top=False):
        """The parameters with the generative priors and noise variances refitted from the
        E-step's choices on up to PRIOR_SAMPLES training samples, layer templates and biases
        unchanged. ``top``: also refit the class templates and class scores (after EM, whose
        last M-step moved the codes the class templates were fitted to)."""
        rng = np.random.default_rng([self.seed, 3])
        rows = np.sort(rng.permutation(self.train)[:PRIOR_SAMPLES])
        stats = self.em_statistics(params, rows, layers=not only_top)
        out = dict(params)
        if only_top:  # the top's statistics only: no Gram matrices
            out.update(self.fit_top(params, stats))
            return out
        # an EM model's top was fitted to every training sample after its last iteration;
        # the isotropic top (EG) is refitted here with the priors
        fitted = _em.m_step(self.net, params, stats, float(self.model.ridge), top,
                            top=top or self.net.matching != "normalized",
                            shrinkage=self.model.shrinkage)
        for name in fitted:
            if name.startswith(("switch_prior", "translation_prior")) or name in (
                    "class_prior", "top_noise_variance"):
                out[name] = fitted[name]
        out.update(_em.residual_variances(self.net, params, stats))
        if top:
            for name in ("mu", "top_noise_variance", "class_scale", "beta"):
                out[name] = fitted[name]
        return out


# --------------------------------------------------------------------------------------------
# the strategies: what one epoch is


class Strategy:
    """What one epoch is: :meth:`epoch` runs it on a :class:`Training` and returns its record
    (the loss terms or the objective); the other steps default to nothing to do."""

    #: the optimizer whose state a checkpoint keeps (None: the strategy has none)
    optimizer = None

    def start(self, run):
        """Prepare for the run's first epoch (after a restore too)."""

    def restore(self, run, state):
        """Take back the strategy's part of a checkpoint's state."""

    def warm_up(self, run, x, yidx):
        """Call, once on the tiny batch (x, yidx), the kernels only this strategy uses."""

    def epoch(self, run):
        raise NotImplementedError


class EG(Strategy):
    """Minibatch Adam on the EG objective; an epoch is one pass over the training samples
    (semi-supervised: over the larger of the labeled and unlabeled sets, the smaller cycled)."""

    def __init__(self):
        self.optimizer = None
        # the steps' intermediates reuse one step's memory (see kernels/buffers.py)
        self.buffers = StepBuffers()

    @staticmethod
    def new_optimizer(model, net, params):
        return Adam(params, trainable_names(net.n_layers),
                    average_decay=float(model.teacher_decay) if model.consistency_weight
                    else 0.0)

    def start(self, run):
        if self.optimizer is None:
            self.optimizer = self.new_optimizer(run.model, run.net, run.params)

    def restore(self, run, state):
        self.optimizer = self.new_optimizer(run.model, run.net, run.params)
        self.optimizer.load_state(state["arrays"], state["adam_t"])

    def warm_up(self, run, x, yidx):
        """One step on copies of the parameters with a fresh optimizer."""
        params = {k: np.copy(v) for k, v in run.params.items()}
        _, _, grads, _ = eg_loss_and_grads(run.net, params, x, yidx, run.weights,
                                           buffers=StepBuffers())
        optimizer = self.new_optimizer(run.model, run.net, params)
        optimizer.step(params, grads, 1e-12, float(run.model.weight_decay))

    def epoch(self, run, constant_rate=False):
        """Epoch ``run.epoch``: its steps, at the scheduled rate (or the constant base rate)."""
        model = run.model
        steps = self._steps(run)
        total_steps = len(steps) * int(model.max_iter)
        sums = {}
        bar = progress_bar(len(steps), f"epoch {run.epoch + 1}", run.verbose)
        try:
            for rows in steps:
                rows = np.sort(rows)
                lr = (float(model.learning_rate) if constant_rate else learning_rate(
                    float(model.learning_rate), model.lr_schedule, run.step, total_steps))
                x, targets = self._inputs(run, rows)
                loss, terms, grads, _ = eg_loss_and_grads(run.net, run.params, x,
                                                          run.yidx[rows], run.weights,
                                                          targets=targets, buffers=self.buffers)
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"the EG loss became {loss} at step {run.step}; lower learning_rate")
                self.optimizer.step(run.params, grads, lr, float(model.weight_decay))
                run.step += 1
                terms["loss"] = loss
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value
                bar.update(1)
                bar.set_postfix({k: f"{v / max(bar_count(bar), 1):.4g}" for k, v in sums.items()
                                 if k in ("loss", "xent", "reconstruction")}, refresh=False)
        finally:
            bar.close()
        record = {name: value / max(len(steps), 1) for name, value in sums.items()}
        record["learning_rate"] = lr if steps else float(model.learning_rate)
        return record

    @staticmethod
    def _steps(run):
        """The sample indices of every step of the epoch (seeded by (seed, epoch))."""
        rng = np.random.default_rng([run.seed, 2, run.epoch])
        bs = int(run.model.batch_size)
        labeled = run.train[run.yidx[run.train] >= 0]
        unlabeled = run.train[run.yidx[run.train] < 0]
        if labeled.size and unlabeled.size:
            order_u = rng.permutation(unlabeled)
            lb = min(bs, labeled.size)
            n_steps = -(-order_u.size // bs)
            cycle = np.concatenate([rng.permutation(labeled)
                                    for _ in range(-(-n_steps * lb // labeled.size))])
            return [np.concatenate([order_u[i * bs:(i + 1) * bs], cycle[i * lb:(i + 1) * lb]])
                    for i in range(n_steps)]
        order = rng.permutation(run.train)
        return [order[i:i + bs] for i in range(0, order.size, bs)]

    def _inputs(self, run, rows):
        """One step's input and consistency targets. With ``translation`` > 0 every image is
        shifted by a translation nuisance drawn uniformly from [-t, t]^2 (seeded by the step);
        the targets are the class posteriors of the unshifted unlabeled images (under the
        moving average of the parameters when ``teacher_decay`` > 0)."""
        x = run.X[rows]
        t = int(run.model.translation)
        targets = None
        unlabeled = run.yidx[rows] < 0
        if run.weights.consistency and unlabeled.any():
            fw = run.net.bottom_up(self.optimizer.averaged(run.params), x[unlabeled])
            targets = softmax(np.asarray(fw.scores, np.float64))
            threshold = float(run.model.confidence_threshold)
            if threshold:  # the E-step's class where it is confident, nothing elsewhere
                best = targets.argmax(axis=1)
                sure = targets[np.arange(best.size), best] >= threshold
                targets = np.zeros_like(targets)
                targets[np.flatnonzero(sure), best[sure]] = 1.0
        if t:
            rng = np.random.default_rng([run.seed, 3, run.step])
            x = translate(x, rng.integers(-t, t + 1, size=(x.shape[0], 2)))
        return x, targets


class EM(Strategy):
    """Hard EM; an epoch is one iteration: the E-step over the training samples, the
    closed-form M-step, the templates normalised and the top refitted to the new codes (the
    E-step that Training.warm_up runs calls every kernel of an iteration)."""

    def start(self, run):
        """Semi-supervised, before the first iteration: the top fitted to the labeled
        samples, so that the first E-step chooses the unlabeled samples' classes with the
        labels' classifier rather than the initial class means (self-training from those
        collapsed: 0.45 held-out accuracy on digits with 20 labels per class, against 0.95
        from the labels alone)."""
        if run.epoch or run.net.matching != "normalized":
            return
        labeled = run.train[run.yidx[run.train] >= 0]
        if labeled.size and labeled.size < run.train.size:
            run.params = run.refit_top(run.params, labeled)

    def epoch(self, run):
        model = run.model
        ridge = float(model.ridge)
        monotone = bool(model.em_monotone)
        stats = run.em_statistics(run.params, keep=monotone)
        before = _em.objective(run.net, run.params, stats, ridge)
        layers_before = _em.objective(run.net, run.params, stats, ridge, top=False)
        generative = model.bias == "generative"
        # the top is refitted below, to the features of the new templates
        fitted = _em.m_step(run.net, run.params, stats, ridge, generative, top=False,
                            reseed=not monotone)
        if model.em_targets == "top-down":
            fitted = _em_topdown.m_step(run, run.params, fitted, stats)
        after = _em.objective(run.net, fitted, stats, ridge)
        layers_after = _em.objective(run.net, fitted, stats, ridge, top=False)
        # the monotone E-step compares latents in the units of the kept codes: no rescaling
        run.params = fitted if monotone else _em.normalize_templates(run.net, fitted,
                                                                     generative)
        # the M-step moved the codes the class templates were fitted to: refit the top to
        # the new codes so that validation and the next E-step's class choices read
        # consistent parameters
        run.params = run.refit_top(run.params)
        if "top_covariance" in run.params:
            run.params = _top.in_code_units(run.params, run.coherent_scale(run.params))
        if run.objective_history and abs(before - run.objective_history[-1][0]) < float(
                model.tol):
            run.converged = True
        run.objective_history.append((before, after))
        return {"objective": before, "objective_after_m_step": after,
                "layer_objective": layers_before, "layer_objective_after_m_step": layers_after}

    @staticmethod
    def stepwise(run, previous, t):
        """One stepwise-EM update (``partial_fit``): the statistics of the run's samples
        blended into the running ones (``previous``, None at first) with weight
        (t + 2)^-0.7; sets the run's parameters and returns the blended statistics."""
        model = run.model
        stats = run.em_statistics(run.params, features=True)
        stats = stats.scaled(1.0 / stats.weight)
        eta = (t + 2.0) ** -0.7
        if previous is not None:
            stats = previous.scaled(1 - eta).add(stats.scaled(eta))
        generative = model.bias == "generative"
        run.params = _em.normalize_templates(run.net, _em.m_step(
            run.net, run.params, stats, float(model.ridge), generative,
            shrinkage=model.shrinkage, threshold=float(model.confidence_threshold)),
            generative)
        if "top_covariance" in run.params:  # the top in the coherent codes' units, as fit's
            run.params = _top.in_code_units(run.params, run.coherent_scale(run.params))
        return stats


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


# --------------------------------------------------------------------------------------------
# the run's inputs: its data split, its scale, its starting parameters


def validation_split(yidx, n_classes, fraction, seed):
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


def check_input_scale(X, name="X"):
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


def initial_parameters(net, X, yidx, seed, init, dtype, backend):
    """The starting parameters: random (He) templates (``init="he"``), or templates drawn
    from the data's patches layer by layer with generative biases and class means
    (``"patches"``); seeded by (seed, 0)."""
    rng = np.random.default_rng([seed, 0])
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
                                         padding=layer.padding, pool=layer.window,
                                         leak=layer.leak, backend=backend)
    p["noise_variance"] = np.array(p["noise_variance"], np.float64)
    p.update(_initial_top(net, rng, h, yidx[sample], init, dtype))
    return p


def _initial_top(net, rng, h, ys, init, dtype):
    """The class templates, scores and priors to start from (``h``: the sample's top code)."""
    k_top, n_cls = net.feature_size, net.n_classes
    p = {"class_prior": np.full(n_cls, 1.0 / n_cls)}
    if init == "he":
        p["mu"] = (rng.standard_normal((n_cls, k_top)) / np.sqrt(k_top)).astype(dtype)
        p["beta"] = np.zeros(n_cls, dtype)
        p["top_noise_variance"] = np.float64(net.top_positions)
        p["class_scale"] = np.float64(1.0)
        return p
    f = np.asarray(net.top_feature(h), np.float64)
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
