"""What the models say while they work (one mechanism for both), and how they batch and thread.

With ``verbose``, a model writes its lines through :func:`say` and shows long passes as
:func:`progress_bar` bars: tqdm's when tqdm is installed (lines written so that they do not
break a bar), else plain ``print`` and no bar. Without ``verbose`` both are silent.
"""

from __future__ import annotations

import functools
import os

from threadpoolctl import threadpool_limits

__all__ = ["announcer", "bar_count", "batches", "progress_bar", "say", "serial_blas"]


def batches(n, size):
    """Consecutive slices of at most ``size`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def progress_bar(total, desc, enabled):
    """A tqdm bar (or a silent stand-in when tqdm is absent or not wanted)."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _SilentBar()


class _SilentBar:
    """The part of tqdm's interface the models use, doing nothing."""

    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def bar_count(bar):
    """The steps a bar has counted (1 for the silent stand-in, which counts none)."""
    return getattr(bar, "n", 1)


def say(message, enabled):
    """Write one line where ``enabled``: through tqdm (above any bar) when it is installed,
    else printed."""
    if not enabled:
        return
    try:
        from tqdm.auto import tqdm
        tqdm.write(message)
    except ImportError:
        print(message, flush=True)


def announcer(enabled):
    """What a CompileClock says its line with: :func:`say` where verbose, else nothing."""
    return (lambda message: say(message, True)) if enabled else None


def serial_blas(method):
    """Run ``method`` with NumPy's BLAS on one thread.

    The model's own matrix products are small ((N, n_classes) x (n_classes, F) and the like);
    a multi-threaded BLAS runs them on its thread pool, whose threads then spin-wait and take
    the cores from the Numba kernels that follow: measured 313 -> 200 ms per conv-small EG
    step at batch 128 on 2 cores."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return method(*args, **kwargs)
    return wrapper


def parallel_blas():
    """A context in which NumPy's BLAS uses every core again (inside :func:`serial_blas`):
    for a large product that no Numba kernel runs beside, e.g. the top's covariances."""
    return threadpool_limits(limits=os.cpu_count() or 1, user_api="blas")
