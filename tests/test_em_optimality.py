"""The EM M-step is exactly optimal: at its solution the derivative of the hard-EM objective
(:func:`fastdrmm._em.objective`, at the E-step's statistics) with respect to every M-step
parameter of the rendering is zero.

"The objective did not rise" and "small moves cost" cannot tell a good step from the best
one (a noise variance 5 % off, or a ridge three times too large in the template solve,
passes both); the first-order conditions can. Checked on tiny float64 problems (random
non-negative images; 1, 2 and 3 layers; with and without pooling; weighted unlabeled
samples; statistics from the real E-step or from a DRMM run's Training), for

* every template entry: a central difference of the objective (exact for a quadratic, up to
  rounding) and the analytic gradient ``(G W - B + ridge_l W) / s2_l`` in the Gram layout;
* every log noise variance: ``dJ / d ln s2_l``;
* the switch priors (a box [0, 1]: the derivative in logit space) and the translation and
  class priors (simplices: the derivative in softmax-logit space, which is the Lagrangian's
  stationarity).

Each derivative is divided by a natural scale of its term (so "zero" is scale-free): the
template gradient by ``||B|| / s2_l`` (the size of its data term), ``dJ/d ln s2_l`` by
``D_l / 2``, a prior's logit derivative by the weight of its counts. Templates that no unit
chose are re-seeded from data patches (deliberately not a stationary point: their rows of G
and B are zero) and are left out. The top's class templates and covariance are not checked
here (the top is fitted by its own estimator, tested with it). The class prior is checked
on labeled statistics only: with labeled and unlabeled samples, ``_em.fit_top`` chooses the
unlabeled samples' classes afresh (by a top fitted to the labeled ones) and the class prior
is the frequency of those classes, while the objective's ``-ln pi_c`` counts the classes the
E-step chose (``stats.class_weight``); where they differ, the class prior is not the
objective's minimiser (a scaled derivative of 0.1 on a 2-layer problem with refined codes).

Measured with two deliberate M-step bugs (``_em.m_step`` edited in a copy of the package),
the scaled derivatives over the problems below: the noise variance times 1.05 gives
``dJ/d ln s2`` = 0.048 at every layer (the correct step: <= 1.7e-9, the central difference's
truncation); the ridge tripled in the template solve gives template gradients of 3e-4 to
1.5e-3 at ridge 1e-3 and 1e-2 to 4e-2 at ridge 0.1 (the correct step: <= 3e-12 by central
differences, <= 6e-16 analytically). The tolerances sit between, >= 500x from both sides.
"""

from __future__ import annotations

import warnings
from scenarios import labeled_images

import numpy as np
import pytest

from fastdrmm import DRMM, Layer
from fastdrmm import _em
from fastdrmm._network import LossWeights, network_for
from fastdrmm._training import Training, initial_parameters

#: scaled first-order residuals below which a derivative counts as zero (see the module
#: docstring for what the correct step and the deliberate bugs reach)
TEMPLATE_TOL = 1e-7
VARIANCE_TOL = 1e-6
PRIOR_TOL = 1e-6

#: (layers, image shape): 1-3 layers, pooled and not, padded and not, a leaky switch
PROBLEMS = {
    "1 layer pooled": ([Layer(3, 3, padding=1, pool=2)], (1, 8, 8)),
    "1 layer dense": ([Layer(3, 3)], (2, 6, 6)),
    "2 layers": ([Layer(4, 3, padding=1, pool=2, leak=0.1), Layer(5, 3)], (2, 12, 12)),
    "3 layers": ([Layer(4, 3, padding=1, pool=2), Layer(4, 3),
                  Layer(3, 3, padding=1, pool=2)], (1, 12, 12)),
}


def images(rng, shape, n=24, n_classes=3, unlabeled=0.0):
    return labeled_images(rng, shape, n, n_classes, unlabeled)


def e_step_statistics(rng, layers, shape, top, unlabeled_weight=1.0, amplitude_steps=0):
    """(net, parameters, statistics) of one E-step over random images from data-patch
    parameters."""
    X, y = images(rng, shape, unlabeled=0.3 if unlabeled_weight != 1.0 else 0.0)
    net = network_for(layers, shape, 3, "auto", "em", top)
    p = initial_parameters(net, X, y, 0, "patches", np.float64, "auto")
    stats = _em.Statistics(net)
    for rows in (slice(0, 10), slice(10, None)):  # the sums of two batches
        _em.e_step(net, p, X[rows], y[rows], unlabeled_weight, stats,
                   amplitude_steps=amplitude_steps)
    return net, p, stats


