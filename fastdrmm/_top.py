"""The EM-trained DRMM's top: class-conditional Gaussians over the top feature with one
shared, shrunk covariance, fitted in closed form.

``f | c ~ N(mu_c, Sigma)``, ``c ~ Cat(pi)``. The class score stays linear in the feature,

    score_c = <w_c, f> + beta_c,   w_c = Sigma^-1 mu_c,
    beta_c = -1/2 mu_c^T Sigma^-1 mu_c + ln pi_c,

so inference is still the convolutional network's forward pass, and the scores are the
class log-posteriors up to a constant. ``Sigma`` is the estimate of scikit-learn's
``LinearDiscriminantAnalysis(solver="lsqr")``: the class-prior-weighted average of each
class's shrunk covariance, with the shrinkage chosen by Ledoit-Wolf on standardized features
(``"auto"``), by Oracle-Approximating Shrinkage (``"oas"``, as with
``covariance_estimator=OAS()``) or fixed (a float in [0, 1], towards the mean variance times
the identity). The isotropic top (one noise
variance) it replaces throws away the strongly correlated within-class variation that the
nuisances leave in the top code; the shared covariance keeps it.

Samples carry weights (an unlabeled sample weighs ``unlabeled_weight``): every mean, scale
and covariance is the weighted one, computed by scikit-learn's estimators on rows scaled by
the square root of their weight; with unit weights the fit is exactly scikit-learn's.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from sklearn.covariance import empirical_covariance, ledoit_wolf, oas, shrunk_covariance
from sklearn.preprocessing import StandardScaler

from ._progress import parallel_blas

__all__ = ["fit_gaussian_top", "shared_covariance", "draw_features", "in_code_units",
           "TOP_PARAMS"]

#: the parameters of this top (besides mu, beta and class_prior, which every top has)
TOP_PARAMS = ("class_weights", "top_covariance")


def _class_covariance(X, w, shrinkage):
    """The shrunk covariance of one class's features X (n, F) with weights w (n,)."""
    if X.shape[0] == 1:  # scikit-learn warns of one sample; its covariance is 0
        return np.zeros((X.shape[1], X.shape[1]))
    total = float(w.sum())
    mean = (w @ X) / total
    # rows scaled by sqrt(n w / W): their plain second moment is the weighted covariance
    root = np.sqrt(w * (X.shape[0] / total))[:, None]
    if shrinkage == "oas":
        return oas(root * (X - mean), assume_centered=True)[0]
    if shrinkage != "auto":
        return shrunk_covariance(empirical_covariance(root * (X - mean), assume_centered=True),
                                 float(shrinkage))
    # Ledoit-Wolf on standardized features, scaled back
    scaler = StandardScaler().fit(X, sample_weight=w)
    cov = ledoit_wolf(root * scaler.transform(X), assume_centered=True)[0]
    return scaler.scale_[:, None] * cov * scaler.scale_[None, :]


def shared_covariance(features, classes, weights, priors, shrinkage="auto"):
    """Sigma = sum_c priors[c] * shrunk covariance of class c (classes without samples are
    left out and the rest renormalised)."""
    F = features.shape[1]
    cov = np.zeros((F, F))
    used = 0.0
    for c in np.unique(classes):
        rows = classes == c
        w = weights[rows]
        if not w.sum() > 0:
            continue
        cov += priors[c] * _class_covariance(features[rows], w, shrinkage)
        used += priors[c]
    if not used > 0:
        return np.eye(F)
    cov /= used
    return (cov + cov.T) / 2  # symmetric to the last bit (the saved model checks it)


def _solve(cov, rhs):
    """cov^-1 rhs: Cholesky where cov is positive definite, else least squares (as
    scikit-learn's lsqr solver, which a singular unshrunk covariance needs)."""
    try:
        return scipy.linalg.solve(cov, rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return scipy.linalg.lstsq(cov, rhs)[0]


def fit_gaussian_top(features, classes, weights, n_classes, mu, shrinkage="auto"):
    """The closed-form fit of the top: the entries ``mu`` (class means; a class without
    samples keeps its row of the given ``mu``), ``class_prior``, ``top_covariance``,
    ``class_weights`` and ``beta`` (float64)."""
    with parallel_blas():  # F x F products with nothing else running (F = 4,608 on MNIST)
        return _fit(features, classes, weights, n_classes, mu, shrinkage)


def _fit(features, classes, weights, n_classes, mu, shrinkage):
    features = np.asarray(features, np.float64)
    weights = np.asarray(weights, np.float64)
    class_weight = np.bincount(classes, weights=weights, minlength=n_classes)
    mu = np.array(mu, np.float64)
    seen = class_weight > 0
    sums = np.zeros_like(mu)
    np.add.at(sums, classes, features * weights[:, None])
    mu[seen] = sums[seen] / class_weight[seen, None]
    prior = np.maximum(class_weight / class_weight.sum(), 1e-12)
    prior /= prior.sum()
    cov = shared_covariance(features, classes, weights, prior, shrinkage)
    class_weights = _solve(cov, mu.T).T
    beta = -0.5 * np.sum(mu * class_weights, axis=1) + np.log(prior)
    return {"mu": mu, "class_prior": prior, "top_covariance": cov,
            "class_weights": class_weights, "beta": beta}


def covariance_factor(cov):
    """A matrix L with L L^T = cov (cov symmetric positive semi-definite): Cholesky, with
    a jitter of 1e-10 of the mean variance where cov is singular."""
    cov = np.asarray(cov, np.float64)
    jitter = 1e-10 * max(float(np.trace(cov)) / max(cov.shape[0], 1), 1e-300)
    for scale in (0.0, 1.0, 1e2, 1e4):
        try:
            return np.linalg.cholesky(cov + scale * jitter * np.eye(cov.shape[0]))
        except np.linalg.LinAlgError:
            continue
    vals, vecs = np.linalg.eigh(cov)
    return vecs * np.sqrt(np.clip(vals, 0, None))[None, :]


def draw_features(p, classes, rng, factor=None):
    """Top features f ~ N(mu_c, Sigma) of the given classes (len(classes), F), float64
    (``factor``: :func:`covariance_factor` of Sigma, when already computed)."""
    mu = np.asarray(p["mu"], np.float64)
    if factor is None:
        factor = covariance_factor(p["top_covariance"])
    z = rng.standard_normal((len(classes), mu.shape[1]))
    return mu[classes] + z @ factor.T


def in_code_units(p, scale):
    """The top's Gaussian moved to the units of the codes that render the layers below:
    ``mu`` times ``scale`` per feature and ``top_covariance`` times ``scale scale^T``.

    The bottom-up feature f, which the class scores read, overshoots the coherent top code
    r that renders the layer below (:mod:`fastdrmm._amplitudes`) by a factor per feature,
    r ~ scale * f. The class weights and biases stay those of f; the class templates that
    ``reconstruct`` renders and the Gaussian ``sample`` draws from become those of r. (The
    shared-covariance scores are unchanged by a per-feature scale, so nothing else moves.)"""
    out = dict(p)
    scale = np.asarray(scale, np.float64)
    # a class without samples kept its (already scaled) template: not scaled again
    seen = np.asarray(p["class_prior"], np.float64) > 1e-11
    mu = np.asarray(p["mu"], np.float64)
    out["mu"] = np.where(seen[:, None], mu * scale[None, :], mu).astype(
        np.asarray(p["mu"]).dtype)
    out["top_covariance"] = np.asarray(p["top_covariance"], np.float64) * np.outer(scale, scale)
    return out
