"""The op tests' scenarios, shared by every backend's tests: geometries, latents and the
adversarial value families (ties, zeros, NaN/inf, a wide dynamic range, odd sizes, strided
views).

Only inputs live here; what a result must be lives in ``naive`` (the float64 loop oracles),
``checks`` and ``match_at_checks`` (the comparisons). Test modules import scenarios from here,
never from one another.
"""

import numpy as np
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------------------
# geometries

# match_switch_pool: (N, C, H, W, K, kh, kw, padding, pool, stride, leak)
MATCH_GEOMETRIES = [
    (2, 3, 9, 8, 4, 3, 2, 1, 2, None, 0.0),          # odd sizes, padding, non-square kernel
    (1, 1, 7, 7, 3, 3, 3, 0, 3, 1, 0.0),             # stride < pool: overlapping windows
    (2, 2, 11, 10, 2, 2, 3, 2, 2, 3, 0.1),           # stride > pool: gaps, leaky
    (3, 2, 6, 9, 5, 1, 1, 0, (2, 3), (1, 2), -0.5),  # 1x1 templates, pairs, negative leak
    (1, 4, 5, 5, 2, 5, 5, 0, 1, None, 1.0),          # kernel = whole input, identity switch
    (2, 1, 8, 8, 1, 5, 5, 4, 2, None, 0.0),          # conv-small layer 1 in miniature
    (1, 3, 10, 7, 6, 3, 3, (2, 0), (3, 2), None, 0.0),
]

# the top-down ops (unpool, render, match_at, template_stats) on the latents of a bottom-up
# pass: (N, C, H, W, K, kh, kw, padding, pool, stride)
RENDER_GEOMETRIES = [
    (2, 3, 9, 8, 4, 3, 2, 1, 2, None),
    (1, 2, 7, 7, 3, 3, 3, 0, 3, 1),        # overlapping windows: collisions add
    (2, 2, 11, 10, 2, 2, 3, 2, 2, 3),      # gaps
    (3, 1, 6, 9, 5, 1, 1, 0, (2, 3), (1, 2)),
    (2, 1, 8, 8, 3, 5, 5, 4, 2, None),
    (1, 2, 5, 6, 2, 5, 6, 0, 1, None),     # whole-input templates
    (1, 2, 4, 4, 2, 3, 3, 3, 2, 1),        # padding > kernel - 1
]

# The cpu backend renders dense codes (pool 1) as one GEMM per tap; these geometries make its
# cost model pick that path (the tests force it on the others too).
GEMM_GEOMETRIES = RENDER_GEOMETRIES + [
    (3, 32, 9, 9, 40, 3, 3, 0, 1, None),   # valid, 2 vectors of output channels
    (2, 20, 7, 8, 17, 3, 2, 1, 1, None),   # padded, partial vectors, 1 + 1 vector blocks
    (9, 5, 5, 6, 70, 3, 3, 0, 1, None),    # several samples per group, K not a tile multiple
]

# conv-small's first layer and an RGB one with K not a whole vector: beside the GEMM
# geometries in the cpu render and statistics path tests
CONV_GEOMETRIES = [
    (2, 1, 14, 13, 32, 5, 5, 4, 2, None),  # like conv-small's first layer: C = 1, 5x5, pad 4
    (2, 3, 12, 11, 21, 3, 3, 1, 2, None),  # RGB, K not a whole vector
]


def pair(p):
    """An int or a pair as a pair."""
    return (p, p) if np.isscalar(p) else tuple(p)


def plane_of(geom):
    """(Ho, Wo): the matching plane of a geometry (either kind)."""
    n, c, h, w, k, kh, kw, padding = geom[:8]
    ph, pw = pair(padding)
    return h + 2 * ph - kh + 1, w + 2 * pw - kw + 1


# ---------------------------------------------------------------------------------------------
# layers and latents


def random_layer(rng, dtype, n, c, h, w, k, kh, kw):
    """x (N,C,H,W), templates (K,C,kh,kw) and bias (K,) of standard-normal-ish values."""
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    templates = rng.standard_normal((k, c, kh, kw)).astype(dtype)
    bias = (0.5 * rng.standard_normal(k)).astype(dtype)
    return x, templates, bias


def latents(rng, dtype, geom, backend="numpy"):
    """Real latents: x, templates, a fresh code, the argmax idx of a bottom-up pass of the
    geometry (on ``backend``) and boolean switches (70% on)."""
    from fastdrmm import ops

    n, c, h, w, k, kh, kw, padding, pool, stride = geom
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    templates = rng.standard_normal((k, c, kh, kw)).astype(dtype)
    code, idx = ops.match_switch_pool(x, templates, rng.standard_normal(k).astype(dtype),
                                      padding=padding, pool=pool, stride=stride, leak=0.3,
                                      backend=backend)
    code = rng.standard_normal(code.shape).astype(dtype)  # any code may be rendered
    switches = rng.random(code.shape) < 0.7
    return x, templates, code, idx, switches


