"""MNIST, supervised hard EM: test error, wall time, objective and reconstruction per iteration.

Usage::

    python benchmarks/em_mnist.py                                  # conv-small, 20,000 / 5,000
    python benchmarks/em_mnist.py --max-iter 20 --out results/em_mnist
    python benchmarks/em_mnist.py --top average --amplitude-steps 20 --em-targets top-down
    python benchmarks/em_mnist.py --preset two-layer --train-size 500 --test-size 200 --max-iter 2

The model is ``DRMM(--preset, algorithm="em", top=--top, max_iter=--max-iter,
validation_fraction=0, random_state=--seed)`` fitted once on a seeded random subset of
``--train-size`` training images (every label); the EM settings named below are passed to it
only where given, so DRMM's own defaults apply otherwise (whatever they are when this runs).
After every iteration the ``callback=`` of :meth:`DRMM.fit` receives the model as it stands
and this script measures, outside the training time:

* the test error on the first ``--test-size`` test images (``snapshot.score``);
* the reconstruction error per pixel, ``mean((reconstruct(X, y) - X)^2)`` on the first
  ``--recon-size`` of them rendered from their true class (beside the pixel variance of those
  images, the error of rendering every pixel as the mean pixel value);
* the training wall time so far: the time since ``fit`` was called minus the time spent
  measuring (so the kernels' compilation before the first iteration, and each iteration's
  E-step, M-step and top refit count; evaluation does not).

The objective per iteration is ``objective_history_`` (the EM objective before and after each
M-step); a rise between consecutive values is counted (it should never happen once EM is a
monotone algorithm). The last row also gives the score of the fitted model itself (after
DRMM.fit's final refit of the priors), which should equal the last iteration's.

This module also holds what the EM benchmark scripts share (``em_digits.py``,
``time_to_accuracy.py``'s EM contender, ``reproduce_mnist.py``'s EM table): the EM options
(:func:`add_em_options`, :func:`em_params`), the per-iteration measurement
(:class:`IterationTracker`) and the objective's monotonicity count (:func:`objective_rises`).

Outputs: a markdown table on stdout (progress on stderr); ``--out PATH`` writes PATH.json and
PATH.md (or only the one a .json/.md suffix names). Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reproduce_mnist  # noqa: E402  (benchmarks/reproduce_mnist.py: data and output helpers)

# ------------------------------------------------------------------------------ shared helpers

#: DRMM's EM settings that the EM benchmark scripts pass through (option name = setting name
#: with dashes); None (the default of every option) leaves DRMM's own default in force
EM_SETTINGS = {
    "amplitude_steps": int,
    "em_targets": str,
    "shrinkage": "value",
    "unlabeled_weight": float,
    "confidence_threshold": float,
    "ridge": float,
    "bias": str,
    "init": str,
    "tol": float,
}


def parse_value(text):
    """A command-line value for a DRMM setting: a number, true/false/none, or the string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_assignment(text):
    """'name=value' -> (name, parsed value) for --param."""
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, parse_value(value)


def add_em_options(ap, prefix=""):
    """The EM settings as options ``--{prefix}amplitude-steps`` ... and ``--{prefix}param
    NAME=VALUE`` (any other DRMM setting, repeatable), all defaulting to DRMM's own."""
    group = ap.add_argument_group("EM settings (default: DRMM's own)")
    for name, kind in EM_SETTINGS.items():
        flag = name.replace("_", "-")
        if not flag.startswith(prefix):  # --em-targets, not --em-em-targets
            flag = prefix + flag
        group.add_argument(f"--{flag}", dest=prefix.replace("-", "_") + name,
                           type=parse_value if kind == "value" else kind, default=None,
                           metavar=name.upper(), help=f"DRMM({name}=...)")
    group.add_argument(f"--{prefix}param", dest=prefix.replace("-", "_") + "param",
                       type=parse_assignment, action="append", default=[],
                       metavar="NAME=VALUE", help="any other DRMM setting (repeatable)")
    return group


def em_params(args, prefix=""):
    """The DRMM keyword arguments the EM options of ``add_em_options(prefix)`` set."""
    stem = prefix.replace("-", "_")
    out = {name: getattr(args, stem + name) for name in EM_SETTINGS
           if getattr(args, stem + name) is not None}
    out.update(dict(getattr(args, stem + "param")))
    return out


def pixel_variance(X):
    """The variance of all pixel values: the per-pixel error of rendering every pixel as their
    mean (the yardstick of a reconstruction error)."""
    return float(np.var(np.asarray(X, np.float64)))


