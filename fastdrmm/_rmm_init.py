"""The shallow RMM's initialisation: k-means++ seeds for the templates, then the priors and
the noise variance from each sample's nearest seed.

Per class, the seeds come from its labeled samples, topped up from the unlabeled samples
nearest to that class when it has fewer labels than ``n_nuisances``; unsupervised,
``n_classes`` class seeds first, then ``n_nuisances`` seeds inside each class seed's cell.
"""

from __future__ import annotations

import numpy as np

from ._rmm_em import Params, chunks, floor_probs


def initialize(data, n_classes, n_nuisances, reg, rng, feature_shape):
    """The initial :class:`~fastdrmm._rmm_em.Params` of an EM run on ``data``."""
    X = data.X
    xsq = np.einsum("nd,nd->n", X, X)
    mu = _seed_templates(data, xsq, n_classes, n_nuisances, rng)
    return _params_from_seeds(data, xsq, mu, n_classes, n_nuisances, reg, feature_shape)


def _seed_templates(data, xsq, n_classes, n_nuisances, rng):
    """(n_classes * n_nuisances, D): the samples chosen as the first templates."""
    X, yidx = data.X, data.yidx
    active = data.weights > 0
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
        for sl in chunks(unl.size, lab_idx.size):
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
    return X[np.concatenate([np.asarray(s, np.intp) for s in seeds])].copy()


def _params_from_seeds(data, xsq, mu, n_classes, n_nuisances, reg, feature_shape):
    """Priors and variance from each sample's nearest allowed seed (its own class's where it
    is labeled)."""
    X, yidx, weights, total = data.X, data.yidx, data.weights, data.total
    n, d = X.shape
    nearest_d2 = np.empty(n)
    nearest_class = np.empty(n, np.intp)
    for sl in chunks(n, max(mu.shape[0], d)):
        dist = _sqdist(X[sl], xsq[sl], mu).reshape(-1, n_classes, n_nuisances).min(axis=2)
        lab = yidx[sl]
        labeled = lab >= 0
        own = dist[labeled, lab[labeled]]
        dist[labeled] = np.inf
        dist[labeled, lab[labeled]] = own
        nearest_class[sl] = np.argmin(dist, axis=1)
        nearest_d2[sl] = dist[np.arange(dist.shape[0]), nearest_class[sl]]
    pc = floor_probs(np.bincount(nearest_class, weights=weights, minlength=n_classes)
                     / total)
    pg = np.full(n_nuisances, 1.0 / n_nuisances)
    pa = float(np.clip(weights @ (nearest_d2 < xsq) / total, 0.05, 0.95))
    s2 = float(weights @ np.minimum(nearest_d2, xsq)) / (total * d)
    if not s2 > 0:
        centred = X - (weights @ X) / total
        s2 = float(weights @ np.einsum("nd,nd->n", centred, centred)) / (total * d)
    if not s2 > 0:
        s2 = 1.0
    return Params(mu, pc, pg, pa, max(s2 + reg, data.s2_floor), feature_shape)


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
