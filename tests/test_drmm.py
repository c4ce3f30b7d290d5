"""The deep model: inference and rendering against explicit compositions of the ops, EG
gradients against finite differences, the EM M-step's exactness, learning on MNIST,
persistence, checkpoints and resume, partial_fit, and argument checking."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from archive_tools import alter_member, npy_bytes, rebuild_archive
from campaign import MNIST_DIR, requires_mnist
from sklearn.exceptions import NotFittedError

import fastdrmm
from fastdrmm import DRMM, Layer, ops
from fastdrmm import _drmm_format, _em, _training
from fastdrmm._network import (LossWeights, Network, eg_loss_and_grads, trainable_names,
                               translate)
from fastdrmm._optim import Adam
from fastdrmm.layers import PRESETS, layer_shapes, resolve_layers

SHARED_MNIST = MNIST_DIR

# a small model on 12x12 images: a pooled padded leaky layer, then an unpooled one
SMALL = [Layer(4, 3, padding=1, pool=2, leak=0.1), Layer(5, 3)]


def small_data(rng, n=24, n_classes=3, shape=(2, 12, 12), unlabeled=0.0):
    X = rng.random((n, *shape)).astype(np.float32)
    y = rng.integers(0, n_classes, n)
    y[: n_classes] = np.arange(n_classes)
    if unlabeled:
        y[rng.random(n) < unlabeled] = -1
    return X, y


def fitted_small(rng, algorithm="eg", max_iter=0, dtype="float32", **kw):
    X, y = small_data(rng)
    model = DRMM(SMALL, 3, algorithm=algorithm, max_iter=max_iter, batch_size=8,
                 random_state=0, dtype=dtype, validation_fraction=0, **kw)
    return model.fit(X, y), X, y


# --------------------------------------------------------------------------------------------
# layers and presets


def test_layer_checks_its_fields():
    assert Layer(8, 3, pool=1).pool is None
    assert Layer(8, (3, 5), padding=(1, 2), pool=(2, 3)).window == (2, 3)
    with pytest.raises(ValueError, match="n_templates"):
        Layer(0, 3)
    with pytest.raises(TypeError, match="kernel_size"):
        Layer(4, "3")
    with pytest.raises(ValueError, match="leak"):
        Layer(4, 3, leak=1.5)
    with pytest.raises(ValueError, match="padding"):
        Layer(4, 3, padding=-1)
    assert Layer.from_dict(Layer(4, 3, padding=1, pool=2).to_dict()) == Layer(4, 3, 1, 2)


def test_presets_and_their_shapes():
    conv_small = layer_shapes(PRESETS["conv-small"], (1, 28, 28))
    assert [s.pooled for s in conv_small] == [(16, 16), (14, 14), (8, 8), (6, 6)]
    assert [s.plane for s in conv_small] == [(32, 32), (14, 14), (16, 16), (6, 6)]
    assert [s.pooled for s in layer_shapes(PRESETS["two-layer"], (1, 28, 28))] == [(14, 14),
                                                                                    (7, 7)]
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_layers("conv-huge")
    with pytest.raises(ValueError, match=r"layers\[1\] does not fit"):
        layer_shapes([Layer(4, 5, pool=2), Layer(4, 9)], (1, 12, 12))
    with pytest.raises(ValueError, match=r"layers\[0\]"):
        resolve_layers([{"n_templates": 0, "kernel_size": 3}])


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shapes_and_dtypes_through_every_preset(preset, dtype, rng):
    X = rng.random((5, 1, 28, 28))
    y = np.array([0, 1, 2, 1, -1])
    model = DRMM(preset, 3, max_iter=0, dtype=dtype, random_state=0).fit(X, y)
    k_top = PRESETS[preset][-1].n_templates
    want = np.dtype(dtype)
    assert model.decision_function(X).shape == (5, 3)
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert set(model.predict(X)) <= {0, 1, 2}
    f = model.transform(X)
    assert f.shape == (5, k_top) and f.dtype == want
    r = model.reconstruct(X)
    assert r.shape == X.shape and r.dtype == want
    s = model.sample([0, 2, 2], random_state=1)
    assert s.shape == (3, 1, 28, 28) and s.dtype == want
    for name, value in model.parameters_.items():
        if name[:1] in "Wb" and name[1:].isdigit() or name in ("mu", "beta"):
            assert value.dtype == want, name


# --------------------------------------------------------------------------------------------
# inference and rendering are the explicit composition of the ops


@pytest.mark.parametrize("top", ["average", "full"])
def test_bottom_up_is_the_composition_of_match_switch_pool(top, rng):
    model, X, _ = fitted_small(rng, dtype="float64", top=top)
    p = model.parameters_
    h = X.astype(np.float64)
    for l, layer in enumerate(SMALL):
        h, _ = ops.match_switch_pool(h, p[f"W{l}"], p[f"b{l}"], padding=layer.padding,
                                     pool=layer.window, leak=layer.leak, backend="numpy")
    f = h.mean(axis=(2, 3)) if top == "average" else h.reshape(len(X), -1)
    np.testing.assert_allclose(model.transform(X), f, rtol=1e-12, atol=1e-12)
    scores = float(p["class_scale"]) * f @ p["mu"].T + p["beta"]
    np.testing.assert_allclose(model.decision_function(X), scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top", ["average", "full"])
def test_reconstruct_is_the_composition_of_render(top, rng):
    model, X, y = fitted_small(rng, dtype="float64", top=top)
    p = model.parameters_
    hs, idxs = [X.astype(np.float64)], []
    for l, layer in enumerate(SMALL):
        h, idx = ops.match_switch_pool(hs[-1], p[f"W{l}"], p[f"b{l}"], padding=layer.padding,
                                       pool=layer.window, leak=layer.leak, backend="numpy")
        hs.append(h)
        idxs.append(idx)
    labels = np.where(np.arange(len(y)) % 2 == 0, y, -1)  # half given, half predicted
    cls = np.where(labels >= 0, labels, model.predict(X))
    if top == "average":
        r = np.broadcast_to(p["mu"][cls][:, :, None, None], hs[-1].shape).copy()
    else:
        r = p["mu"][cls].reshape(hs[-1].shape)
    for l in range(len(SMALL) - 1, -1, -1):
        r = ops.render(r, idxs[l], p[f"W{l}"], hs[l].shape[2:], padding=SMALL[l].padding,
                       switches=(hs[l + 1] > 0), backend="numpy")
    np.testing.assert_allclose(model.reconstruct(X, labels), r, rtol=1e-12, atol=1e-12)


def test_sample_draws_latents_from_the_priors(rng):
    model, _, _ = fitted_small(rng, dtype="float64")
    p = dict(model.parameters_)
    # all switches off at the top: nothing is rendered
    p["switch_prior1"] = np.full(5, 1e-300)
    model.parameters_ = p
    assert not model.sample([0, 1], random_state=0).any()
    p["switch_prior1"] = np.full(5, 1.0)
    p["switch_prior0"] = np.full(4, 1.0)
    p["translation_prior0"] = np.array([1.0, 0, 0, 0])  # always the window's first position
    model.parameters_ = p
    a, b = model.sample([1, 1], random_state=3), model.sample([1, 1], random_state=3)
    np.testing.assert_array_equal(a, b)
    # deterministic latents: both samples of one class are identical, and equal the render
    np.testing.assert_array_equal(a[0], a[1])
    with pytest.raises(ValueError, match="classes"):
        model.sample([3])
    with pytest.raises(TypeError, match="classes"):
        model.sample([0.5])


# --------------------------------------------------------------------------------------------
# EG gradients


def _loss(net, p, X, y, weights, targets=None):
    return eg_loss_and_grads(net, p, X, y, weights, need_grads=False, targets=targets)[0]


@pytest.mark.parametrize("top", ["average", "full"])
@pytest.mark.parametrize("layers", [SMALL, [Layer(3, 2, padding=1, pool=(2, 3)),
                                            Layer(4, 2, pool=2, leak=0.2)]])
def test_eg_gradients_match_finite_differences(layers, top, rng):
    X = rng.standard_normal((6, 2, 9, 9))
    y = np.array([0, 1, -1, 2, -1, 1])
    net = Network(layers, X.shape[1:], 3, backend="numpy", top=top)
    model = DRMM(layers, 3, init="he", dtype="float64", top=top)
    p = model._init_params(net, X, y, 0)
    for name in trainable_names(len(layers)):  # biases away from zero: no ties at the switch
        if name[0] == "b" or name == "beta":
            p[name] = p[name] + rng.standard_normal(p[name].shape) * 0.1
    weights = LossWeights(xent=1.0, reconstruction=0.7, entropy=0.3, nonnegativity=0.5,
                          kl=0.4, consistency=0.6)
    targets = rng.dirichlet(np.ones(3), size=int((y < 0).sum()))  # posteriors of other views
    targets[-1] = 0  # a sample left out of the consistency term (confidence_threshold)
    loss, terms, grads, _ = eg_loss_and_grads(net, p, X, y, weights, targets=targets)
    assert all(terms[t] > 0 for t in ("xent", "entropy", "reconstruction", "nonnegativity",
                                      "kl", "consistency"))
    _loss = functools.partial(globals()["_loss"], targets=targets)
    eps = 1e-6
    for name in trainable_names(len(layers)):
        g = grads[name]
        assert g.shape == p[name].shape and np.isfinite(g).all()
        flat = rng.choice(p[name].size, size=min(6, p[name].size), replace=False)
        for i in flat:
            index = np.unravel_index(i, p[name].shape)
            plus, minus = dict(p), dict(p)
            plus[name], minus[name] = p[name].copy(), p[name].copy()
            plus[name][index] += eps
            minus[name][index] -= eps
            fd = (_loss(net, plus, X, y, weights) - _loss(net, minus, X, y, weights)) / (2 * eps)
            assert g[index] == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, index)
        # and along one random direction of the whole parameter
        d = rng.standard_normal(p[name].shape)
        plus, minus = dict(p), dict(p)
        plus[name], minus[name] = p[name] + eps * d, p[name] - eps * d
        fd = (_loss(net, plus, X, y, weights) - _loss(net, minus, X, y, weights)) / (2 * eps)
        assert np.sum(g * d) == pytest.approx(fd, rel=1e-5, abs=1e-8), name


def test_kl_and_consistency_terms_are_what_the_docs_say(rng):
    X, y = small_data(rng, n=10, unlabeled=0.5)
    net = Network(SMALL, X.shape[1:], 3, backend="numpy")
    p = DRMM(SMALL, 3, dtype="float64")._init_params(net, X.astype(np.float64), y, 2)
    X = X.astype(np.float64)
    unl = y < 0
    targets = rng.dirichlet(np.ones(3), size=int(unl.sum()))
    _, terms, _, fw = eg_loss_and_grads(net, p, X, y, LossWeights(kl=1, consistency=1),
                                        need_grads=False, targets=targets)
    prob = np.exp(fw.scores - fw.scores.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    p_bar = prob[unl].mean(0)
    assert terms["kl"] == pytest.approx(np.sum(p_bar * np.log(p_bar * 3)))
    kl_rows = np.sum(targets * (np.log(targets) - np.log(prob[unl])), axis=1)
    assert terms["consistency"] == pytest.approx(kl_rows.mean())
    # the targets are the posteriors themselves: nothing to pull, the term is zero
    _, terms, _, _ = eg_loss_and_grads(net, p, X, y, LossWeights(consistency=1),
                                       need_grads=False, targets=prob[unl])
    assert terms["consistency"] == pytest.approx(0, abs=1e-12)
    # hard targets (confidence_threshold): -ln p of the chosen class, zero rows left out
    hard = np.zeros_like(targets)
    hard[0, 2] = 1
    _, terms, _, _ = eg_loss_and_grads(net, p, X, y, LossWeights(consistency=1),
                                       need_grads=False, targets=hard)
    assert terms["consistency"] == pytest.approx(-np.log(prob[unl][0, 2]) / unl.sum())
    with pytest.raises(ValueError, match="targets must have shape"):
        eg_loss_and_grads(net, p, X, y, LossWeights(consistency=1), targets=targets[:-1])


def test_translate_moves_every_image_by_its_own_shift(rng):
    X = rng.standard_normal((5, 2, 6, 7)).astype(np.float32)
    shifts = np.array([[0, 0], [1, 0], [0, -2], [-1, 2], [2, 1]])
    out = translate(X[:, :, :, ::-1], shifts)  # a non-contiguous input
    src = X[:, :, :, ::-1]
    for n, (dy, dx) in enumerate(shifts):
        want = np.zeros_like(src[n])
        ys, xs = slice(max(dy, 0), 6 + min(dy, 0)), slice(max(dx, 0), 7 + min(dx, 0))
        yd, xd = slice(max(-dy, 0), 6 + min(-dy, 0)), slice(max(-dx, 0), 7 + min(-dx, 0))
        want[:, ys, xs] = src[n][:, yd, xd]
        np.testing.assert_array_equal(out[n], want)
    assert out.dtype == X.dtype and out.flags.c_contiguous


def test_translation_and_consistency_train_deterministically(rng):
    X, y = small_data(rng, n=24, unlabeled=0.5)
    kw = dict(max_iter=2, batch_size=8, random_state=3, validation_fraction=0, translation=1,
              consistency_weight=1.0, kl_weight=0.5)
    a = DRMM(SMALL, 3, **kw).fit(X, y)
    b = DRMM(SMALL, 3, **kw).fit(X, y)
    assert all(np.isfinite(r["consistency"]) for r in a.history_)
    assert a.history_[-1]["consistency"] > 0
    c = DRMM(SMALL, 3, **{**kw, "translation": 0}).fit(X, y)
    teacher = DRMM(SMALL, 3, **{**kw, "teacher_decay": 0.5}).fit(X, y)
    gated = DRMM(SMALL, 3, **{**kw, "confidence_threshold": 0.4}).fit(X, y)
    assert not np.array_equal(a.parameters_["W0"], gated.parameters_["W0"])
    # a threshold no posterior reaches leaves every sample out of the term
    none = DRMM(SMALL, 3, **{**kw, "confidence_threshold": 1.0}).fit(X, y)
    assert all(r["consistency"] == 0 for r in none.history_)
    for name, value in a.parameters_.items():
        np.testing.assert_array_equal(value, b.parameters_[name], err_msg=name)
    assert not np.array_equal(a.parameters_["W0"], c.parameters_["W0"])
    assert not np.array_equal(a.parameters_["W0"], teacher.parameters_["W0"])


def test_adam_keeps_the_moving_average_of_the_parameters(rng):
    params = {"w": rng.standard_normal(5).astype(np.float32), "other": np.ones(2)}
    opt = Adam(params, ["w"], average_decay=0.75)
    want = params["w"].astype(np.float64)
    for _ in range(4):
        opt.step(params, {"w": rng.standard_normal(5)}, 0.1)
        want = 0.75 * want + 0.25 * params["w"]
    averaged = opt.averaged(params)
    np.testing.assert_allclose(averaged["w"], want.astype(np.float32), rtol=1e-6)
    assert averaged["w"].dtype == np.float32 and averaged["other"] is params["other"]
    assert Adam(params, ["w"]).averaged(params) is params


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay, average_decay", [(0.0, 0.0), (1e-2, 0.9)])
def test_adam_compiled_update_matches_the_numpy_expressions_bit_for_bit(
        rng, monkeypatch, dtype, weight_decay, average_decay):
    from fastdrmm import _optim

    shapes = {"W0": (3, 2, 3, 3), "b0": (3,), "mu": (4, 5), "frozen": (2,)}
    start = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    names = ["W0", "b0", "mu"]
    from fastdrmm.kernels.cpu import elementwise

    real, calls = elementwise.adam_update, []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(elementwise, "adam_update", spy)
    runs = []
    for compiled in (True, False):
        if not compiled:
            assert len(calls) == 6 * len(names)  # the compiled update did run
            monkeypatch.setattr(_optim, "_update_kernels", lambda: None)
        params = {n: a.copy() for n, a in start.items()}
        opt = Adam(params, names, average_decay=average_decay)
        grads_rng = np.random.default_rng(7)
        for step in range(6):
            grads = {n: grads_rng.standard_normal(shapes[n]).astype(dtype) for n in names}
            grads["b0"][0] = 0.0  # a zero gradient: v stays 0 there
            opt.step(params, grads, 1e-2 * (step + 1), weight_decay=weight_decay)
        runs.append((params, opt))
    (p1, o1), (p2, o2) = runs
    assert len(calls) == 6 * len(names)  # and the NumPy expressions ran the second time
    for n in shapes:
        assert p1[n].dtype == dtype
        np.testing.assert_array_equal(p1[n], p2[n], err_msg=n)
    for n in names:
        np.testing.assert_array_equal(o1.m[n], o2.m[n], err_msg=n)
        np.testing.assert_array_equal(o1.v[n], o2.v[n], err_msg=n)
        if average_decay:
            np.testing.assert_array_equal(o1.average[n], o2.average[n], err_msg=n)
    assert not np.array_equal(p1["W0"], start["W0"]) and np.array_equal(p1["frozen"],
                                                                          start["frozen"])


def test_eg_gradients_agree_between_backends(rng):
    X, y = small_data(rng, n=8, unlabeled=0.4)
    net64 = Network(SMALL, X.shape[1:], 3, backend="numpy")
    p = DRMM(SMALL, 3, dtype="float64")._init_params(net64, X.astype(np.float64), y, 1)
    weights = LossWeights()
    _, _, g64, _ = eg_loss_and_grads(net64, p, X.astype(np.float64), y, weights)
    net32 = Network(SMALL, X.shape[1:], 3, backend="cpu")
    p32 = {k: (v.astype(np.float32) if k[:1] in "Wb" and k[1:].isdigit() or k in ("mu", "beta")
               else v) for k, v in p.items()}
    _, _, g32, _ = eg_loss_and_grads(net32, p32, X, y, weights)
    for name in g64:
        scale = np.abs(g64[name]).max() + 1e-12
        np.testing.assert_allclose(g32[name] / scale, g64[name] / scale, atol=2e-4, err_msg=name)


# --------------------------------------------------------------------------------------------
# hard EM


@pytest.mark.parametrize("top", ["average", "full"])
def test_em_m_step_never_increases_the_objective(top, rng):
    X, y = small_data(rng, n=40, unlabeled=0.3)
    model = DRMM(SMALL, 3, algorithm="em", max_iter=6, tol=0, random_state=2, top=top,
                 validation_fraction=0, unlabeled_weight=0.5, dtype="float64")
    with pytest.warns(Warning):  # does not converge in 6 iterations at tol=0
        model.fit(X, y)
    assert len(model.objective_history_) == 6
    for before, after in model.objective_history_:
        assert np.isfinite(before) and np.isfinite(after)
        assert after <= before + 1e-9 * abs(before)


@pytest.mark.parametrize("top", ["average", "full"])
def test_em_m_step_is_the_exact_minimiser(top, rng):
    X, y = small_data(rng, n=30)
    model = DRMM(SMALL, 3, algorithm="em", dtype="float64", random_state=0, top=top)
    net = model._network(SMALL, X.shape[1:])
    p = model._init_params(net, X.astype(np.float64), y, 0)
    stats = _em.Statistics(net)
    _em.e_step(net, p, X.astype(np.float64), y, 1.0, stats)
    new = _em.m_step(net, p, stats, 1e-3)
    best = _em.objective(net, new, stats, 1e-3)
    assert best <= _em.objective(net, p, stats, 1e-3)
    # any move away from the solution costs (an EM model's class means belong to its
    # shared-covariance top, scikit-learn's estimate, which the objective leaves out)
    for name in ("W0", "W1"):
        for _ in range(3):
            moved = dict(new)
            moved[name] = new[name] + 1e-3 * rng.standard_normal(new[name].shape)
            assert _em.objective(net, moved, stats, 1e-3) > best
    for scale in (0.9, 1.1):
        moved = dict(new)
        moved["noise_variance"] = new["noise_variance"] * scale
        assert _em.objective(net, moved, stats, 1e-3) > best
    # the unit-norm reparametrisation keeps every rendering
    norm = _em.normalize_templates(net, new)
    for l in range(2):
        np.testing.assert_allclose(np.sqrt((norm[f"W{l}"] ** 2).sum(axis=(1, 2, 3))), 1.0)


def test_template_seeds_from_fewer_non_zero_patches_than_templates(rng):
    h = np.zeros((2, 3, 6, 6))
    h[0, :, 1, 1] = 1.0  # only the few 3x3 patches covering this entry are non-zero
    seeds = _em.random_patches(h, Layer(20, 3), 20, rng)
    assert seeds.shape == (20, 3, 3, 3)
    assert all(np.abs(s).sum() > 0 for s in seeds)  # drawn only among the non-zero ones
    zeros = _em.random_patches(np.zeros((1, 2, 4, 4)), Layer(5, 3), 5, rng)
    assert zeros.shape == (5, 2, 3, 3)


def test_em_fits_semi_and_unsupervised(rng):
    X, y = small_data(rng, n=30, unlabeled=0.5)
    for labels in (y, None):
        model = DRMM(SMALL, 3, algorithm="em", max_iter=2, random_state=0, tol=0,
                     validation_fraction=0)
        with pytest.warns(Warning):
            model.fit(X, labels)
        assert model.n_iter_ == 2
        assert np.isfinite(model.decision_function(X)).all()
        for l in range(2):
            prior = model.parameters_[f"translation_prior{l}"]
            assert prior.sum() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# learning on MNIST


@requires_mnist
def test_a_small_drmm_learns_mnist():
    X, y, Xt, yt = fastdrmm.load_mnist(SHARED_MNIST, return_X_y=True)
    model = DRMM("two-layer", 10, max_iter=10, learning_rate=5e-3, lr_schedule="constant",
                 batch_size=64, random_state=0, validation_fraction=0.1)
    model.fit(X[:2000], y[:2000])
    accuracy = model.score(Xt[:2000], yt[:2000])
    # chance is 0.1; seeds 0, 1, 2 of this setting reach 0.732, 0.7245, 0.7705
    assert accuracy > 0.70, accuracy
    assert model.validation_score_ == max(h["validation_accuracy"] for h in model.history_)
    assert model.history_[-1]["xent"] < model.history_[0]["xent"]


# --------------------------------------------------------------------------------------------
# determinism, persistence, checkpoints


def test_same_seed_same_model_bit_for_bit(rng):
    X, y = small_data(rng, unlabeled=0.3)
    fits = [DRMM(SMALL, 3, max_iter=2, batch_size=8, random_state=5).fit(X, y)
            for _ in range(2)]
    for name, value in fits[0].parameters_.items():
        np.testing.assert_array_equal(value, fits[1].parameters_[name], err_msg=name)
    other = DRMM(SMALL, 3, max_iter=2, batch_size=8, random_state=6).fit(X, y)
    assert not np.array_equal(other.parameters_["W0"], fits[0].parameters_["W0"])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("algorithm", ["eg", "em"])
def test_save_load_round_trip_is_bit_identical(algorithm, rng, tmp_path):
    model, X, _ = fitted_small(rng, algorithm=algorithm, max_iter=1)
    path = tmp_path / "model.npz"
    model.save(path, metadata={"dataset": "random", "n": 24})
    loaded = fastdrmm.load(path)
    assert isinstance(loaded, DRMM)
    assert loaded.user_metadata_ == {"dataset": "random", "n": 24}
    assert loaded.get_params()["layers"] == [layer for layer in SMALL]
    for name, value in model.parameters_.items():
        assert loaded.parameters_[name].dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(loaded.parameters_[name], value, err_msg=name)
    np.testing.assert_array_equal(loaded.decision_function(X), model.decision_function(X))
    np.testing.assert_array_equal(loaded.reconstruct(X), model.reconstruct(X))
    assert loaded.history_ == model.history_
    # loadable on any backend
    loaded.set_params(backend="numpy")
    np.testing.assert_allclose(loaded.decision_function(X), model.decision_function(X),
                               rtol=1e-4, atol=1e-4)


def test_corrupted_or_truncated_files_are_refused(rng, tmp_path):
    model, _, _ = fitted_small(rng)
    path = tmp_path / "model.npz"
    model.save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        fastdrmm.load(truncated)
    # a byte inside W0's data flipped, the archive rebuilt with valid CRCs: zipfile's own
    # check passes, so only the library's sha256 can refuse it
    header = len(npy_bytes(np.asarray(model.parameters_["W0"]))) - model.parameters_["W0"].nbytes
    corrupted = alter_member(path, "W0.npy", offset=header + 7, xor=0x40,
                             out=tmp_path / "corrupted.npz")
    with pytest.raises(ValueError, match="'W0': sha256 mismatch"):
        fastdrmm.load(corrupted)
    # a failed save leaves the previous file intact
    before = path.read_bytes()
    model.parameters_ = dict(model.parameters_, W0=object())
    with pytest.raises(Exception):
        model.save(path)
    assert path.read_bytes() == before


def test_load_refuses_a_wrong_model(rng, tmp_path):
    model, _, _ = fitted_small(rng)
    arrays = _drmm_format.param_arrays(model.parameters_)
    arrays["W1"] = arrays["W1"][:, :2]
    meta = _drmm_format.metadata(model)
    path = tmp_path / "bad.npz"
    fastdrmm.io.save_arrays(path, arrays, meta)
    with pytest.raises(ValueError, match="W1.*shape"):
        fastdrmm.load(path)
    fastdrmm.io.save_arrays(path, arrays, {"model_class": "Nope"})
    with pytest.raises(ValueError, match="no fastdrmm model"):
        fastdrmm.load(path)


@pytest.mark.parametrize("semi", [{}, {"translation": 1, "consistency_weight": 1.0,
                                       "teacher_decay": 0.9, "kl_weight": 0.3}])
def test_resume_after_an_interruption_ends_as_an_uninterrupted_run(rng, tmp_path,
                                                                   monkeypatch, semi):
    X, y = small_data(rng, n=32, unlabeled=0.25)
    settings = dict(max_iter=3, batch_size=8, random_state=1, validation_fraction=0.2, **semi)
    whole = DRMM(SMALL, 3, **settings).fit(X, y)

    ckpt = tmp_path / "run.ckpt"
    original = _training.EG.epoch
    calls = []

    def interrupted(self, run, constant_rate=False):
        calls.append(run.epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, run, constant_rate)

    monkeypatch.setattr(_training.EG, "epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DRMM(SMALL, 3, checkpoint=ckpt, **settings).fit(X, y)
    monkeypatch.setattr(_training.EG, "epoch", original)
    partial = fastdrmm.load(ckpt)  # the checkpoint of epoch 1 is intact and loadable
    assert partial.n_iter_ == 1

    resumed = DRMM(SMALL, 3, checkpoint=ckpt, **settings).fit(X, y, resume=True)
    assert resumed.n_iter_ == 3 and len(resumed.history_) == 3
    for name, value in whole.parameters_.items():
        np.testing.assert_array_equal(resumed.parameters_[name], value, err_msg=name)
    with pytest.raises(ValueError, match="other settings.*learning_rate"):
        DRMM(SMALL, 3, checkpoint=ckpt, learning_rate=0.5, **settings).fit(X, y, resume=True)


def test_callback_sees_every_epoch_and_extends_the_history(rng):
    X, y = small_data(rng, n=32)
    seen = []

    def callback(snapshot, record):
        seen.append((record["epoch"], snapshot.n_iter_))
        return {"train_accuracy": snapshot.score(X, y)}

    model = DRMM(SMALL, 3, max_iter=3, batch_size=8, random_state=0, validation_fraction=0)
    model.fit(X, y, callback=callback)
    assert seen == [(1, 1), (2, 2), (3, 3)]
    assert model.history_[-1]["train_accuracy"] == model.score(X, y)
    with pytest.raises(TypeError, match="callback"):
        model.fit(X, y, callback=3)


def test_partial_fit_streams(rng):
    X, y = small_data(rng, n=32)
    for algorithm in ("eg", "em"):
        model = DRMM(SMALL, 3, algorithm=algorithm, batch_size=8, random_state=0)
        model.partial_fit(X[:16], y[:16])
        first = {k: np.copy(v) for k, v in model.parameters_.items()}
        model.partial_fit(X[16:], y[16:])
        assert model.n_iter_ == 2
        assert not np.array_equal(first["W0"], model.parameters_["W0"])
        assert np.isfinite(model.predict_proba(X)).all()
        with pytest.raises(ValueError, match="fitted on"):
            model.partial_fit(X[:, :, :10, :10], y)


# --------------------------------------------------------------------------------------------
# argument checking


def test_one_specification_covers_every_setting(rng):
    """Every setting has its constraints (checked before any work, naming the setting), and
    the settings a resumed run may change are settings."""
    from sklearn.utils._param_validation import InvalidParameterError

    from fastdrmm._drmm_params import RESUMABLE

    names = set(DRMM().get_params())
    assert set(DRMM._parameter_constraints) == names
    assert set(RESUMABLE) < names
    X, y = small_data(rng)
    with pytest.raises(InvalidParameterError, match="'max_iter' parameter of DRMM"):
        DRMM(SMALL, 3, max_iter=True).fit(X, y)
    with pytest.raises(InvalidParameterError, match="'xent_weight' parameter of DRMM"):
        DRMM(SMALL, 3, xent_weight=float("inf")).fit(X, y)


def test_layers_may_be_any_sequence_of_layers(rng):
    # resolve_layers takes any iterable of Layer or dicts; the constraints leave it to it
    X, y = small_data(rng)
    as_array = np.empty(len(SMALL), object)
    as_array[:] = SMALL
    for layers in (as_array, [layer.to_dict() for layer in SMALL]):
        model = DRMM(layers, 3, max_iter=1, random_state=0).fit(X, y)
        assert model.predict(X).shape == (len(X),)


def test_a_callback_may_change_max_iter_of_the_model_it_trains(rng):
    # max_iter is read before every epoch, as the loop has always done
    X, y = small_data(rng)
    model = DRMM(SMALL, 3, max_iter=5, random_state=0)
    model.fit(X, y, callback=lambda snapshot, record: model.set_params(max_iter=2) and None)
    assert model.n_iter_ == 2


def test_bad_arguments_are_named(rng):
    X, y = small_data(rng)
    for kw, match in [({"algorithm": "sgd"}, "algorithm"), ({"n_classes": 1}, "n_classes"),
                      ({"batch_size": 0}, "batch_size"), ({"learning_rate": 0}, "learning_rate"),
                      ({"lr_schedule": "warm"}, "lr_schedule"), ({"dtype": "int8"}, "dtype"),
                      ({"validation_fraction": 0.9}, "validation_fraction"),
                      ({"entropy_weight": -1}, "entropy_weight"), ({"init": "zeros"}, "init"),
                      ({"layers": []}, "layers"), ({"bias": "learned"}, "bias"),
                      ({"kl_weight": -0.5}, "kl_weight"), ({"translation": -1}, "translation"),
                      ({"consistency_weight": "x"}, "consistency_weight"),
                      ({"teacher_decay": 1.0}, "teacher_decay"),
                      ({"confidence_threshold": 1.5}, "confidence_threshold"),
                      ({"backend": "cupy"}, "GPU backends are available through fastdrmm.ops"),
                      ({"backend": "gpu"}, "backend")]:
        with pytest.raises((TypeError, ValueError), match=match):
            DRMM(**{"layers": SMALL, "n_classes": 3, **kw}).fit(X, y)
    model = DRMM(SMALL, 3, max_iter=0)
    with pytest.raises(NotFittedError):
        model.predict(X)
    with pytest.raises(ValueError, match="4-d"):
        model.fit(X[:, 0], y)
    bad = X.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.fit(bad, y)
    with pytest.raises(ValueError, match=r"y holds 3"):
        model.fit(X, np.full(len(X), 3))
    with pytest.raises(ValueError, match=r"y must have shape"):
        model.fit(X, y[:-1])
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        model.fit(X, y, resume=True)
    with pytest.raises(ValueError, match="does not fit"):
        DRMM(SMALL, 3).fit(X[:, :, :3, :3], y)
    model.fit(X, y)
    with pytest.raises(ValueError, match="fitted on"):
        model.predict(X[:, :1])


def test_a_diverging_run_stops_with_a_clear_error(rng):
    X, y = small_data(rng)
    model = DRMM(SMALL, 3, max_iter=3, learning_rate=1e30, batch_size=8, random_state=0,
                 validation_fraction=0)
    with pytest.raises(FloatingPointError, match="learning_rate"):
        with np.errstate(all="ignore"):
            model.fit(X * 100, y)


# --------------------------------------------------------------------------------------------
# fitted state: what predictions, partial_fit and resuming depend on


def _outputs(model, X):
    """Everything a fitted model computes from its state."""
    return {"decision_function": model.decision_function(X), "predict": model.predict(X),
            "transform": model.transform(X), "reconstruct": model.reconstruct(X),
            "reconstruct_code": model.reconstruct(X, source="code"),
            "sample": model.sample(np.arange(3), random_state=0)}


def _assert_same_outputs(got, expected, context):
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"{name} after {context}")


#: another valid value of every setting (the backend is an execution choice, read at
#: predict time by design: see test_save_load_round_trip_is_bit_identical)
OTHER_SETTINGS = {
    "layers": "two-layer", "n_classes": 5, "max_iter": 7, "batch_size": 3,
    "learning_rate": 0.5, "lr_schedule": "step", "xent_weight": 2.0,
    "reconstruction_weight": 0.7, "entropy_weight": 0.3, "nonnegativity_weight": 0.2,
    "kl_weight": 0.4, "consistency_weight": 0.5, "translation": 2, "teacher_decay": 0.5,
    "confidence_threshold": 0.9, "weight_decay": 0.1, "ridge": 0.5, "bias": "fixed",
    "unlabeled_weight": 0.2, "validation_fraction": 0.3, "n_iter_no_change": 2, "tol": 0.5,
    "init": "patches", "random_state": 99, "verbose": 1, "checkpoint": "elsewhere.ckpt",
    "amplitude_steps": 3, "em_targets": "top-down", "shrinkage": 0.5, "em_monotone": True,
}
FLIPPED = {"algorithm": {"eg": "em", "em": "eg"}, "dtype": {"float32": "float64",
                                                            "float64": "float32"},
           "top": {"average": "full", "full": "average"}}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("algorithm, top", [("eg", "average"), ("em", "full")])
def test_predictions_depend_only_on_the_fitted_state(algorithm, top, rng, tmp_path):
    model, X, _ = fitted_small(rng, algorithm=algorithm, max_iter=1, top=top)
    assert set(OTHER_SETTINGS) | set(FLIPPED) | {"backend"} == set(model.get_params())
    expected = _outputs(model, X)
    for name in sorted(set(OTHER_SETTINGS) | set(FLIPPED)):
        original = model.get_params()[name]
        other = OTHER_SETTINGS[name] if name in OTHER_SETTINGS else FLIPPED[name][original]
        model.set_params(**{name: other})
        _assert_same_outputs(_outputs(model, X), expected, f"set_params({name}={other!r})")
        model.set_params(**{name: original})
    # every setting changed at once, then saved and loaded: the fitted state travels
    model.set_params(**OTHER_SETTINGS, **{k: v[model.get_params()[k]] for k, v in FLIPPED.items()})
    _assert_same_outputs(_outputs(model, X), expected, "set_params of every setting")
    model.save(tmp_path / "model.npz")
    loaded = fastdrmm.load(tmp_path / "model.npz")
    assert loaded.get_params()["algorithm"] == FLIPPED["algorithm"][algorithm]
    assert (loaded.algorithm_, loaded.top_) == (algorithm, top)
    _assert_same_outputs(_outputs(loaded, X), expected, "save and load")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("algorithm", ["eg", "em"])
def test_fit_starts_afresh_after_partial_fit(algorithm, rng):
    X, y = small_data(rng, n=32)
    settings = dict(algorithm=algorithm, max_iter=1, batch_size=8, random_state=0,
                    validation_fraction=0)
    streamed = DRMM(SMALL, 3, **settings)
    streamed.partial_fit(X, y).partial_fit(X, y)
    streamed.fit(X, y)
    streamed.partial_fit(X, y)
    fresh = DRMM(SMALL, 3, **settings).fit(X, y).partial_fit(X, y)
    assert streamed.n_iter_ == fresh.n_iter_ == 1
    for name, value in fresh.parameters_.items():
        np.testing.assert_array_equal(streamed.parameters_[name], value, err_msg=name)


def test_partial_fit_after_a_change_of_structure_is_refused_and_fit_starts_again(rng):
    X, y = small_data(rng, n=32)
    model = DRMM(SMALL, 3, max_iter=1, batch_size=8, random_state=0, validation_fraction=0)
    model.fit(X, y).partial_fit(X, y)
    before = {k: np.copy(v) for k, v in model.parameters_.items()}
    for change in [{"layers": [Layer(3, 3, padding=1, pool=2)]}, {"n_classes": 4},
                   {"algorithm": "em"}, {"top": "full"}, {"dtype": "float64"}]:
        model.set_params(**change)
        with pytest.raises(ValueError, match=f"{next(iter(change))} changed.*call fit"):
            model.partial_fit(X, y)
        model.set_params(**DRMM(SMALL, 3).get_params() | {
            k: v for k, v in model.get_params().items() if k not in change})
        for name, value in before.items():  # the refused call left the model as it was
            np.testing.assert_array_equal(model.parameters_[name], value, err_msg=name)
    model.set_params(layers=[Layer(3, 3, padding=1, pool=2)])
    model.fit(X, y).partial_fit(X, y)
    assert model.parameters_["W0"].shape == (3, 2, 3, 3)


def _interrupted_run(tmp_path, X, y, stop_at=2, **settings):
    """The checkpoint of a run stopped by its callback at epoch ``stop_at`` (which raises
    before that epoch's checkpoint is written)."""
    ckpt = tmp_path / "run.ckpt"

    def stop(snapshot, record):
        if record["epoch"] == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        DRMM(SMALL, 3, checkpoint=ckpt, **settings).fit(X, y, callback=stop)
    return ckpt


def _never_called(snapshot, record):
    raise AssertionError("an epoch ran before the failure")


def test_resume_refuses_other_data_before_training(rng, tmp_path):
    X, y = small_data(rng, n=32, unlabeled=0.25)
    settings = dict(max_iter=3, batch_size=8, random_state=1, validation_fraction=0)
    ckpt = _interrupted_run(tmp_path, X, y, **settings)
    assert fastdrmm.load(ckpt).n_iter_ == 1
    model = DRMM(SMALL, 3, checkpoint=ckpt, **settings)
    other_x = X.copy()
    other_x[5, 0, 3, 3] += 0.25
    other_y = y.copy()
    other_y[np.flatnonzero(y >= 0)[-1]] = -1  # another labeled subset
    for X2, y2, match in [(X[:-2], y[:-2], "32 samples, not 30"),
                          (other_x, y, "the images X differ"),
                          (X, other_y, "the labels y differ"),
                          (X[::-1].copy(), y[::-1].copy(), "X differ.*y differ")]:
        with pytest.raises(ValueError, match=f"run.ckpt: the checkpoint was trained on other "
                                             f"data.*{match}.*refusing to resume"):
            model.fit(X2, y2, resume=True, callback=_never_called)
    resumed = model.fit(X, y, resume=True)
    whole = DRMM(SMALL, 3, **settings).fit(X, y)
    for name, value in whole.parameters_.items():
        np.testing.assert_array_equal(resumed.parameters_[name], value, err_msg=name)


def test_an_unwritable_checkpoint_path_is_refused_before_training(rng, tmp_path):
    X, y = small_data(rng)
    for checkpoint, match in [(tmp_path, "is a directory"),
                              (tmp_path / "missing" / "run.ckpt", "does not exist")]:
        model = DRMM(SMALL, 3, max_iter=1, batch_size=8, checkpoint=checkpoint)
        with pytest.raises(ValueError, match=f"checkpoint {checkpoint}.*{match}"):
            model.fit(X, y, callback=_never_called)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["uint64", "int64", "float64"])
