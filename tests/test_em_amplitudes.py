"""Coherent amplitudes (issue #17 item 2): the E-step's codes refined towards rendering the
layer below, with the latents chosen bottom-up fixed (:mod:`fastdrmm._amplitudes`)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from fastdrmm import DRMM, Layer, _amplitudes

# 1, 2 and 3 layers on 8x8 images: pooled and unpooled, padded and not, a leaky switch
STACKS = {
    1: [Layer(4, 3, padding=1, pool=2)],
    2: [Layer(4, 3, padding=1, pool=2), Layer(5, 3, padding=1)],
    3: [Layer(4, 3, padding=1, pool=2, leak=0.1), Layer(5, 3, padding=1), Layer(3, 2, pool=2)],
}


def images(rng, n=30, n_classes=3):
    """Smooth non-negative 8x8 images with a class-dependent bright blob, and their labels."""
    y = np.arange(n) % n_classes
    i, j = np.mgrid[0:8, 0:8]
    centres = [(2, 2), (5, 5), (2, 5), (5, 2)]
    X = np.empty((n, 1, 8, 8))
    for s in range(n):
        ci, cj = centres[y[s]]
        ci, cj = ci + rng.integers(-1, 2), cj + rng.integers(-1, 2)
        X[s, 0] = np.exp(-((i - ci) ** 2 + (j - cj) ** 2) / 3.0)
    X += 0.05 * rng.random(X.shape)
    return X, y


def started(rng, n_layers, max_iter=0, **kw):
    """A float64 EM model at its starting (or fitted) parameters, its network and data."""
    X, y = images(rng)
    model = DRMM(STACKS[n_layers], 3, algorithm="em", max_iter=max_iter, tol=0,
                 random_state=0, dtype="float64", top="full", validation_fraction=0, **kw)
    with warnings.catch_warnings():  # tol=0: EM does not converge
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    return model, model._net(), model.parameters_, X, y


def latents(net, p, X):
    fw = net.bottom_up(p, X)
    switches = [fw.switches(l, X.dtype) for l in range(net.n_layers)]
    return fw, switches


@pytest.mark.parametrize("blocks", ["greedy", "joint", "layerwise"])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_no_step_raises_any_samples_objective(n_layers, blocks, rng):
    model, net, p, X, _ = started(rng, n_layers, max_iter=1, amplitude_steps=0)
    fw, switches = latents(net, p, X)
    steps = 12
    codes, history = _amplitudes.refine(net, p, X, fw.idxs, switches, fw.hs[1:], steps,
                                        blocks=blocks, history=True)
    n_steps = steps * n_layers if blocks == "greedy" else steps
    assert history.shape == (n_steps, 2, X.shape[0])
    # never up, for any sample at any step (rounding of float64 sums only)
    before, after = history[:, 0], history[:, 1]
    assert np.all(after <= before + 1e-12 * np.abs(before))
    # the start: the bottom-up codes with the switched-off units at 0 (a leaky layer's are
    # negative)
    projected = [X] + [h * a for h, a in zip(fw.hs[1:], switches)]
    start = _amplitudes.rendering_objective(net, p, projected, fw.idxs, switches)
    end = _amplitudes.rendering_objective(net, p, [X] + codes, fw.idxs, switches)
    # whatever the blocks, no sample ends above where it started
    assert np.all(end <= start + 1e-12 * np.abs(start))
    if blocks == "greedy":
        # each layer's phase minimises that layer's term, from the codes the phase below
        # left: the bottom-up overshoot is mostly gone (at least half) for every sample
        for l in range(n_layers):
            phase = history[l * steps:(l + 1) * steps]
            np.testing.assert_array_equal(phase[1:, 0], phase[:-1, 1])
            if l == 0:
                assert np.all(phase[-1, 1] <= 0.5 * phase[0, 0])
            else:  # a sample whose units above are all off has nothing to move
                assert np.sum(phase[-1, 1]) <= 0.5 * np.sum(phase[0, 0])
        # the first phase starts from layer 1's term of the bottom-up codes
        e = X - _amplitudes._render(net, p, 0, projected[1], fw.idxs, switches)
        first = np.sum(e ** 2, axis=(1, 2, 3)) / (2 * p["noise_variance"][0])
        np.testing.assert_allclose(history[0, 0], first, rtol=1e-12)
    else:
        np.testing.assert_allclose(before[0], start, rtol=1e-12)
        np.testing.assert_array_equal(before[1:], after[:-1])
        np.testing.assert_allclose(after[-1], end, rtol=1e-9)
        assert np.all(after[-1] <= 0.5 * before[0])


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_refinement_reduces_the_residual_of_every_layer_it_renders(n_layers, rng):
    """The image rendered from each sample's own first code comes much closer to x."""
    model, net, p, X, _ = started(rng, n_layers, max_iter=1, amplitude_steps=0)
    fw, switches = latents(net, p, X)
    hs = _amplitudes.refine_codes(net, p, fw, switches, 10)
    assert hs[0] is fw.hs[0]
    before = _amplitudes._render(net, p, 0, fw.hs[1], fw.idxs, switches) - X
    after = _amplitudes._render(net, p, 0, hs[1], fw.idxs, switches) - X
    assert np.sum(after ** 2) < 0.1 * np.sum(before ** 2)
    assert np.mean(after ** 2) < np.var(X)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_codes_stay_non_negative_and_off_where_the_switch_is_off(n_layers, rng):
    model, net, p, X, _ = started(rng, n_layers, max_iter=1, amplitude_steps=0)
    fw, switches = latents(net, p, X)
    hs = _amplitudes.refine_codes(net, p, fw, switches, 15)
    assert len(hs) == n_layers + 1
    for l in range(n_layers):
        h = hs[l + 1]
        assert h.dtype == fw.hs[l + 1].dtype and h.shape == fw.hs[l + 1].shape
        assert np.all(h >= 0)
        assert np.all(h[switches[l] == 0] == 0)
        # the bound is reached: some switched-on units end at exactly 0 (the projection acts)
    assert any(np.any((hs[l + 1] == 0) & (switches[l] == 1)) for l in range(n_layers))


