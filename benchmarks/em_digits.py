"""scikit-learn's digits, hard EM: held-out accuracy per iteration, semi-supervised EM,
the objective and the reconstruction error (issue #17's measurements).

Usage::

    python benchmarks/em_digits.py                                 # seeds 0 1 2, 10 iterations
    python benchmarks/em_digits.py --seeds 0 1 2 3 4 --max-iter 20 --json results/em_digits.json
    python benchmarks/em_digits.py --layers 2 --tops full --amplitude-steps 20 --shrinkage oas
    python benchmarks/em_digits.py --quick                         # seed 0, 2 iterations

Data: ``load_digits()``, X / 16 as float32 images (N, 1, 8, 8); for every seed a stratified
70/30 split (``train_test_split(test_size=0.3, stratify=y, random_state=seed)``). Models
(``--layers``): ``1`` = ``[Layer(32, 3, padding=1, pool=2)]``, ``2`` = that + ``Layer(64, 3,
padding=1)``; each with ``top="full"`` and ``"average"`` (``--tops``). Every model is
``DRMM(layers, 10, algorithm="em", top=top, max_iter=--max-iter, validation_fraction=0,
random_state=seed, **EM settings)``; the EM settings (``--amplitude-steps``, ``--em-targets``,
``--shrinkage``, ``--unlabeled-weight``, ``--confidence-threshold``, ``--ridge``, ``--bias``,
``--init``, ``--tol``, ``--param NAME=VALUE``) are passed only where given, so DRMM's own
defaults apply otherwise.

Measured, each from one fit per (layers, top, seed) through ``DRMM.fit(callback=...)`` (the
callback scores the model as it stands after every iteration; that is exactly what
``fit(max_iter=k)`` would score, up to DRMM.fit's final refit of the priors, whose effect the
JSON's ``final_accuracy`` shows):

* supervised: held-out accuracy after every iteration (all training labels);
* semi-supervised: ``--labels-per-class`` (20) labels per class of the training split, the
  rest of it unlabeled (y = -1), against the same EM on those labels alone; the difference
  per seed (positive: the unlabeled data helped);
* the objective per iteration (``objective_history_``: before and after each M-step) of the
  supervised runs, and how many steps raised it;
* the reconstruction error per pixel of the held-out images, ``mean((reconstruct(X, y) -
  X)^2)`` rendered from their true class, after every iteration, beside the pixel variance
  (the error of rendering every pixel as the mean pixel value);
* optionally (``--eg-epochs N``) EG with the same layers and top for comparison.

Outputs: markdown tables on stdout (progress on stderr with ``-v``); ``--json PATH`` writes
every number (settings, per-run per-iteration rows). Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import em_mnist  # noqa: E402  (the EM options and per-iteration measurement shared by scripts)

LAYER_CHOICES = ("1", "2")
TOP_CHOICES = ("full", "average")


def layer_stack(name):
    from fastdrmm.layers import Layer

    stack = [Layer(32, 3, padding=1, pool=2)]
    if name == "2":
        stack.append(Layer(64, 3, padding=1))
    return stack


def load_digits_images():
    """(X (1797, 1, 8, 8) float32 in [0, 1], y)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def split(X, y, seed):
    from sklearn.model_selection import train_test_split

    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)


def few_labels(y, per_class, seed):
    """y with all but ``per_class`` labels of every class set to -1 (drawn with ``seed``)."""
    rng = np.random.default_rng([seed, 13, per_class])
    out = np.full_like(y, -1)
    for c in np.unique(y):
        keep = rng.permutation(np.flatnonzero(y == c))[:per_class]
        out[keep] = y[keep]
    return out


def run_em(args, layers, top, seed, X, y, X_test, y_test, name):
    """One EM fit with the per-iteration measurements: a result dict."""
    from fastdrmm import DRMM

    model = DRMM(layer_stack(layers), 10, algorithm="em", top=top, max_iter=args.max_iter,
                 validation_fraction=0.0, random_state=seed, **em_mnist.em_params(args))
    log = (lambda m: print(f"em_digits.py: {m}", file=sys.stderr, flush=True)) \
        if args.verbose else None
    tracker = em_mnist.IterationTracker(X_test, y_test, X_test, y_test, log=log,
                                        name=f"{name} layers {layers} top {top} seed {seed}")
    tracker.start()
    caught = em_mnist.fit_quietly(model, X, y, tracker)
    rows = tracker.attach_objective(model)
    return dict(mode=name, layers=layers, top=top, seed=seed, labels=int(np.sum(y >= 0)),
                unlabeled=int(np.sum(y < 0)), iterations=rows,
                accuracy=[r["accuracy"] for r in rows],
                recon_mse=[r["recon_mse"] for r in rows],
                recon_code_mse=[r["recon_code_mse"] for r in rows],
                objective=[list(map(float, p)) for p in model.objective_history_],
                objective_rises=em_mnist.objective_rises(model.objective_history_),
                final_accuracy=float(model.score(X_test, y_test)),
                converged=bool(model.converged_), train_s=rows[-1]["train_s"] if rows else 0.0,
                warnings=caught)