def test_labels_are_checked_in_their_own_dtype(dtype, rng):
    X, _ = small_data(rng, n=4)
    model = DRMM(SMALL, 3, max_iter=0)
    info = np.iinfo(dtype) if dtype != "float64" else None
    odd = {"uint64": [info.max if info else 0, 2 ** 63], "int64": [-2, -2 ** 63, 2 ** 63 - 1],
           "float64": [1e20, -1e20, 2.5, -1.5, np.nan, np.inf, 2.0 ** 64 - 1]}[dtype]
    for value in odd:
        y = np.array([2, value, 0, 1], dtype)
        shown = repr(y[1].item())
        with pytest.raises(ValueError, match=f"y holds {shown.replace('+', '[+]')}:"):
            model.fit(X, y)
    if dtype != "uint64":  # an exact -1 is the unlabeled marker of signed and float labels
        model.fit(X, np.array([2, -1, 0, 1], dtype))
        out = model.reconstruct(X, np.array([-1, 0, 1, 2], dtype))
        assert out.shape == X.shape


def _rebuilt(path, out, edit=None, arrays=None):
    """The saved model at ``path`` with its metadata edited and/or arrays replaced (the
    declared sha256 recomputed, valid CRCs): only the model's own checks can refuse it."""
    def edit_header(header):
        if edit is not None:
            edit(header["metadata"])
    replace = {f"{name}.npy": npy_bytes(value) for name, value in (arrays or {}).items()}
    return rebuild_archive(path, out, edit_header=edit_header, replace=replace, rehash=True)