def poisoned_code(rng, dtype, geom):
    """Latents of a geometry with NaN, +inf and -inf codes (their switches on)."""
    x, templates, code, idx, switches = latents(rng, dtype, geom)
    n, k = code.shape[:2]
    for value in (np.nan, np.inf, -np.inf):
        at = (rng.integers(n), rng.integers(k), rng.integers(code.shape[2]),
              rng.integers(code.shape[3]))
        code[at] = value
        switches[at] = True
    return x, templates, code, idx, switches


SWITCH_KINDS = ["none", "bool", "real"]
# match_at's (C, kw): rows of kw*C values shorter than a vector or a warp's worth, about one,
# several (long dot products)
ROW_SHAPES = [(1, 5), (3, 2), (20, 3)]


def switches_of(kind, rng, on, dtype):
    """None, the boolean mask, or real values that are (signed) zeros where the mask is off."""
    if kind == "none":
        return None
    if kind == "bool":
        return on
    return on * rng.standard_normal(on.shape).astype(dtype)  # off & negative: -0.0


# ---------------------------------------------------------------------------------------------
# adversarial value families

KINDS = ("normal", "sparse", "ties", "wide", "nonfinite")


def values(rng, shape, kind, dtype):
    """Test data of one kind: ordinary, sparse with ties, small integers (ties), a wide
    dynamic range, or ordinary with a few NaN/inf."""
    a = rng.standard_normal(shape)
    if kind == "sparse":
        a = np.where(rng.random(shape) < 0.7, 0.0, np.round(a, 1))
    elif kind == "ties":
        a = rng.integers(-2, 3, size=shape).astype(np.float64)
    elif kind == "wide":
        a = a * np.exp2(rng.integers(-30, 31, size=shape))
        a[rng.random(shape) < 0.2] = 0
    elif kind == "nonfinite":
        bad = rng.random(shape) < 0.03
        a[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
    return a.astype(dtype)


def special(rng, n, dtype):
    """n random values with zeros, +-0, NaN and +-inf sprinkled in."""
    a = rng.standard_normal(n).astype(dtype)
    picks = rng.integers(0, n, size=min(n, 6))
    a[picks] = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 0.0], dtype)[:picks.size]
    return a


def strided_empty(shape, dtype, strided):
    """An uninitialised array of ``shape``: C-contiguous, or a strided view into a larger one."""
    if not strided:
        return np.empty(shape, dtype)
    big = np.empty((shape[0], shape[1] * 2, shape[2], shape[3] * 2 + 1), dtype)
    return big[:, ::2, :, 1::2]


# One generated layer: small odd sizes, any padding/pool/stride, values on a coarse grid or
# not, zeros, NaN/inf pixels, strided views; ``layer_of(rng, case)`` builds it.
LAYER_CASES = st.fixed_dictionaries({
    "backend": st.sampled_from(["numpy", "cpu"]), "dtype": st.sampled_from(["float32", "float64"]),
    "n": st.integers(1, 2), "c": st.integers(1, 3), "h": st.integers(3, 8),
    "w": st.integers(3, 26), "k": st.integers(1, 3), "kh": st.integers(1, 3),
    "kw": st.integers(1, 3), "padding": st.tuples(st.integers(0, 3), st.integers(0, 3)),
    "pool": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "stride": st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),
    "leak": st.sampled_from([0.0, 0.0, 0.2, -0.5]), "grid": st.booleans(),
    "zero_template": st.booleans(), "zero_block": st.booleans(), "strided": st.booleans(),
    "specials": st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), max_size=2),
    "switches": st.sampled_from(SWITCH_KINDS), "seed": st.integers(0, 2**32 - 1),
})


def layer_of(rng, case):
    """x, templates, bias with a LAYER_CASES case's quirks: values on a coarse grid (exact
    ties, exact zeros, exactly representable sums in float32), a zero template (every window
    tied), a zero block of x, NaN / +-inf pixels."""
    dtype = np.dtype(case["dtype"])
    n, c, h, w, k, kh, kw = (case[key] for key in ("n", "c", "h", "w", "k", "kh", "kw"))
    x = strided_empty((n, c, h, w), dtype, case["strided"])
    templates = strided_empty((k, c, kh, kw), dtype, case["strided"])
    if case["grid"]:
        x[...] = rng.integers(-3, 4, x.shape) / 2
        templates[...] = rng.integers(-3, 4, templates.shape) / 4
    else:
        x[...] = rng.standard_normal(x.shape)
        templates[...] = rng.standard_normal(templates.shape)
    bias = (rng.integers(-2, 3, k) / 4).astype(dtype)
    if case["zero_template"]:
        templates[rng.integers(k)] = 0
    if case["zero_block"]:
        x[:, :, : h // 2, : w // 2] = 0
    for value in case["specials"]:
        x[rng.integers(n), rng.integers(c), rng.integers(h), rng.integers(w)] = value
    return x, templates, bias


def labeled_images(rng, shape, n=24, n_classes=3, unlabeled=0.0):
    """n random non-negative images of ``shape`` and labels in [0, n_classes), every class
    present (the first n_classes samples), a fraction ``unlabeled`` of the rest marked -1."""
    X = rng.random((n, *shape))
    y = rng.integers(0, n_classes, n)
    y[:n_classes] = np.arange(n_classes)
    if unlabeled:
        y[n_classes:][rng.random(n - n_classes) < unlabeled] = -1
    return X, y
