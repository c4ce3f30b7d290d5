"""What every test module shares about seeds, real data and the adversarial campaign.

* ``BASE_SEED``: the session's base seed. ``FASTDRMM_TEST_SEED=<int>`` reproduces a run,
  ``FASTDRMM_TEST_SEED=random`` draws a new one; pytest prints it in its header.
* ``MNIST_DIR`` / ``requires_mnist``: the real MNIST files, from ``$FASTDRMM_DATA/mnist`` (or
  ``$FASTDRMM_DATA`` itself when it holds the files) else ``../shared/data/mnist``; tests that
  need them skip where they are absent.
* ``campaign(n)``: the settings of one property-based campaign test (hypothesis). ``n`` is the
  number of cases in the suite's bounded profile; ``FASTDRMM_CAMPAIGN=long`` multiplies it by
  ``FASTDRMM_CAMPAIGN_SCALE`` (default 50) for a run by hand::

      FASTDRMM_CAMPAIGN=long FASTDRMM_TEST_SEED=random python -m pytest tests -k campaign

  Every campaign test is seeded from ``BASE_SEED`` (so a failure reproduces with the printed
  seed), keeps no example database, and has no deadline (the first case may JIT-compile).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

_SEED_SETTING = os.environ.get("FASTDRMM_TEST_SEED", "0").strip()
BASE_SEED = (int(np.random.SeedSequence().entropy % (2**32)) if _SEED_SETTING == "random"
             else int(_SEED_SETTING))

LONG = os.environ.get("FASTDRMM_CAMPAIGN", "").strip().lower() == "long"
SCALE = int(os.environ.get("FASTDRMM_CAMPAIGN_SCALE", "50")) if LONG else 1


def _mnist_dir():
    names = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")

    def holds_mnist(d):
        return d.is_dir() and any(next(d.glob(n + "*"), None) for n in names)

    env = os.environ.get("FASTDRMM_DATA", "").strip()
    if env:
        for d in (Path(env) / "mnist", Path(env)):
            if holds_mnist(d):
                return d
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


MNIST_DIR = _mnist_dir()
MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
requires_mnist = pytest.mark.skipif(
    not all((MNIST_DIR / (n + ".gz")).is_file() or (MNIST_DIR / n).is_file()
            for n in MNIST_NAMES),
                                    reason=f"MNIST is absent ({MNIST_DIR}; set $FASTDRMM_DATA)")


def campaign(n_examples, **settings_kw):
    """Decorate a hypothesis ``@given`` test as one bounded campaign of ``n_examples`` cases."""
    from hypothesis import HealthCheck, seed, settings

    kw = dict(max_examples=max(1, int(n_examples * SCALE)), deadline=None, database=None,
              print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    kw.update(settings_kw)

    def decorate(test):
        return seed(BASE_SEED)(settings(**kw)(test))

    return decorate