def training_statistics(rng, layers, shape, top):
    """(net, parameters, statistics) from a DRMM run's Training, at the parameters after one
    EM iteration (so the statistics are not those of the initialisation)."""
    X, y = images(rng, shape, unlabeled=0.3)
    model = DRMM(layers, 3, algorithm="em", dtype="float64", max_iter=1, top=top,
                 validation_fraction=0, random_state=0, unlabeled_weight=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one iteration does not converge
        model.fit(X, y)
    net = model._net()
    every = np.arange(X.shape[0])
    run = Training(model, net, LossWeights(), 0, X, y, every, every[:0])
    return net, model.parameters_, run.em_statistics(model.parameters_)


def central(f, x0, step):
    return (f(x0 + step) - f(x0 - step)) / (2 * step)


def used_templates(stats, l):
    return stats.n_on[l] > 0


def template_residuals(net, p, stats, ridge):
    """Per layer: (the objective's central-difference gradient over every template entry,
    the analytic gradient, the scale ||B|| / (s2 * weight)), the unused templates' entries
    zeroed."""
    out = []
    for l in range(net.n_layers):
        W = np.asarray(p[f"W{l}"], np.float64)
        s2 = float(p["noise_variance"][l])
        step = 1e-3 * float(np.abs(W).max())
        fd = np.zeros_like(W)
        for i in np.ndindex(W.shape):
            def J(v, i=i):
                moved = dict(p)
                Wv = W.copy()
                Wv[i] = v
                moved[f"W{l}"] = Wv
                return _em.objective(net, moved, stats, ridge)
            fd[i] = central(J, W[i], step)
        lam = _em._ridge(stats.G[l], ridge)
        Wm = _em._mat(W)
        analytic = _em._unmat((stats.G[l] @ Wm - _em._mat(stats.B[l]) + lam * Wm)
                              / (s2 * stats.weight), W.shape)
        unused = ~used_templates(stats, l)
        fd[unused] = 0.0
        analytic[unused] = 0.0
        scale = float(np.linalg.norm(stats.B[l])) / (s2 * stats.weight)
        out.append((fd, analytic, scale))
    return out


def variance_residuals(net, p, stats, ridge):
    """Per layer: dJ / d ln s2_l (central difference) / (D_l / 2)."""
    out = []
    for l in range(net.n_layers):
        s2 = np.array(p["noise_variance"], np.float64)

        def J(u, l=l, s2=s2):
            moved = dict(p)
            v = s2.copy()
            v[l] = np.exp(u)
            moved["noise_variance"] = v
            return _em.objective(net, moved, stats, ridge)
        D = float(np.prod(net.shapes[l].input_hw)) * net.shapes[l].channels_in
        out.append(central(J, np.log(s2[l]), 1e-4) / (D / 2))
    return np.array(out)


def _logit_derivatives(net, p, stats, ridge, name, simplex):
    """dJ/dz for every entry of the prior ``name`` parametrised by logits z (a softmax over
    the entries for a simplex, a sigmoid per entry for a box), by central differences."""
    prob = np.asarray(p[name], np.float64)
    z0 = np.log(prob) if simplex else np.log(prob) - np.log1p(-prob)
    grads = np.zeros(prob.shape)
    for i in range(prob.size):
        def J(v, i=i):
            z = z0.copy()
            z[i] = v
            if simplex:
                e = np.exp(z - z.max())
                q = e / e.sum()
            else:
                q = 1.0 / (1.0 + np.exp(-z))
            moved = dict(p)
            moved[name] = q
            return _em.objective(net, moved, stats, ridge)
        grads[i] = central(J, z0[i], 1e-4)
    return grads


def prior_residuals(net, p, stats, ridge, class_prior=True):
    """name -> the largest |dJ/dz| of that prior over the weight of its counts (per unit
    sample weight, as J)."""
    out = {}
    for l in range(net.n_layers):
        g = _logit_derivatives(net, p, stats, ridge, f"switch_prior{l}", simplex=False)
        out[f"switch_prior{l}"] = float(np.abs(g).max()) / (stats.n_units[l] / stats.weight)
        g = _logit_derivatives(net, p, stats, ridge, f"translation_prior{l}", simplex=True)
        out[f"translation_prior{l}"] = float(np.abs(g).max()) / (
            stats.offsets[l].sum() / stats.weight)
    if class_prior:
        g = _logit_derivatives(net, p, stats, ridge, "class_prior", simplex=True)
        out["class_prior"] = float(np.abs(g).max())
    return out


def assert_first_order_conditions(net, p, stats, ridge, class_prior=True):
    for l, (fd, analytic, scale) in enumerate(template_residuals(net, p, stats, ridge)):
        assert used_templates(stats, l).sum() >= 2, "a problem must use its templates"
        # the objective is the quadratic the analytic gradient describes ...
        np.testing.assert_allclose(fd, analytic, rtol=0, atol=1e-9 * scale,
                                   err_msg=f"W{l}: objective vs analytic gradient")
        # ... and the M-step's templates are its stationary point
        assert np.linalg.norm(fd) <= TEMPLATE_TOL * scale, (
            f"W{l}: |dJ/dW| / scale = {np.linalg.norm(fd) / scale:.3g}")
        assert np.linalg.norm(analytic) <= TEMPLATE_TOL * scale
    s2 = variance_residuals(net, p, stats, ridge)
    assert np.all(np.abs(s2) <= VARIANCE_TOL), f"dJ/d ln s2 / (D/2) = {s2}"
    for name, value in prior_residuals(net, p, stats, ridge, class_prior).items():
        assert value <= PRIOR_TOL, f"{name}: |dJ/dz| / counts = {value:.3g}"


@pytest.mark.parametrize("top", ["full", "average"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_m_step_is_a_stationary_point_of_the_objective(problem, top, rng):
    layers, shape = PROBLEMS[problem]
    net, p0, stats = e_step_statistics(rng, layers, shape, top)
    for ridge in (1e-3, 1e-1):
        new = _em.m_step(net, p0, stats, ridge)
        assert_first_order_conditions(net, new, stats, ridge)


@pytest.mark.parametrize("amplitude_steps", [0, 3])
def test_m_step_is_stationary_with_weighted_samples_and_refined_codes(amplitude_steps, rng):
    """Unlabeled samples weigh 0.5 in every sum; refined codes change the statistics, not
    the exactness of the step."""
    layers, shape = PROBLEMS["2 layers"]
    net, p0, stats = e_step_statistics(rng, layers, shape, "full", unlabeled_weight=0.5,
                                       amplitude_steps=amplitude_steps)
    assert_first_order_conditions(net, _em.m_step(net, p0, stats, 1e-3), stats, 1e-3,
                                  class_prior=False)  # (see the module docstring)


@pytest.mark.parametrize("problem", ["1 layer pooled", "3 layers"])
def test_m_step_is_stationary_at_a_training_run_statistics(problem, rng):
    """The statistics a DRMM run gathers (Training.em_statistics: its batches, weights and
    settings) after one EM iteration."""
    layers, shape = PROBLEMS[problem]
    net, p0, stats = training_statistics(rng, layers, shape, "full")
    assert_first_order_conditions(net, _em.m_step(net, p0, stats, 1e-3), stats, 1e-3,
                                  class_prior=False)  # (see the module docstring)


def test_the_conditions_see_a_step_that_is_not_the_optimum(rng):
    """The check itself: the M-step's solution moved by the two kinds of error the
    conditions must catch fails them, by far more than the tolerances."""
    layers, shape = PROBLEMS["2 layers"]
    net, p0, stats = e_step_statistics(rng, layers, shape, "full")
    ridge = 1e-3
    new = _em.m_step(net, p0, stats, ridge)
    off = dict(new)
    off["noise_variance"] = new["noise_variance"] * 1.01
    assert np.all(np.abs(variance_residuals(net, off, stats, ridge)) > 1e3 * VARIANCE_TOL)
    # the templates of twice the ridge: (G + 2 lam I) W = B
    off = dict(new)
    for l in range(net.n_layers):
        G = stats.G[l]
        lam = _em._ridge(G, ridge)
        W = _em._unmat(np.linalg.solve(G + 2 * lam * np.eye(G.shape[0]), _em._mat(stats.B[l])),
                       new[f"W{l}"].shape)
        unused = ~used_templates(stats, l)
        W[unused] = new[f"W{l}"][unused]
        off[f"W{l}"] = W
    for fd, _, scale in template_residuals(net, off, stats, ridge):
        assert np.linalg.norm(fd) > 10 * TEMPLATE_TOL * scale
    off = dict(new)
    off["switch_prior0"] = np.clip(new["switch_prior0"] * 1.01, 0, 1 - 1e-9)
    assert prior_residuals(net, off, stats, ridge)["switch_prior0"] > 1e3 * PRIOR_TOL