def run_eg(args, layers, top, seed, X, y, X_test, y_test):
    from fastdrmm import DRMM

    tic = time.perf_counter()
    model = DRMM(layer_stack(layers), 10, algorithm="eg", top=top, max_iter=args.eg_epochs,
                 validation_fraction=0.0, random_state=seed)
    model.fit(X, y)
    return dict(mode="eg", layers=layers, top=top, seed=seed, epochs=args.eg_epochs,
                accuracy=float(model.score(X_test, y_test)), train_s=time.perf_counter() - tic)


# --------------------------------------------------------------------------------- output


def _acc(v):
    return "—" if v is None else f"{v:.3f}"


def _table(head, rows):
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + [
        "| " + " | ".join(r) + " |" for r in rows]


def markdown(report):
    s = report["settings"]
    seeds = s["seeds"]
    em = ", ".join(f"{k}={v}" for k, v in sorted(s["em"].items())) or "DRMM's defaults"
    lines = [f"# Hard EM on scikit-learn's digits ({s['train_images']} train / "
             f"{s['test_images']} held out, 70/30 stratified), seeds "
             f"{' '.join(map(str, seeds))}", "",
             f"at most {s['max_iter']} iterations, validation fraction 0; EM settings: {em}; "
             f"held-out pixel variance {report['pixel_variance']:.4f} (mean over pixels of "
             f"the per-pixel variance {report['pixel_variance_per_pixel']:.4f}); "
             f"{report['machine']['cpu_count']} CPUs, {report['total_s']:.1f} s in all", ""]
    runs = report["runs"]
    configs = [(la, top) for la in s["layers"] for top in s["tops"]]

    def find(mode, la, top, seed):
        for r in runs:
            if (r["mode"], r["layers"], r["top"], r["seed"]) == (mode, la, top, seed):
                return r
        return None

    eg = {(r["layers"], r["top"], r["seed"]): r for r in report.get("eg", [])}
    lines += ["## Supervised EM: held-out accuracy after the last iteration", ""]
    head = ["layers", "top", *[f"seed {k}" for k in seeds], "mean", "min", "peak (mean)",
            "last - peak (worst)", "s / fit (mean)"]
    if eg:
        head.append(f"EG {s['eg_epochs']} epochs (mean)")
    body = []
    for la, top in configs:
        got = [find("supervised", la, top, k) for k in seeds]
        last = [g["accuracy"][-1] for g in got]
        peak = [max(g["accuracy"]) for g in got]
        row = [la, top, *map(_acc, last), _acc(float(np.mean(last))), _acc(min(last)),
               _acc(float(np.mean(peak))), f"{min(a - b for a, b in zip(last, peak)):+.3f}",
               f"{np.mean([g['train_s'] for g in got]):.1f}"]
        if eg:
            row.append(_acc(float(np.mean([eg[(la, top, k)]["accuracy"] for k in seeds]))))
        body.append(row)
    lines += _table(head, body)

    longest = max(len(r["accuracy"]) for r in runs)
    lines += ["", "## Supervised EM: held-out accuracy after every iteration", ""]
    body = [[la, top, str(k), *[_acc(a) for a in find("supervised", la, top, k)["accuracy"]]]
            + [""] * (longest - len(find("supervised", la, top, k)["accuracy"]))
            for la, top in configs for k in seeds]
    lines += _table(["layers", "top", "seed", *map(str, range(1, longest + 1))], body)

    if s["labels_per_class"]:
        n = s["labels_per_class"]
        lines += ["", f"## Semi-supervised EM: {n} labels per class + the rest of the "
                  f"training split unlabeled, vs EM on the {10 * n} labels alone", ""]
        body, summary = [], []
        for la, top in configs:
            diffs = []
            for k in seeds:
                semi, alone = find("semi", la, top, k), find("labels-only", la, top, k)
                d = semi["accuracy"][-1] - alone["accuracy"][-1]
                diffs.append(d)
                body.append([la, top, str(k), str(alone["labels"]), str(semi["unlabeled"]),
                             _acc(alone["accuracy"][-1]), _acc(semi["accuracy"][-1]),
                             f"{d:+.3f}"])
            summary.append(f"layers {la}, top {top}: semi-supervised wins on "
                           f"{sum(d > 0 for d in diffs)}/{len(diffs)} seeds, mean difference "
                           f"{np.mean(diffs):+.3f}")
        lines += _table(["layers", "top", "seed", "labels", "unlabeled", "labels only",
                         "semi-supervised", "semi - labels only"], body)
        lines += [""] + [f"- {t}" for t in summary]

    lines += ["", "## Supervised EM: objective per iteration (before → after the M-step) "
              "and the steps that raised it", ""]
    body = []
    for la, top in configs:
        for k in seeds:
            r = find("supervised", la, top, k)
            m, e = r["objective_rises"]
            body.append([la, top, str(k), ", ".join(
                f"{em_mnist.fmt_g(b)} → {em_mnist.fmt_g(a)}" for b, a in r["objective"]),
                str(m), str(e)])
    lines += _table(["layers", "top", "seed", "objective", "M-step rises", "E-step rises"],
                    body)

    for key, what in (("recon_mse", "rendered from the class template"),
                      ("recon_code_mse", "rendered from each image's own top code")):
        lines += ["", "## Supervised EM: held-out reconstruction MSE per pixel after every "
                  f"iteration, {what} (pixel variance {report['pixel_variance']:.4f})", ""]
        body = [[la, top, str(k), *[em_mnist.fmt_g(v, 3) for v in
                                    find("supervised", la, top, k)[key]]]
                + [""] * (longest - len(find("supervised", la, top, k)[key]))
                for la, top in configs for k in seeds]
        lines += _table(["layers", "top", "seed", *map(str, range(1, longest + 1))], body)
    differ = [r for r in runs if r["accuracy"] and abs(r["final_accuracy"] - r["accuracy"][-1])
              > 0]
    if differ:
        lines += ["", f"note: in {len(differ)} run(s) the fitted model (after DRMM.fit's final "
                  "refit of the priors) scores other than its last iteration: " + "; ".join(
                      f"{r['mode']} layers {r['layers']} top {r['top']} seed {r['seed']} "
                      f"{r['accuracy'][-1]:.3f} -> {r['final_accuracy']:.3f}" for r in differ)]
    notes = sorted({w for r in runs for w in r["warnings"]})
    if notes:
        lines += [""] + [f"warning: {w}" for w in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- main


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-iter", type=int, default=10, help="EM iterations per fit")
    ap.add_argument("--layers", default="1,2", help="comma-separated subset of 1,2")
    ap.add_argument("--tops", default="full,average",
                    help="comma-separated subset of full,average")
    ap.add_argument("--labels-per-class", type=int, default=20,
                    help="semi-supervised comparison with this many labels per class "
                         "(0: skip it)")
    ap.add_argument("--eg-epochs", type=int, default=0,
                    help="also fit EG for this many epochs per (layers, top, seed) (0: no)")
    ap.add_argument("--quick", action="store_true",
                    help="seed 0 only, 2 iterations (a smoke run)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    ap.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    em_mnist.add_em_options(ap)
    return ap


def _subset(text, choices, option):
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or any(s not in choices for s in items):
        raise SystemExit(f"{option}: choose from {','.join(choices)}")
    return list(dict.fromkeys(items))


def main(argv=None, out=None):
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    if args.quick:
        args.seeds, args.max_iter = [0], 2
    layers = _subset(args.layers, LAYER_CHOICES, "--layers")
    tops = _subset(args.tops, TOP_CHOICES, "--tops")
    if args.max_iter < 1:
        raise SystemExit("--max-iter must be >= 1")
    if args.labels_per_class < 0 or args.eg_epochs < 0:
        raise SystemExit("--labels-per-class and --eg-epochs must be >= 0")
    seeds = list(dict.fromkeys(args.seeds))
    X, y = load_digits_images()
    start = time.perf_counter()
    runs, eg = [], []
    held_out = None
    for seed in seeds:
        X_tr, X_te, y_tr, y_te = split(X, y, seed)
        held_out = X_te if held_out is None else held_out
        y_few = few_labels(y_tr, args.labels_per_class, seed) if args.labels_per_class else None
        for la in layers:
            for top in tops:
                runs.append(run_em(args, la, top, seed, X_tr, y_tr, X_te, y_te, "supervised"))
                if y_few is not None:
                    runs.append(run_em(args, la, top, seed, X_tr, y_few, X_te, y_te, "semi"))
                    lab = y_few >= 0
                    runs.append(run_em(args, la, top, seed, X_tr[lab], y_few[lab], X_te, y_te,
                                       "labels-only"))
                if args.eg_epochs:
                    eg.append(run_eg(args, la, top, seed, X_tr, y_tr, X_te, y_te))
    n_test = held_out.shape[0]
    report = dict(
        machine=em_mnist.machine(),
        settings=dict(seeds=seeds, max_iter=args.max_iter, layers=layers, tops=tops,
                      labels_per_class=args.labels_per_class, eg_epochs=args.eg_epochs,
                      em=em_mnist.em_params(args), train_images=int(X.shape[0] - n_test),
                      test_images=int(n_test)),
        # of the first seed's held-out images (the splits' pixel statistics barely differ)
        pixel_variance=em_mnist.pixel_variance(held_out),
        pixel_variance_per_pixel=float(np.mean(np.var(np.asarray(held_out, np.float64),
                                                      axis=0))),
        runs=runs, eg=eg, total_s=time.perf_counter() - start)
    text = markdown(report)
    out.write(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