def test_parameter_values_are_checked_after_the_dtype_cast(rng, tmp_path):
    model, X, _ = fitted_small(rng)
    path = tmp_path / "model.npz"
    model.save(path)
    p = model.parameters_
    w0 = np.asarray(p["W0"], np.float64)
    w0.flat[3] = 1e300  # finite in float64, inf in the model's float32
    cases = [({"W0": w0}, "'W0' holds NaN or infinity"),
             ({"class_prior": np.array([0.5, 0.5, 0.5])}, "'class_prior'.*sums to 1.5"),
             ({"class_prior": np.array([1.0, 0.0, 0.0])}, "'class_prior'.*outside \\(0, 1\\]"),
             ({"translation_prior0": np.array([0.5, 0.5, 0.5, -0.5])},
              "'translation_prior0'.*outside"),
             ({"switch_prior1": np.full(5, 1.5)}, "'switch_prior1'.*outside"),
             ({"noise_variance": np.array([1.0, -1.0])}, "'noise_variance' must be > 0"),
             ({"top_noise_variance": np.float64(0.0)}, "'top_noise_variance' must be > 0"),
             ({"class_scale": np.float64(np.nan)}, "'class_scale' holds NaN"),
             ({"b0": np.full(4, 3e38, np.float32)}, "non-finite class scores on a probe")]
    for arrays, match in cases:
        bad = _rebuilt(path, tmp_path / "bad.npz", arrays=arrays)
        with pytest.raises(ValueError, match=f"bad.npz: not a valid saved DRMM: .*{match}"):
            fastdrmm.load(bad)
    same = _rebuilt(path, tmp_path / "same.npz", arrays={"W0": np.asarray(p["W0"], np.float64)})
    np.testing.assert_array_equal(fastdrmm.load(same).predict_proba(X), model.predict_proba(X))


