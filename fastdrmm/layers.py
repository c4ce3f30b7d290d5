"""The layers of a DRMM, the named architectures, and the shapes they give an input.

A :class:`Layer` is one level of rendering: ``n_templates`` templates of
``C x kernel_size`` (C is the layer below's channel count), matched with zero ``padding`` and
stride 1, switched (ReLU, or leaky with slope ``leak``), then max-pooled over ``pool x pool``
windows with stride ``pool`` (``pool=None``: no pooling, every unit its own window). Bottom-up
it is one call of :func:`fastdrmm.ops.match_switch_pool`; top-down one call of
:func:`fastdrmm.ops.render`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from . import _validation as v

__all__ = ["Layer", "PRESETS", "resolve_layers", "LayerShape", "layer_shapes"]


@dataclass(frozen=True)
class Layer:
    """One rendering layer: templates, zero padding, switch slope and pooling window.

    Parameters
    ----------
    n_templates : int >= 1
        K, the number of templates (output channels).
    kernel_size : int or (int, int)
        The template size (kh, kw).
    padding : int or (int, int), default 0
        Zero padding of the layer's input ("full" matching of a k x k template is k - 1).
    pool : None, int or (int, int), default None
        The max-over-translation window (stride = window). None: no pooling.
    leak : float, default 0.0
        The switch's slope for negative matches (0 is the ReLU of the generative model).
    """

    n_templates: int
    kernel_size: tuple
    padding: tuple = (0, 0)
    pool: tuple | None = None
    leak: float = 0.0

    def __post_init__(self):
        if isinstance(self.n_templates, bool) or not isinstance(
                self.n_templates, (numbers.Integral,)):
            raise TypeError(f"n_templates must be an int, got {self.n_templates!r}")
        if self.n_templates < 1:
            raise ValueError(f"n_templates must be >= 1, got {self.n_templates!r}")
        object.__setattr__(self, "n_templates", int(self.n_templates))
        object.__setattr__(self, "kernel_size", v.pair(self.kernel_size, "kernel_size",
                                                       minimum=1))
        object.__setattr__(self, "padding", v.pair(self.padding, "padding", minimum=0))
        if self.pool is not None:
            pool = v.pair(self.pool, "pool", minimum=1)
            object.__setattr__(self, "pool", None if pool == (1, 1) else pool)
        object.__setattr__(self, "leak", v.check_leak(self.leak))
        if not 0.0 <= self.leak < 1.0:
            raise ValueError(f"leak must lie in [0, 1), got {self.leak!r}")

    @property
    def window(self):
        """The pooling window as a pair ((1, 1) when the layer does not pool)."""
        return self.pool or (1, 1)

    def to_dict(self):
        return {"n_templates": self.n_templates, "kernel_size": list(self.kernel_size),
                "padding": list(self.padding),
                "pool": None if self.pool is None else list(self.pool), "leak": self.leak}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise TypeError(f"a layer must be a Layer or a dict of its fields, got {d!r}")
        unknown = set(d) - {"n_templates", "kernel_size", "padding", "pool", "leak"}
        if unknown:
            raise ValueError(f"unknown layer field(s) {sorted(unknown)}")
        return cls(**d)


#: The named architectures. "conv-small" is the paper's MNIST Conv-Small: conv32 5x5 full ->
#: pool 2 -> conv64 3x3 valid -> conv64 3x3 full -> pool 2 -> conv128 3x3 valid, then global
#: average pooling and the class templates. "two-layer" is a small, fast 2-layer model.
PRESETS = {
    "conv-small": (
        Layer(32, 5, padding=4, pool=2),
        Layer(64, 3),
        Layer(64, 3, padding=2, pool=2),
        Layer(128, 3),
    ),
    "two-layer": (
        Layer(32, 5, padding=2, pool=2),
        Layer(64, 3, padding=1, pool=2),
    ),
}


def resolve_layers(layers):
    """A preset name, or a sequence of Layer/dict -> a tuple of Layer, with clear errors."""
    if isinstance(layers, str):
        try:
            return PRESETS[layers]
        except KeyError:
            raise ValueError(
                f"layers: unknown preset {layers!r}; the presets are {sorted(PRESETS)}"
            ) from None
    try:
        items = list(layers)
    except TypeError:
        raise TypeError("layers must be a preset name or a sequence of fastdrmm.Layer, got "
                        f"{type(layers).__name__}") from None
    if not items:
        raise ValueError("layers must hold at least one Layer")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Layer):
            out.append(item)
        else:
            try:
                out.append(Layer.from_dict(item))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"layers[{i}]: {exc}") from None
    return tuple(out)


@dataclass(frozen=True)
class LayerShape:
    """The shapes one layer sees for a given input: input (C, H, W), plane (Ho, Wo) of the
    matches, pooled (Hp, Wp) of the code."""

    channels_in: int
    input_hw: tuple
    plane: tuple
    pooled: tuple


def layer_shapes(layers, input_shape):
    """The LayerShape of every layer for inputs of shape (C, H, W); ValueError if one does
    not fit."""
    c, h, w = input_shape
    shapes = []
    for i, layer in enumerate(layers):
        try:
            geo = v.match_geometry((h, w), layer.kernel_size, layer.padding, layer.window, None)
        except ValueError as exc:
            raise ValueError(f"layers[{i}] does not fit its input of shape {(c, h, w)}: "
                             f"{exc}") from None
        shapes.append(LayerShape(c, (h, w), geo.plane, geo.pooled))
        c, (h, w) = layer.n_templates, geo.pooled
    return tuple(shapes)
