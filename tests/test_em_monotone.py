"""The monotone E-step (em_monotone=True, fastdrmm/_latents.py): the per-sample choice is the
better of two, its memory survives a checkpoint, and a resumed EM run ends bit-identical."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import fastdrmm
from fastdrmm import DRMM, Layer, _latents, _training

SMALL = [Layer(4, 3, padding=1, pool=2), Layer(5, 3, padding=1)]


def _data(rng, n=30):
    X = rng.random((n, 1, 10, 10))
    y = rng.integers(0, 3, n)
    y[:3] = np.arange(3)
    return X, y


def _settings(**kw):
    kw.setdefault("em_monotone", True)
    return dict(layers=SMALL, n_classes=3, algorithm="em", dtype="float64",
                validation_fraction=0, random_state=0, amplitude_steps=3, tol=0, **kw)


def _fit(X, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return DRMM(**_settings(**kw)).fit(X, y)


def test_each_sample_takes_the_latents_with_the_lower_objective(rng):
    X, y = _data(rng)
    model = _fit(X, y, max_iter=2)
    net, p = model._net(), model.parameters_
    fw = net.bottom_up(p, X)
    switches = [fw.switches(l, X.dtype) for l in range(net.n_layers)]
    fresh = (list(fw.hs[1:]), list(fw.idxs), switches)
    # the other candidate: the same latents with every code halved (refined 0 steps)
    previous = ([c * 0.5 for c in fresh[0]], fresh[1], fresh[2])
    chosen, kept = _latents.better_latents(net, p, X, fresh, previous, steps=0)
    J_fresh = _latents.sample_objective(net, p, X, fresh)
    J_prev = _latents.sample_objective(net, p, X, previous)
    np.testing.assert_array_equal(kept, J_prev < J_fresh)
    J_chosen = _latents.sample_objective(net, p, X, chosen)
    np.testing.assert_allclose(J_chosen, np.minimum(J_fresh, J_prev), rtol=1e-12)


def test_the_sample_objective_is_the_objectives_per_sample_part(rng):
    """Summed over samples, J_n differs from the objective (layers and priors, times the
    weight) by terms that do not depend on the latents: the same for two latent sets."""
    from fastdrmm import _em

    X, y = _data(rng)
    model = _fit(X, y, max_iter=1)
    net, p = model._net(), model.parameters_
    totals = []
    for steps in (0, 3):
        fw = net.bottom_up(p, X)
        switches = [fw.switches(l, X.dtype) for l in range(net.n_layers)]
        codes = _latents._amplitudes.refine_codes(net, p, fw, switches, steps)[1:]
        latents = (list(codes), list(fw.idxs), switches)
        stats = _em.Statistics(net)
        _em.e_step(net, p, X, y, 1.0, stats, choose=lambda x, fresh: latents)
        # ridge 0: the relative ridge's scale comes from the statistics themselves
        J = _em.objective(net, p, stats, 0.0, top=False) * stats.weight
        totals.append((J, float(np.sum(_latents.sample_objective(net, p, X, latents)))))
    (J0, n0), (J1, n1) = totals
    assert not np.isclose(n0, n1)
    np.testing.assert_allclose(J1 - J0, n1 - n0, rtol=1e-9)


@pytest.mark.parametrize("monotone", [True, False])
def test_a_resumed_em_run_ends_bit_identical(monotone, rng, tmp_path, monkeypatch):
    """EM's new state (the shared-covariance top, and the monotone E-step's memory) goes
    through the checkpoint: the resumed run is the uninterrupted one."""
    X, y = _data(rng)
    y[rng.random(y.size) < 0.3] = -1
    y[:3] = np.arange(3)
    whole = _fit(X, y, max_iter=3, em_monotone=monotone)
    ckpt = tmp_path / "run.ckpt"
    original = _training.EM.epoch
    calls = []

    def interrupted(self, run):
        calls.append(run.epoch)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, run)

    monkeypatch.setattr(_training.EM, "epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(X, y, max_iter=3, checkpoint=ckpt, em_monotone=monotone)
    monkeypatch.setattr(_training.EM, "epoch", original)
    arrays, _ = fastdrmm.io.load_arrays(ckpt)
    assert "class_weights" in arrays and "top_covariance" in arrays
    if monotone:
        assert arrays["latents.filled"].all()  # the memory is in the checkpoint
    else:
        assert "latents.filled" not in arrays
    assert fastdrmm.load(ckpt).n_iter_ == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        resumed = DRMM(**_settings(max_iter=3, checkpoint=ckpt, em_monotone=monotone)).fit(
            X, y, resume=True)
    for name, value in whole.parameters_.items():
        np.testing.assert_array_equal(resumed.parameters_[name], value, err_msg=name)
    assert [r["layer_objective"] for r in resumed.history_] == [
        r["layer_objective"] for r in whole.history_]


def test_monotone_em_refuses_the_top_down_m_step(rng):
    X, y = _data(rng)
    with pytest.raises(ValueError, match="em_monotone=True needs em_targets='bottom-up'"):
        DRMM(**_settings(max_iter=1, em_targets="top-down")).fit(X, y)