def _set(keys, value):
    def edit(meta):
        for key in keys[:-1]:
            meta = meta[key]
        meta[keys[-1]] = value
    return edit


def _delete(keys):
    def edit(meta):
        for key in keys[:-1]:
            meta = meta[key]
        del meta[keys[-1]]
    return edit


def test_malformed_metadata_is_refused_naming_the_field(rng, tmp_path):
    X, y = small_data(rng)
    ckpt = tmp_path / "run.ckpt"
    model = DRMM(SMALL, 3, max_iter=1, batch_size=8, random_state=0, checkpoint=ckpt)
    model.fit(X, y)
    saved = tmp_path / "model.npz"
    model.save(saved)
    cases = [
        (ckpt, _set(["checkpoint"], []), "'checkpoint' must be an object, got list"),
        (ckpt, _set(["checkpoint"], "x"), "'checkpoint' must be an object, got str"),
        (ckpt, _set(["checkpoint"], None), "'checkpoint' must be an object, got null"),
        (ckpt, _delete(["params"]), "'params' is missing"),
        (ckpt, _set(["params"], [1]), "'params' must be an object"),
        (ckpt, _set(["params", "layers"], 3), "'params.layers' must be a preset name"),
        (ckpt, _set(["params", "layers"], [{"n_templates": "x"}]), "'params.layers' is invalid"),
        (ckpt, _set(["params", "bogus"], 1), "'params' holds unknown settings"),
        (ckpt, _set(["params", "learning_rate"], "fast"), "'params'.*learning_rate"),
        (ckpt, _set(["params", "random_state"], -3), "'params'.*random_state"),
        (ckpt, _delete(["checkpoint", "epoch"]), "'checkpoint.epoch' is missing"),
        (ckpt, _set(["checkpoint", "epoch"], "1"), "'checkpoint.epoch' must be an integer"),
        (ckpt, _set(["checkpoint", "epoch"], -1), "'checkpoint.epoch' must be an integer >= 0"),
        (ckpt, _set(["checkpoint", "history"], 3), "'checkpoint.history' must be a list"),
        (ckpt, _set(["checkpoint", "history"], [3]), "'checkpoint.history\\[0\\]' must be"),
        (ckpt, _set(["checkpoint", "objective_history"], [[1]]),
         "'checkpoint.objective_history\\[0\\]' must be a pair"),
        (ckpt, _set(["checkpoint", "input_shape"], [2, 12]), "'checkpoint.input_shape' must"),
        (ckpt, _set(["checkpoint", "best_score"], "x"), "'checkpoint.best_score' must be"),
        (ckpt, _set(["checkpoint", "has_best"], 1), "'checkpoint.has_best' must be true"),
        (ckpt, _set(["checkpoint", "converged"], None), "'checkpoint.converged' must be"),
        (saved, _delete(["fitted"]), "'fitted' is missing"),
        (saved, _set(["fitted"], []), "'fitted' must be an object"),
        (saved, _set(["fitted", "n_iter"], 1.5), "'fitted.n_iter' must be an integer"),
        (saved, _set(["fitted", "input_shape"], [2, 12, "12"]),
         "'fitted.input_shape\\[2\\]' must be an integer"),
        (saved, _set(["fitted", "validation_score"], float("nan")),
         "'fitted.validation_score' must be finite"),
        (saved, _set(["fitted", "algorithm"], "sgd"), "'fitted.algorithm' must be one of"),
        (saved, _set(["fitted", "n_classes"], 1), "'fitted.n_classes' must be an integer >= 2"),
        (saved, _set(["fitted", "dtype"], "int8"), "'fitted.dtype' must be one of"),
    ]
    for source, edit, match in cases:
        bad = _rebuilt(source, tmp_path / "bad.npz", edit)
        with pytest.raises(ValueError, match=f"bad.npz: not a valid .*{match}"):
            fastdrmm.load(bad)
    # resuming reads the fields of the training state too
    bad = _rebuilt(ckpt, tmp_path / "bad.npz", _set(["checkpoint", "adam_t"], "x"))
    with pytest.raises(ValueError, match="bad.npz: not a valid DRMM checkpoint: "
                                         "the field 'checkpoint.adam_t' must be an integer"):
        DRMM(SMALL, 3, max_iter=2, batch_size=8, random_state=0, checkpoint=bad).fit(
            X, y, resume=True, callback=_never_called)