def reconstruction_mse(model, X, y=None, source="class"):
    """Mean squared error per pixel of ``model.reconstruct(X, y, source=source)`` against X
    ("class": rendered from the class template; "code": from the sample's own top code)."""
    R = np.asarray(model.reconstruct(X, y, source=source), np.float64)
    return float(np.mean((R - np.asarray(X, np.float64)) ** 2))


class IterationTracker:
    """``DRMM.fit(callback=tracker)``: after every iteration, the held-out accuracy of the
    model as it stands, optionally its reconstruction error, and the training time so far
    (wall time since :meth:`start` minus the time spent here). ``stop(row)`` -> True ends the
    fit after that iteration (by lowering ``model.max_iter``, which the training loop reads
    before each iteration)."""

    def __init__(self, X_test, y_test, X_recon=None, y_recon=None, model=None, stop=None,
                 log=None, name="em"):
        self.X_test, self.y_test = X_test, y_test
        self.X_recon, self.y_recon = X_recon, y_recon
        self.model, self.stop, self.log, self.name = model, stop, log, name
        self.rows = []
        self._start = None
        self._measuring = 0.0

    def start(self):
        self._start = time.perf_counter()
        return self

    def __call__(self, snapshot, record):
        tic = time.perf_counter()
        if self._start is None:
            self._start = tic
        train_s = tic - self._start - self._measuring
        row = dict(iteration=int(record["epoch"]), train_s=train_s,
                   epoch_s=record.get("time"), accuracy=float(snapshot.score(self.X_test,
                                                                             self.y_test)))
        for key in ("objective", "objective_after_m_step", "layer_objective",
                    "layer_objective_after_m_step", "compile_time"):
            if key in record:
                row[key] = float(record[key])
        if self.X_recon is not None:
            row["recon_mse"] = reconstruction_mse(snapshot, self.X_recon, self.y_recon)
            row["recon_code_mse"] = reconstruction_mse(snapshot, self.X_recon, source="code")
        row["eval_s"] = time.perf_counter() - tic
        self.rows.append(row)
        if self.log is not None:
            self.log(f"{self.name} iteration {row['iteration']}: test accuracy "
                     f"{row['accuracy']:.4f}, {train_s:.1f} s of training"
                     + (f", reconstruction MSE {row['recon_mse']:.4g} (class), "
                        f"{row['recon_code_mse']:.4g} (own code)" if "recon_mse" in row
                        else ""))
        if self.stop is not None and self.model is not None and self.stop(row):
            self.model.max_iter = row["iteration"]
        self._measuring += time.perf_counter() - tic

    def attach_objective(self, model):
        """Take the objective of every iteration from ``model.objective_history_`` (the
        fitted model's own record) into the rows."""
        for row, pair in zip(self.rows, getattr(model, "objective_history_", [])):
            row["objective"], row["objective_after_m_step"] = float(pair[0]), float(pair[1])
        return self.rows


def objective_rises(pairs, rtol=1e-9):
    """(M-step rises, E-step rises) in ``objective_history_``'s (before, after) pairs: an
    M-step rises where after_k > before_k, an E-step (with everything else between two
    M-steps) where before_{k+1} > after_k, each by more than ``rtol`` of the larger value."""
    def rises(a, b):
        return b - a > rtol * max(abs(a), abs(b), 1e-300)

    m = sum(rises(b, a) for b, a in pairs)
    e = sum(rises(pairs[k][1], pairs[k + 1][0]) for k in range(len(pairs) - 1))
    return int(m), int(e)