def test_no_steps_returns_the_bottom_up_codes_themselves(rng):
    model, net, p, X, _ = started(rng, 2, max_iter=1)
    fw, switches = latents(net, p, X)
    assert _amplitudes.refine_codes(net, p, fw, switches, 0) is fw.hs


def test_a_samples_codes_do_not_depend_on_its_batch(rng):
    model, net, p, X, _ = started(rng, 2, max_iter=1, amplitude_steps=0)
    whole = _amplitudes.refine_codes(net, p, *latents(net, p, X), 8)
    order = rng.permutation(X.shape[0])
    for part in np.array_split(order, 4):
        alone = _amplitudes.refine_codes(net, p, *latents(net, p, X[part]), 8)
        for l in range(1, 3):
            np.testing.assert_allclose(alone[l], whole[l][part], rtol=1e-10, atol=1e-13)


def test_many_steps_reach_the_non_negative_least_squares_optimum(rng):
    """One layer: J is ||x - R h||^2 / (2 s2) over h >= 0 on the switched-on units, a
    non-negative least-squares problem per sample that scipy solves exactly."""
    from scipy.optimize import nnls

    model, net, p, X, _ = started(rng, 1, max_iter=1, amplitude_steps=0)
    X = X[:4]
    fw, switches = latents(net, p, X)
    codes, history = _amplitudes.refine(net, p, X, fw.idxs, switches, fw.hs[1:], 400,
                                        history=True)
    s2 = float(p["noise_variance"][0])
    for n in range(X.shape[0]):
        on = np.flatnonzero(switches[0][n].ravel())
        columns = []
        for u in on:
            e = np.zeros((1, *fw.hs[1].shape[1:]))
            e.ravel()[u] = 1.0
            columns.append(_amplitudes._render(
                net, p, 0, e, [fw.idxs[0][n:n + 1]], [switches[0][n:n + 1]]).ravel())
        h, norm = nnls(np.array(columns).T, X[n].ravel(), maxiter=10000)
        best = norm ** 2 / (2 * s2)
        assert best <= history[-1, 1, n] + 1e-12
        assert history[-1, 1, n] <= best + 1e-3 * history[0, 0, n]


def test_the_e_step_takes_its_statistics_from_the_refined_codes(rng):
    from fastdrmm import _em

    model, net, p, X, y = started(rng, 2, max_iter=1, amplitude_steps=0)
    stats = _em.Statistics(net)
    _em.e_step(net, p, X, y, 1.0, stats, amplitude_steps=6)
    fw, switches = latents(net, p, X)
    hs = _amplitudes.refine_codes(net, p, fw, switches, 6)
    for l in range(2):
        e = hs[l] - _amplitudes._render(net, p, l, hs[l + 1], fw.idxs, switches)
        np.testing.assert_allclose(_em._rss(stats, l, p[f"W{l}"]), np.sum(e ** 2), rtol=1e-9)


# Whole EM iterations with fresh bottom-up latents are not monotone: the next E-step's
# latents can be worse for a sample than its previous ones, and normalize_templates
# rescales the codes, which changes J for layers >= 2. em_monotone=True keeps every
# sample's better latents and does not rescale (fastdrmm/_latents.py); then no iteration
# raises the layers' and priors' part of J.
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_monotone_em_never_raises_the_objective(n_layers, rng):
    model, *_ = started(rng, n_layers, max_iter=5, amplitude_steps=5, em_monotone=True)
    before = [record["layer_objective"] for record in model.history_]
    after = [record["layer_objective_after_m_step"] for record in model.history_]
    assert len(before) == 5 and all(np.isfinite(before))
    for b, a in zip(before, after):  # the M-step
        assert a <= b + 1e-9 * abs(b)
    for a, b in zip(after, before[1:]):  # the E-step, then the whole iteration
        assert b <= a + 1e-9 * abs(a)
    assert before[-1] < before[0]


def test_fresh_latents_alone_can_raise_the_objective(rng):
    """Why the monotone E-step exists: with fresh latents every iteration (the default) some
    iteration of these small problems raises J (so the test above can fail)."""
    rises = 0
    for n_layers in (1, 2, 3):
        model, *_ = started(rng, n_layers, max_iter=5, amplitude_steps=5)
        before = [record["layer_objective"] for record in model.history_]
        rises += sum(b > a + 1e-9 * abs(a) for a, b in zip(before, before[1:]))
    assert rises > 0


@pytest.mark.parametrize("n_layers", [1, 2])
def test_an_em_model_renders_its_samples_below_the_pixel_variance(n_layers, rng):
    """Every sample rendered top-down from its own refined top code, through its latents,
    comes within the pixel variance of x (bottom-up codes overshoot it many times)."""
    model, net, p, X, y = started(rng, n_layers, max_iter=4, amplitude_steps=10)
    fw, switches = latents(net, p, X)
    own = net.render_down(p, fw.hs[-1], fw.idxs, switches)[0]
    assert np.mean((own - X) ** 2) > np.var(X)
    hs = _amplitudes.refine_codes(net, p, fw, switches, 10)
    rendered = net.render_down(p, hs[-1], fw.idxs, switches)[0]
    assert np.mean((rendered - X) ** 2) < 0.1 * np.var(X)