@pytest.mark.parametrize("algorithm", ["eg", "em"])
def test_inputs_too_large_for_the_dtype_are_refused_before_training(algorithm, rng):
    X, y = small_data(rng)
    model = DRMM(SMALL, 3, algorithm=algorithm, max_iter=2, batch_size=8, random_state=0)
    with pytest.raises(ValueError, match="X holds values up to 1e\\+38: too large for float32"
                                         ".*rescale X"):
        model.fit(X * np.float32(1e38), y, callback=_never_called)
    with pytest.raises(ValueError, match="X holds values up to 1e\\+20"):
        model.partial_fit(X * np.float32(1e20), y)
    assert not hasattr(model, "parameters_")
    model.set_params(dtype="float64").fit(X * 1e20, y, callback=lambda *a: None)


def test_scores_that_overflow_are_an_error_not_nan(rng):
    model, X, _ = fitted_small(rng)
    huge = X.copy()
    huge[1] *= np.float32(3e37)
    with pytest.raises(ValueError, match="class scores of 1 sample.*sample 1.*up to 3"):
        model.predict_proba(huge)
    assert np.isfinite(model.predict_proba(X)).all()


_NO_COMPILE_IN_EPOCHS = r"""
import sys
import numpy as np
from numba.core.registry import CPUDispatcher
from fastdrmm import DRMM, Layer, _training

def signatures():
    out = set()
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(("kernels", "fastdrmm")):
            for value in list(vars(module).values()):
                if isinstance(value, CPUDispatcher):
                    out |= {(value.py_func.__qualname__, str(s)) for s in value.signatures}
    return out

seen = {}
warm_up = _training.Training.warm_up
def recording_warm_up(self):
    result = warm_up(self)
    seen["warm"] = signatures()
    return result
_training.Training.warm_up = recording_warm_up

def callback(snapshot, record):
    new = signatures() - seen["warm"]
    assert not new, f"epoch {record['epoch']} used kernels the warm-up did not: {sorted(new)}"

rng = np.random.default_rng(0)
X = rng.random((40, 1, 12, 12)).astype(np.float32)
y = rng.integers(0, 3, 40)
y[rng.random(40) < 0.3] = -1
y[:3] = np.arange(3)
for algorithm in ("eg", "em"):
    DRMM([Layer(4, 3, padding=1, pool=2), Layer(5, 3)], 3, algorithm=algorithm, max_iter=2,
         batch_size=16, random_state=0, validation_fraction=0.2).fit(X, y, callback=callback)
print("ok")
"""


def test_kernels_are_compiled_before_the_first_epoch():
    """In a fresh process (its kernels compiled, or loaded from the disk cache, on first
    use), every kernel signature the epochs use is first used by the warm-up."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _NO_COMPILE_IN_EPOCHS], capture_output=True,
                          text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