def fit_quietly(model, X, y, callback=None):
    """``model.fit(X, y, callback=...)`` without the ConvergenceWarning of a run that used all
    of ``max_iter`` (what a benchmark asks for); other warnings are returned as text."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y, callback=callback)
    return sorted({f"{w.category.__name__}: {w.message}" for w in caught})


def fmt_g(value, digits=4):
    return "—" if value is None else f"{value:.{digits}g}"


def machine():
    import fastdrmm

    return dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                python=platform.python_version(), numpy=np.__version__,
                fastdrmm=fastdrmm.__version__)


# --------------------------------------------------------------------------------- the script


def markdown(report):
    s = report["settings"]
    rows = report["iterations"]
    em = ", ".join(f"{k}={v}" for k, v in sorted(s["em"].items())) or "DRMM's defaults"
    lines = [f"# Supervised EM on MNIST: {s['preset']}, top {s['top']}, seed {s['seed']}", "",
             f"train images {s['train_images']}, test images {s['test_images']}, "
             f"reconstruction on {s['recon_images']} test images (pixel variance "
             f"{report['pixel_variance']:.4g}), at most {s['max_iter']} iterations; EM "
             f"settings: {em}; {report['machine']['cpu_count']} CPUs", ""]
    head = ["iteration", "test error %", "train s (total)", "iteration s", "objective",
            "objective after M-step", "recon MSE / pixel (class)",
            "recon MSE / pixel (own code)"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["iteration"]), f"{100 * (1 - r['accuracy']):.2f}", f"{r['train_s']:.1f}",
            "—" if r.get("epoch_s") is None else f"{r['epoch_s']:.1f}",
            fmt_g(r.get("objective"), 6), fmt_g(r.get("objective_after_m_step"), 6),
            fmt_g(r.get("recon_mse")), fmt_g(r.get("recon_code_mse"))]) + " |")
    m, e = report["objective_rises"]
    lines += ["", f"fitted model (after the final refit of the priors): test error "
              f"{100 * (1 - report['final_accuracy']):.2f} %; objective rises: {m} M-step(s), "
              f"{e} E-step(s) of {len(rows)} iterations; fit wall time "
              f"{report['fit_s']:.1f} s (measurement included)"]
    if report["warnings"]:
        lines += [""] + [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="conv-small")
    ap.add_argument("--top", choices=["average", "full"], default="full")
    ap.add_argument("--max-iter", type=int, default=10, help="EM iterations")
    ap.add_argument("--train-size", type=int, default=20000,
                    help="a seeded random subset of this many training images (0: all)")
    ap.add_argument("--test-size", type=int, default=5000,
                    help="the first this many test images (0: all 10,000)")
    ap.add_argument("--recon-size", type=int, default=1000,
                    help="reconstruct the first this many of the test images (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default all)")
    ap.add_argument("--data-dir", default=None,
                    help="MNIST directory (default $FASTDRMM_DATA/mnist, else "
                         "../shared/data/mnist, else the user cache)")
    ap.add_argument("--out", default=None, metavar="PATH")
    ap.add_argument("--verbose", "-v", action="store_true")
    add_em_options(ap)
    return ap


def load_subsets(args):
    """MNIST's seeded training subset and first test images (reproduce_mnist.py's choice)."""
    import fastdrmm

    X, y, X_test, y_test = fastdrmm.load_mnist(
        args.data_dir or reproduce_mnist.default_mnist_dir(), return_X_y=True,
        dtype=np.dtype(args.dtype))
    if args.train_size:
        if not 10 <= args.train_size <= X.shape[0]:
            raise SystemExit(f"--train-size must lie in [10, {X.shape[0]}]")
        rows = np.sort(np.random.default_rng([args.seed, 10]).permutation(X.shape[0])
                       [:args.train_size])
        X, y = np.ascontiguousarray(X[rows]), y[rows]
    if args.test_size:
        if not 1 <= args.test_size <= X_test.shape[0]:
            raise SystemExit(f"--test-size must lie in [1, {X_test.shape[0]}]")
        X_test, y_test = X_test[:args.test_size], y_test[:args.test_size]
    return X, y, X_test, y_test


def main(argv=None, out=None):
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    if args.max_iter < 1:
        raise SystemExit("--max-iter must be >= 1")
    from fastdrmm import DRMM

    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
    X, y, X_test, y_test = load_subsets(args)
    n_recon = min(max(args.recon_size, 0), X_test.shape[0])
    X_recon = X_test[:n_recon] if n_recon else None
    em = em_params(args)
    model = DRMM(args.preset, 10, algorithm="em", top=args.top, max_iter=args.max_iter,
                 validation_fraction=0.0, random_state=args.seed, dtype=args.dtype,
                 verbose=int(args.verbose), **em)

    def log(message):
        print(f"em_mnist.py: {message}", file=sys.stderr, flush=True)

    tracker = IterationTracker(X_test, y_test, X_recon, y_test[:n_recon] if n_recon else None,
                               log=log).start()
    tic = time.perf_counter()
    caught = fit_quietly(model, X, y, tracker)
    fit_s = time.perf_counter() - tic
    rows = tracker.attach_objective(model)
    report = dict(
        machine=machine(),
        settings=dict(preset=args.preset, top=args.top, max_iter=args.max_iter, seed=args.seed,
                      dtype=args.dtype, train_images=int(y.size), test_images=int(y_test.size),
                      recon_images=n_recon, em=em,
                      model={k: v for k, v in model.get_params().items()
                             if isinstance(v, (int, float, str, bool, type(None)))}),
        pixel_variance=pixel_variance(X_recon if n_recon else X_test),
        iterations=rows, final_accuracy=float(model.score(X_test, y_test)),
        objective_history=[list(map(float, p)) for p in model.objective_history_],
        objective_rises=objective_rises(model.objective_history_), fit_s=fit_s,
        converged=bool(model.converged_), warnings=caught)
    text = markdown(report)
    out.write(text)
    if args.out:
        reproduce_mnist.write_outputs(args.out, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
