"""The top-down M-step (``em_targets="top-down"``, :mod:`fastdrmm._em_topdown`): every
layer's solve is the exact minimiser of its least-squares objective (first-order
conditions, with the codes rendered through the new templates above), a one-layer model's
templates equal a direct ``np.linalg.lstsq`` of the image on the class template rendered
through the recorded latents, the generative biases follow the new templates, and a DRMM
trained with it fits, predicts, saves and loads."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastdrmm
from fastdrmm import DRMM, Layer, ops
from fastdrmm import _amplitudes, _em, _em_topdown
from fastdrmm._network import LossWeights, network_for, one_hot
from fastdrmm._training import Training, initial_parameters
from scenarios import labeled_images

#: a gradient over ||B|| below this counts as zero (measured: the exact solve <= 1e-15; a code
#: rendered through the previous upper templates instead of the new ones 2e-2 to 2e-1;
#: unlabeled samples weighing 1 instead of 0.5, 1e-2)
GRADIENT_TOL = 1e-9


def images(rng, shape, n=20, n_classes=3, unlabeled=0.0):
    return labeled_images(rng, shape, n, n_classes, unlabeled)


def bottom_up_m_step(rng, layers, shape, top, unlabeled=0.0, unlabeled_weight=1.0,
                     ridge=1e-3):
    """A tiny float64 problem after one bottom-up E- and M-step: (net, X, y, the E-step's
    parameters, the bottom-up M-step's)."""
    X, y = images(rng, shape, unlabeled=unlabeled)
    net = network_for(layers, shape, 3, "auto", "em", top)
    p = initial_parameters(net, X, y, 0, "patches", np.float64, "auto")
    stats = _em.Statistics(net)
    _em.e_step(net, p, X, y, unlabeled_weight, stats)
    return net, X, y, p, _em.m_step(net, p, stats, ridge)


def layer_gradient(net, p, new, X, y, l, ridge, unlabeled_weight, upper=None,
                   amplitude_steps=0):
    """The gradient of layer l's top-down least-squares objective at ``new``'s templates,
    sum_n w_n ||T[l] - render(r[l+1], W)||^2 + ridge_l ||W||^2, computed on all samples at
    once with r[l+1] rendered from new["mu"] through ``upper``'s templates (default:
    ``new``'s) and T[l] the (refined) bottom-up code; returns (gradient, ||B||, the
    objective's residual per unit weight and value including the ridge term)."""
    upper = new if upper is None else upper
    fw = net.bottom_up(p, X)
    labeled = y >= 0
    classes = np.where(labeled, y, fw.scores.argmax(axis=1))
    root = np.sqrt(np.where(labeled, 1.0, unlabeled_weight))
    switches = [fw.switches(k, X.dtype) for k in range(net.n_layers)]
    top = net.top_code(upper, one_hot(classes, net.n_classes) * root[:, None], X.dtype)
    code = net.render_down(upper, top, fw.idxs, switches, stop=l + 1)[0]
    hs = (_amplitudes.refine_codes(net, p, fw, switches, amplitude_steps) if amplitude_steps
          else fw.hs)
    target = hs[l] * root[:, None, None, None]
    layer = net.layers[l]
    W = np.asarray(new[f"W{l}"], np.float64)
    rendered = ops.render(code, fw.idxs[l], W, net.shapes[l].input_hw, padding=layer.padding,
                          switches=switches[l])
    geometry = dict(padding=layer.padding, switches=switches[l])
    B, _, G = ops.template_stats(target, code, fw.idxs[l], layer.kernel_size, gram=True,
                                 **geometry)
    Bres, _, _ = ops.template_stats(target - rendered, code, fw.idxs[l], layer.kernel_size,
                                    gram=False, **geometry)
    lam = ridge * np.trace(G) / G.shape[0]
    grad = -2.0 * Bres + 2.0 * lam * W
    D = target[0].size
    s2 = (float(np.sum((target - rendered) ** 2)) + lam * float(np.sum(W * W))) / (
        root @ root * D)
    return grad, float(np.linalg.norm(B)), s2


TWO_LAYERS = ([Layer(4, 3, padding=1, pool=2, leak=0.1), Layer(5, 3)], (2, 12, 12))
THREE_LAYERS = ([Layer(4, 3, padding=1, pool=2), Layer(4, 3), Layer(3, 3, padding=1, pool=2)],
                (1, 12, 12))


@pytest.mark.parametrize("layers, shape, top, amplitude_steps", [
    (*TWO_LAYERS, "full", 0), (*TWO_LAYERS, "average", 0), (*TWO_LAYERS, "full", 3),
    (*THREE_LAYERS, "full", 0), (*THREE_LAYERS, "average", 0)])
def test_every_layer_solve_is_exact(layers, shape, top, amplitude_steps, rng):
    """Top layer first, each layer's templates are the stationary point of its own
    least-squares objective with the code rendered through the NEW templates above (and
    the targets refined as the E-step refines them), and its noise variance is that
    objective's residual per value; batches only split the sums."""
    ridge, weight = 1e-2, 0.5
    net, X, y, p, fitted = bottom_up_m_step(rng, layers, shape, top, unlabeled=0.3,
                                            unlabeled_weight=weight, ridge=ridge)
    new = _em_topdown.fit_templates(net, p, fitted, X, y, ridge, unlabeled_weight=weight,
                                    amplitude_steps=amplitude_steps, batch_size=7)
    for l in range(net.n_layers):
        grad, scale, s2 = layer_gradient(net, p, new, X, y, l, ridge, weight,
                                         amplitude_steps=amplitude_steps)
        assert np.linalg.norm(grad) <= GRADIENT_TOL * scale, (
            f"W{l}: |grad| / |B| = {np.linalg.norm(grad) / scale:.3g}")
        assert new["noise_variance"][l] == pytest.approx(s2, rel=1e-9)
        assert not np.allclose(new[f"W{l}"], fitted[f"W{l}"])  # it is not the bottom-up fit
    # the check sees a code rendered through the previous upper templates
    grad, scale, _ = layer_gradient(net, p, new, X, y, 0, ridge, weight,
                                    upper={**fitted, "W0": new["W0"]},
                                    amplitude_steps=amplitude_steps)
    assert np.linalg.norm(grad) > 1e4 * GRADIENT_TOL * scale


@pytest.mark.parametrize("top", ["full", "average"])
def test_one_layer_templates_are_the_least_squares_of_the_image(top, rng):
    """With one layer the top-down target is the image and the code is mu[c] on the top
    plane (switched by the recorded switches, placed at the recorded positions): the
    templates are the ridge least squares of the image on that code's rendering, built
    here column by column (one rendering per template entry) and solved by lstsq."""
    layers, shape, ridge = [Layer(2, 3, padding=1, pool=2)], (2, 6, 6), 1e-2
    net, X, y, p, fitted = bottom_up_m_step(rng, layers, shape, top)
    new = _em_topdown.fit_templates(net, p, fitted, X, y, ridge)
    fw = net.bottom_up(p, X)
    on = fw.switches(0, X.dtype)
    mu = np.asarray(fitted["mu"], np.float64)[y]
    k, (hp, wp) = layers[0].n_templates, net.shapes[0].pooled
    code = (mu.reshape(-1, k, hp, wp) if top == "full"
            else np.broadcast_to(mu[:, :, None, None], (X.shape[0], k, hp, wp))) * on
    W_shape = fitted["W0"].shape
    columns = []
    for j in range(int(np.prod(W_shape))):
        unit = np.zeros(int(np.prod(W_shape)))
        unit[j] = 1.0
        columns.append(ops.render(code, fw.idxs[0], unit.reshape(W_shape), shape[1:],
                                  padding=1).ravel())
    A = np.stack(columns, axis=1)
    lam = ridge * float(np.sum(A * A)) / A.shape[1]  # = ridge * trace(G) / dim(G)
    lhs = np.vstack([A, np.sqrt(lam) * np.eye(A.shape[1])])
    rhs = np.concatenate([X.ravel(), np.zeros(A.shape[1])])
    W, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
    np.testing.assert_allclose(new["W0"].ravel(), W, rtol=0, atol=1e-10 * np.abs(W).max())
    residual = float(np.sum((rhs - lhs @ W) ** 2))
    assert new["noise_variance"][0] == pytest.approx(residual / X.size, rel=1e-9)


def test_m_step_keeps_the_priors_and_follows_the_bias_rule(rng):
    """Through a run: the priors and the top come from the bottom-up M-step; the
    generative biases are those of the new templates and noise variances; a template no
    unit chose keeps the bottom-up step's (re-seeded) one."""
    layers, shape = [Layer(6, 3, padding=1, pool=2), Layer(4, 3)], (1, 10, 10)
    X, y = images(rng, shape, n=16)
    model = DRMM(layers, 3, algorithm="em", dtype="float64", em_targets="top-down",
                 validation_fraction=0, top="full")
    net = model._network(layers, shape)
    every = np.arange(X.shape[0])
    run = Training(model, net, LossWeights(), 0, X, y, every, every[:0])
    run.params = model._init_params(net, X, y, 0)
    run.params["b0"] = run.params["b0"] - np.arange(6) * 0.5  # switch some templates off
    stats = run.em_statistics(run.params)
    fitted = _em.m_step(net, run.params, stats, float(model.ridge))
    new = _em_topdown.m_step(run, run.params, fitted, stats)
    unused = stats.n_on[0] <= 0
    assert unused.any() and not unused.all()
    np.testing.assert_array_equal(new["W0"][unused], fitted["W0"][unused])
    refitted = {f"{kind}{l}" for kind in "Wb" for l in range(net.n_layers)}
    assert set(new) == set(fitted)
    for name in set(fitted) - refitted - {"noise_variance"}:
        np.testing.assert_array_equal(new[name], fitted[name], err_msg=name)
    for l in range(net.n_layers):
        expected = _em.generative_bias_of(new[f"W{l}"], new["noise_variance"][l],
                                          fitted[f"switch_prior{l}"])
        np.testing.assert_allclose(new[f"b{l}"], expected, rtol=1e-12)


def test_drmm_with_top_down_targets_fits_predicts_saves_and_loads(rng, tmp_path):
    layers = [Layer(4, 3, padding=1, pool=2), Layer(5, 3, padding=1)]
    X, y = images(rng, (1, 8, 8), n=20, unlabeled=0.3)
    X = X.astype(np.float32)
    fits = {}
    for targets in ("bottom-up", "top-down"):
        model = DRMM(layers, 3, algorithm="em", max_iter=1, tol=0, random_state=0,
                     validation_fraction=0, em_targets=targets, top="full",
                     amplitude_steps=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one iteration does not converge
            fits[targets] = model.fit(X, y)
    model = fits["top-down"]
    assert model.n_iter_ == 1
    predicted = model.predict(X)
    assert predicted.shape == (20,) and np.isin(predicted, [0, 1, 2]).all()
    assert np.isfinite(model.decision_function(X)).all()
    assert np.isfinite(model.reconstruct(X)).all()
    assert not np.allclose(model.parameters_["W0"], fits["bottom-up"].parameters_["W0"])
    path = tmp_path / "topdown.drmm"
    model.save(path)
    loaded = fastdrmm.load(path)
    assert loaded.em_targets == "top-down"
    np.testing.assert_array_equal(loaded.decision_function(X), model.decision_function(X))
