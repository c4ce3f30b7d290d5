"""Adam (Kingma & Ba 2015) over a dict of arrays, with the learning-rate schedules of EG."""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("constant", "cosine", "step")


def learning_rate(base, schedule, step, total_steps):
    """The rate at ``step`` (0-based) of ``total_steps``: constant, cosine decay to 1 % of
    ``base``, or steps of x0.1 after 50 % and 75 % of the run."""
    if schedule == "constant" or total_steps <= 1:
        return base
    frac = min(step / total_steps, 1.0)
    if schedule == "cosine":
        return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))
    if schedule == "step":
        return base * (0.1 ** ((frac >= 0.5) + (frac >= 0.75)))
    raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {schedule!r}")


def _update_kernels():
    """The compiled element-wise kernels, or None where Numba does not import."""
    try:
        from .kernels.cpu import elementwise
    except ImportError:
        return None
    return elementwise


def _compiled_update_takes(param, grad, m, v, average):
    """Whether the compiled update takes these arrays: contiguous NumPy arrays of one size,
    the parameter and gradient float32/float64, the moments (and average) float64 as
    ``Adam`` keeps them (its bits match the NumPy expressions only then)."""
    arrays = [a for a in (param, grad, m, v, average) if a is not None]
    return (all(isinstance(a, np.ndarray) and a.flags.c_contiguous and a.size == param.size
                for a in arrays)
            and param.dtype in (np.float32, np.float64) and grad.dtype in (np.float32, np.float64)
            and all(a.dtype == np.float64 for a in (m, v, average) if a is not None))


class Adam:
    """First and second moment estimates per parameter; ``step`` updates ``params`` in place.

    With ``average_decay`` d > 0 it also keeps an exponential moving average of the
    parameters after every step, ``average = d * average + (1 - d) * params`` (started at the
    initial parameters): a smoothed copy of the model that lags the noise of single steps."""

    def __init__(self, params, names, beta1=0.9, beta2=0.999, eps=1e-8, average_decay=0.0):
        self.names = list(names)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.average_decay = float(average_decay)
        self.t = 0
        self.m = {n: np.zeros_like(params[n], dtype=np.float64) for n in self.names}
        self.v = {n: np.zeros_like(params[n], dtype=np.float64) for n in self.names}
        self.average = ({n: np.array(params[n], np.float64) for n in self.names}
                        if self.average_decay else None)

    def averaged(self, params):
        """``params`` with the trainable entries replaced by their moving average (in their
        own dtypes); ``params`` itself when no average is kept."""
        if self.average is None:
            return params
        return {**params, **{n: self.average[n].astype(params[n].dtype) for n in self.names}}

    def step(self, params, grads, lr, weight_decay=0.0):
        self.t += 1
        c1 = 1 - self.beta1 ** self.t
        c2 = 1 - self.beta2 ** self.t
        kernels = _update_kernels()
        for n in self.names:
            decay = weight_decay if n.startswith("W") else 0.0
            m, v = self.m[n], self.v[n]
            avg = None if self.average is None else self.average[n]
            if kernels is not None and _compiled_update_takes(params[n], grads[n], m, v, avg):
                # one pass per parameter, the same bits as the expressions below (which
                # made ~10 temporaries each: ~2 ms of a conv-small EG step, serial)
                params[n] = kernels.adam_update(params[n], grads[n], m, v, self.beta1,
                                                self.beta2, lr / c1, c2, self.eps, decay,
                                                avg, self.average_decay)
                continue
            g = np.asarray(grads[n], np.float64)
            if decay:
                g = g + decay * params[n]
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            update = (lr / c1) * m / (np.sqrt(v / c2) + self.eps)
            params[n] = (params[n] - update).astype(params[n].dtype)
            if avg is not None:
                avg *= self.average_decay
                avg += (1 - self.average_decay) * params[n]

    def state_arrays(self):
        out = {}
        for n in self.names:
            out[f"adam.m.{n}"] = self.m[n]
            out[f"adam.v.{n}"] = self.v[n]
            if self.average is not None:
                out[f"adam.average.{n}"] = self.average[n]
        return out

    def load_state(self, arrays, t):
        stores = [("m", self.m), ("v", self.v)]
        if self.average is not None:
            stores.append(("average", self.average))
        for n in self.names:
            for kind, store in stores:
                arr = arrays.get(f"adam.{kind}.{n}")
                if arr is None or arr.shape != store[n].shape:
                    raise ValueError(f"checkpoint: optimizer state adam.{kind}.{n} is missing "
                                     "or has the wrong shape")
                store[n] = np.array(arr, np.float64)
        self.t = int(t)
