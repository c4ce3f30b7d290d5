"""The shallow RMM's EM mathematics: the E-step, the closed-form M-step, the re-seeding of
empty templates and the EM loop of one initialisation (the k-means++ initialisation is in
:mod:`fastdrmm._rmm_init`).

The model and its formulas are in :mod:`fastdrmm.rmm`'s docstring. The matches of all samples
against all templates come from :func:`fastdrmm.ops.match_switch_pool` and the M-step's
weighted sums from :func:`fastdrmm.ops.template_stats`; every per-sample quantity is computed
chunk by chunk (:func:`chunks`), so that memory stays bounded whatever N is.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
from scipy.special import expit

from . import ops
from ._progress import batches, say

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
# small numerical helpers


def floor_probs(p):
    p = np.maximum(np.asarray(p, np.float64), PROB_FLOOR)
    return p / p.sum()


def clip_switch(p):
    return float(np.clip(p, PROB_FLOOR, 1.0 - PROB_FLOOR))


def logsumexp_rows(t):
    """Row-wise log-sum-exp of a 2-d array with at least one finite entry per row."""
    m = t.max(axis=1)
    with np.errstate(under="ignore"):
        return m + np.log(np.exp(t - m[:, None]).sum(axis=1))


def chunks(n, width):
    """Slices of ``range(n)`` whose (chunk, width) float64 arrays stay within the budget."""
    return batches(n, max(1, _CHUNK_ELEMENTS // max(1, width)))


class Params:
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
        return Params(**values)


class Data(NamedTuple):
    """The training data in working form."""

    X: np.ndarray  # (N, D) float64
    yidx: np.ndarray  # (N,) class index of each sample, -1 where unlabeled
    weights: np.ndarray  # (N,) 1 for labeled samples, unlabeled_weight for the others
    total: float  # weights.sum() > 0
    s2_floor: float  # the smallest noise variance, relative to the data's scale


class Settings(NamedTuple):
    """The hyper-parameters the EM steps read."""

    inference: str  # "soft" or "hard"
    reg: float  # as given: a NumPy float32 keeps its type (and its rounding) in the sums
    backend: str


class Result(NamedTuple):
    """The end of one EM run."""

    objective: float  # the mean objective at ``params``
    params: Params
    bounds: list  # the mean objective after each iteration
    n_iter: int
    converged: bool


# --------------------------------------------------------------------------------------------
# matches and scores via fastdrmm.ops


def matches(X, params, leak, backend):
    """z[n, k] = <w_k, x_n> + b_k switched with slope ``leak`` (1: z, 0: ReLU(z))."""
    s2 = params.s2
    mu = params.mu
    shape4 = params.shape4
    weights = (mu / s2).reshape(mu.shape[0], *shape4)
    bias = -np.einsum("kd,kd->k", mu, mu) / (2 * s2) + (np.log(params.pa)
                                                        - np.log1p(-params.pa))
    h, _ = ops.match_switch_pool(X.reshape(X.shape[0], *shape4), weights, bias, pool=1,
                                 leak=leak, backend=backend)
    return h.reshape(X.shape[0], mu.shape[0])


def base(X, params):
    """(base(x) + ln(1 - pi_a), ||x||^2): the log-joint of every component with a = 0."""
    d = X.shape[1]
    xsq = np.einsum("nd,nd->n", X, X)
    return (-0.5 * d * (_LOG_2PI + np.log(params.s2)) - xsq / (2 * params.s2)
            + np.log1p(-params.pa)), xsq


def class_scores(X, params, inference, backend):
    """(N, C): soft ln p(x, c); hard max_{g,a} ln p(x, c, g, a)."""
    n_classes, n_nuisances = params.n_classes, params.n_nuisances
    out = np.empty((X.shape[0], n_classes))
    log_prior = params.log_prior
    for sl in chunks(X.shape[0], max(log_prior.size, X.shape[1])):
        x = X[sl]
        base_x, _ = base(x, params)
        if inference == "hard":
            t = matches(x, params, 0.0, backend) + log_prior
            t = t.reshape(-1, n_classes, n_nuisances).max(axis=2)
        else:
            t = np.logaddexp(0.0, matches(x, params, 1.0, backend)) + log_prior
            t = logsumexp_rows(t.reshape(-1, n_nuisances)).reshape(-1, n_classes)
        out[sl] = base_x[:, None] + t
    check_finite_scores(out, X)
    return out


def log_likelihood(X, params, backend):
    """ln p(x) of each sample (sum-product)."""
    out = np.empty(X.shape[0])
    log_prior = params.log_prior
    for sl in chunks(X.shape[0], max(log_prior.size, X.shape[1])):
        x = X[sl]
        base_x, _ = base(x, params)
        t = np.logaddexp(0.0, matches(x, params, 1.0, backend)) + log_prior
        out[sl] = base_x + logsumexp_rows(t)
    check_finite_scores(out, X)
    return out


def check_finite_scores(scores, X):
    """Log-probabilities of inputs far beyond the model's scale overflow (-inf, or NaN where
    infinities cancel): refuse them rather than return NaN probabilities."""
    if not np.isfinite(scores).all():
        rows = ~np.isfinite(scores).reshape(scores.shape[0], -1).all(axis=1)
        largest = float(np.abs(X[rows]).max())
        raise ValueError(
            f"X holds {int(rows.sum())} sample(s) (values up to |x| = {largest:.3g}) so far "
            "from the fitted model's scale that their log-probabilities overflow float64")


# --------------------------------------------------------------------------------------------
# E-step and M-step


def e_step(data, params, settings, stats=True):
    """One pass over the data, chunk by chunk.

    Returns the per-sample objective ``ell`` (soft: ln p(x, y) for labeled, ln p(x) for
    unlabeled samples; hard: the maximal log-joint ``max_{c,g,a} ln p(x, c, g, a)`` with c
    fixed to the label where there is one) and, with ``stats``, the M-step's sufficient
    statistics: ``B[k] = sum_n q1[n,k] x_n`` and ``s1[k] = sum_n q1[n,k]`` (from
    :func:`fastdrmm.ops.template_stats`), ``A[k] = sum_n q1[n,k] ||x_n||^2``, the
    responsibility mass ``count[k]`` over both switch states, ``n1 = sum q1`` and
    ``r0x = sum_n q0[n] ||x_n||^2``.
    """
    X, yidx, weights = data.X, data.yidx, data.weights
    inference, backend = settings.inference, settings.backend
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
    for sl in chunks(n, max(k, d)):
        x = X[sl]
        m = x.shape[0]
        rows = np.arange(m)
        base_x, xsq = base(x, params)
        lab = yidx[sl]
        labeled = lab >= 0
        if inference == "hard":
            h = matches(x, params, 0.0, backend)  # ReLU(z): a = 1 exactly where h > 0
            t = h + log_prior
        else:
            z = matches(x, params, 1.0, backend)
            t = np.logaddexp(0.0, z) + log_prior  # softplus: the switch summed out
        if labeled.any():  # a labeled sample's class is fixed to its label
            allowed = np.ones((m, n_classes), bool)
            allowed[labeled] = False
            allowed[rows[labeled], lab[labeled]] = True
            t = np.where(np.repeat(allowed, n_nuisances, axis=1), t, -np.inf)
        if inference == "hard":
            best = np.argmax(t, axis=1)  # ties: the first (c, g); a = 0 on z = 0
            ell[sl] = base_x + t[rows, best]
        else:
            lse = logsumexp_rows(t)
            ell[sl] = base_x + lse
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
            kernel_size=shape4[1:], gram=False, backend=backend)
        q_sum = q.sum(axis=1)
        q1_sum = q1.sum(axis=1)
        acc["B"] += big_b.reshape(k, d)
        acc["s1"] += s1
        acc["A"] += xsq @ q1
        acc["count"] += q.sum(axis=0)
        acc["n1"] += float(q1_sum.sum())
        acc["r0x"] += float((q_sum - q1_sum) @ xsq)
    return ell, acc


def objective(ell, data, params, reg):
    """Weighted mean of ell minus the MAP penalty D * reg / (2 sigma^2) of ``reg``."""
    d = params.mu.shape[1]
    return float(data.weights @ ell) / data.total - d * reg / (2.0 * params.s2)


def m_step(data, acc, ell, params, reg):
    """Closed-form maximiser of the expected complete objective, with empty re-seeding."""
    X, total = data.X, data.total
    n_classes, n_nuisances = params.n_classes, params.n_nuisances
    s1, big_b = acc["s1"], acc["B"]
    empty = ~(s1 >= EMPTY_FRACTION * total)
    mu = params.mu.copy()
    full = ~empty
    mu[full] = big_b[full] / s1[full, None]
    if empty.any():
        reseed(mu, empty.reshape(n_classes, n_nuisances), X, ell, data.yidx, data.weights)
    count = acc["count"].reshape(n_classes, n_nuisances)
    pc = floor_probs(count.sum(axis=1) / total)
    pg = floor_probs(count.sum(axis=0) / total)
    pa = clip_switch(acc["n1"] / total)
    # sum_k sum_n q1[n,k] ||x_n - mu_k||^2 + sum_n q0[n] ||x_n||^2
    resid = (acc["A"].sum() - 2.0 * np.einsum("kd,kd->", mu, big_b)
             + s1 @ np.einsum("kd,kd->k", mu, mu) + acc["r0x"])
    s2 = max(resid, 0.0) / (total * X.shape[1]) + reg
    return params.replace(mu=mu, pc=pc, pg=pg, pa=pa, s2=max(s2, data.s2_floor))


def reseed(mu, empty, X, ell, yidx, weights):
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


# --------------------------------------------------------------------------------------------
# the EM loop of one initialisation


def run(data, params, settings, max_iter, tol, verbose):
    """EM from ``params`` until the mean objective changes by less than ``tol`` in one
    iteration, or for ``max_iter`` iterations.

    Returns a :class:`Result`. With ``verbose``, one line per iteration (objective and change;
    ``verbose >= 2`` adds its time) and one at the end.
    """
    ell, acc = e_step(data, params, settings, stats=max_iter > 0)
    current = objective(ell, data, params, settings.reg)
    bounds = []
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        tic = time.perf_counter()
        params = m_step(data, acc, ell, params, settings.reg)
        ell, acc = e_step(data, params, settings)
        new = objective(ell, data, params, settings.reg)
        change = new - current
        current = new
        bounds.append(new)
        if verbose:
            line = f"  Iteration {n_iter}\t objective {new:.6f}\t change {change:.3e}"
            if verbose >= 2:
                line += f"\t time {time.perf_counter() - tic:.3f} s"
            say(line, True)
        if abs(change) < tol:
            converged = True
            break
    say("Initialization converged." if converged else "Initialization did not converge.",
        verbose)
    return Result(current, params, bounds, n_iter, converged)
