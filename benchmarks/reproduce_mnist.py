"""Reproduce the DRMM paper's MNIST experiments with :class:`fastdrmm.DRMM`.

Patel, Nguyen & Baraniuk (2016) report MNIST test errors of the DRMM trained supervised (all
60,000 labels) and semi-supervised with N_L = 100, 600, 1,000 and 3,000 labels (the rest of
the training set unlabeled). This script runs those experiments and prints a markdown table of
what it measured beside the paper's numbers.

Usage::

    python benchmarks/reproduce_mnist.py                         # all five, conv-small, EG
    python benchmarks/reproduce_mnist.py --experiments supervised,100 --epochs 20
    python benchmarks/reproduce_mnist.py --time-budget 36000 --out results/mnist   # 10 hours
    python benchmarks/reproduce_mnist.py --preset two-layer --train-size 2000 --epochs 2
    python benchmarks/reproduce_mnist.py --algorithm em --experiments supervised
    python benchmarks/reproduce_mnist.py --tables eg,em --experiments 100,600,1000,3000

Experiments: ``supervised`` and ``semi-<N_L>`` (``100``, ``600``, ``1000``, ``3000``, or any
other count written as ``semi-N`` or ``N``). The N_L labels are balanced over the classes
(N_L / 10 each, a remainder to the first classes of a seeded order), drawn with ``--seed``
from the training set (or its ``--train-size`` subset); every other training image gets
y = -1. The model is ``DRMM(--preset, algorithm=--algorithm, ...)`` with the loss weights,
rate, schedule and batch size given here, ``validation_fraction`` 0 by default (every label
trains; the last epoch's parameters are kept), seeded by ``--seed``.

The EM table
------------
``--tables eg,em`` (or ``em`` alone) adds a second table: the same experiments fitted by
semi-supervised hard EM, ``DRMM(--preset, algorithm="em", top=--em-top,
max_iter=--em-iterations, ...)`` with the same labels, beside EM on those N_L labeled images
alone (``--no-em-labels-only`` skips that) and the first table's error. The EM settings
(``--em-unlabeled-weight``, ``--em-confidence-threshold``, ``--em-amplitude-steps``,
``--em-targets``, ``--em-shrinkage``, ``--em-ridge``, ``--em-bias``, ``--em-init``,
``--em-tol``, ``--em-param NAME=VALUE``) are DRMM's own defaults unless given; the EG-only
settings (rate, loss weights, few-labels terms) are not passed to EM. ``--time-budget`` is the
first table's; each EM fit runs its ``--em-iterations`` (``--test-every-epoch`` records its
test error after every iteration too). In the JSON: ``em_experiments`` (each with its
``labels_alone`` run) and ``em_settings``.

Time budget
-----------
``--time-budget SECONDS`` is the total for all the experiments chosen. Each experiment gets
what is left divided by the number of experiments left (time one does not use passes to the
next; evaluation counts against the budget too) and is then fitted epoch by epoch: ``DRMM(...,
max_iter=k, checkpoint=...).fit(X, y, resume=True)`` for k = 1, 2, ... until the epoch in
which its training time reaches its share (that epoch is finished), ``--epochs``, or EM's
convergence. Resuming this way gives bit-for-bit the parameters of one uninterrupted
``fit(max_iter=k)`` with ``lr_schedule="constant"`` (and for EM), but NOT with the "cosine"
and "step" schedules: their horizon is ``max_iter`` itself, so each resumed call would decay
the rate over the epochs so far. ``--lr-schedule auto`` (the default) therefore means "cosine"
(DRMM's default, over ``--epochs``) without a time budget and "constant" with one. Every
resumed call also refits the generative priors on 2,000 samples (DRMM.fit's last step); the
table's wall time includes that, and the JSON has the epochs' own times beside it.

``--checkpoint-dir DIR`` keeps each experiment's checkpoint there (one file per preset,
algorithm, experiment and seed) and resumes from it when the script is run again with the same
settings, so an interrupted long run continues where it stopped (the wall time then counts
this process only). Without it the checkpoints live in a temporary directory.

Outputs: the markdown table on stdout (progress on stderr); ``--out PATH`` writes PATH.json
(settings, machine, every experiment with its per-epoch history) and PATH.md (the table), or
only the one its suffix (.json / .md) names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

# the EM helpers of benchmarks/em_mnist.py (imported where the EM table needs them)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: the paper's MNIST test errors (%), Patel, Nguyen & Baraniuk 2016; None where not reported
PAPER = {
    "supervised": {"drmm_5layer": None, "drmm_2layer": None, "drmm_nn_kl": None},
    100: {"drmm_5layer": 3.50, "drmm_2layer": 11.81, "drmm_nn_kl": 0.57},
    600: {"drmm_5layer": 1.56, "drmm_2layer": 3.73, "drmm_nn_kl": None},
    1000: {"drmm_5layer": 1.67, "drmm_2layer": 2.88, "drmm_nn_kl": None},
    3000: {"drmm_5layer": 0.91, "drmm_2layer": 1.72, "drmm_nn_kl": None},
}
#: this project's targets (test error %, at most)
TARGETS = {"supervised": 0.7, 100: 3.5}
DEFAULT_EXPERIMENTS = "supervised,100,600,1000,3000"
N_CLASSES = 10


# --------------------------------------------------------------------------------- helpers


def default_mnist_dir():
    """``$FASTDRMM_DATA/mnist``, else this checkout's ``../shared/data/mnist``, else None (the
    user cache of :func:`fastdrmm.datasets.mnist_data_dir`)."""
    root = os.environ.get("FASTDRMM_DATA")
    if root:
        return os.path.join(root, "mnist")
    shared = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           os.pardir, os.pardir, "shared", "data", "mnist"))
    return shared if os.path.isdir(shared) else None


def parse_experiments(text):
    """'supervised,100,semi-600' -> ['supervised', 100, 600] (order kept, duplicates out)."""
    out = []
    for item in (s.strip().lower() for s in text.split(",")):
        if not item:
            continue
        if item in ("supervised", "sup", "all-labels"):
            key = "supervised"
        else:
            num = item[5:] if item.startswith("semi-") else item
            if not num.isdigit() or int(num) < 1:
                raise SystemExit(f"--experiments: {item!r} is neither 'supervised' nor a label "
                                 "count (100, semi-600, ...)")
            key = int(num)
        if key not in out:
            out.append(key)
    if not out:
        raise SystemExit("--experiments: nothing to run")
    return out


def experiment_name(key):
    return "supervised" if key == "supervised" else f"semi-{key}"


def choose_labels(y, n_labels, seed, n_classes=N_CLASSES):
    """y with all but ``n_labels`` entries set to -1: n_labels // n_classes per class (the
    remainder one more each for the first classes of a seeded order), drawn with ``seed``.
    Where a class has too few samples all of them are kept (fewer labels in total)."""
    rng = np.random.default_rng([seed, 11, n_labels])
    per_class = np.full(n_classes, n_labels // n_classes)
    per_class[rng.permutation(n_classes)[:n_labels % n_classes]] += 1
    keep = []
    for c in range(n_classes):
        members = np.flatnonzero(y == c)
        keep.append(rng.permutation(members)[:per_class[c]])
    keep = np.sort(np.concatenate(keep))
    out = np.full_like(y, -1)
    out[keep] = y[keep]
    return out


def resolve_schedule(schedule, time_budget):
    if schedule == "auto":
        return "constant" if time_budget is not None else "cosine"
    return schedule


#: command-line options passed to DRMM under the same name (and recorded in the report)
TRAINING_OPTIONS = ("algorithm", "batch_size", "learning_rate", "lr_schedule", "xent_weight",
                    "reconstruction_weight", "entropy_weight", "nonnegativity_weight",
                    "kl_weight", "consistency_weight", "translation", "teacher_decay",
                    "confidence_threshold",
                    "weight_decay", "unlabeled_weight", "validation_fraction", "dtype", "top")


def training_options(args):
    return {name: getattr(args, name) for name in TRAINING_OPTIONS}


def model_params(args):
    """DRMM keyword arguments common to every experiment (max_iter/checkpoint apart); the EM
    table's settings beyond TRAINING_OPTIONS come from ``args.extra_params``."""
    params = dict(layers=args.preset, n_classes=N_CLASSES, random_state=args.seed,
                  verbose=int(args.verbose), **training_options(args))
    params.update(getattr(args, "extra_params", None) or {})
    return params


def checkpoint_name(key, args, n_train):
    """A file name unique to the experiment, the model settings and the training set (a
    schedule other than constant spans max_iter: --epochs then counts too)."""
    settings = {k: v for k, v in model_params(args).items() if k != "verbose"}
    settings.update(experiment=experiment_name(key), n_train=n_train)
    if args.lr_schedule != "constant" and args.algorithm == "eg":
        settings["epochs"] = args.epochs
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{args.preset}-{args.algorithm}-{experiment_name(key)}-{digest}.fdz"


def fit_by_epochs(params, X, y, max_epochs, share_s, checkpoint, callback=None):
    """``DRMM(**params, max_iter=k, checkpoint=checkpoint).fit(X, y, resume=True)`` for
    k = 1, 2, ...: stops after the epoch in which the training time reached ``share_s``
    (None: never), at ``max_epochs``, or when the model reports convergence.
    Returns (model, training seconds, fit calls)."""
    from sklearn.exceptions import ConvergenceWarning

    from fastdrmm import DRMM

    tic = time.perf_counter()
    model, calls = None, 0
    start = 1
    if os.path.exists(checkpoint):  # an earlier run of this script: continue after its epochs
        from fastdrmm import load

        start = max(1, min(load(checkpoint).n_iter_ + 1, max_epochs))
    for k in range(start, max_epochs + 1):
        model = DRMM(**params, max_iter=k, checkpoint=checkpoint)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X, y, resume=True, callback=callback)
        calls += 1
        elapsed = time.perf_counter() - tic
        if model.converged_ or (share_s is not None and elapsed >= share_s):
            break
    return model, time.perf_counter() - tic, calls


def run_experiment(key, args, X, y, X_test, y_test, share_s, checkpoint, labels_only=False):
    """Fit one experiment and score it on the test set: a result dict. ``labels_only``: fit
    on the experiment's labeled images alone (the EM table's comparison)."""
    n_labels = None if key == "supervised" else key
    y_train = y if n_labels is None else choose_labels(y, n_labels, args.seed)
    if labels_only:
        X, y_train = np.ascontiguousarray(X[y_train >= 0]), y_train[y_train >= 0]
    labeled = int(np.sum(y_train >= 0))
    params = model_params(args)
    curve = [] if args.test_every_epoch else None

    def track(snapshot, record):  # test error after every epoch: reported, never used to select
        curve.append(100.0 * (1.0 - float(snapshot.score(X_test, y_test))))
        print(f"reproduce_mnist.py: {experiment_name(key)}"
              f"{' labels only' if labels_only else ''} epoch {record['epoch']}: test error "
              f"{curve[-1]:.2f} %", file=sys.stderr, flush=True)

    callback = track if curve is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if share_s is None:  # one uninterrupted fit (resumes only an interrupted run)
            from fastdrmm import DRMM

            tic = time.perf_counter()
            model = DRMM(**params, max_iter=args.epochs, checkpoint=checkpoint)
            model.fit(X, y_train, resume=True, callback=callback)
            train_s, calls = time.perf_counter() - tic, 1
        else:
            model, train_s, calls = fit_by_epochs(params, X, y_train, args.epochs, share_s,
                                                  checkpoint, callback)
    tic = time.perf_counter()
    accuracy = float(model.score(X_test, y_test))
    eval_s = time.perf_counter() - tic
    paper = PAPER.get(key, {})
    target = TARGETS.get(key)
    error = 100.0 * (1.0 - accuracy)
    history = [{k: v for k, v in rec.items()} for rec in model.history_]
    return dict(
        experiment=experiment_name(key), labels=labeled, unlabeled=int(y_train.size - labeled),
        train_images=int(y_train.size), epochs=int(model.n_iter_), max_epochs=args.epochs,
        time_share_s=share_s, wall_s=train_s, epoch_s_sum=float(sum(r.get("time", 0.0)
                                                                      for r in history)),
        fit_calls=calls, eval_s=eval_s, test_images=int(y_test.size), test_accuracy=accuracy,
        test_error_pct=error, paper=paper, target_pct=target,
        target_met=None if target is None else bool(error <= target),
        converged=bool(model.converged_), validation_score=model.validation_score_,
        best_iteration=int(model.best_iteration_), history=history,
        test_error_by_epoch_pct=curve, labels_only=bool(labels_only),
        warnings=sorted({f"{w.category.__name__}: {w.message}" for w in caught}))


# --------------------------------------------------------------------------------- output


def _f(value, fmt="{:.2f}"):
    return "—" if value is None else fmt.format(value)


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _few_label_terms(s):
    """The few-labels EG settings that are on, as ", kl 1 / consistency 2 / ..." (or "")."""
    parts = [f"{label} {s[key]:g}" for label, key in (
        ("kl", "kl_weight"), ("consistency", "consistency_weight"),
        ("translation", "translation"), ("teacher decay", "teacher_decay"),
        ("confidence threshold", "confidence_threshold")) if s.get(key)]
    return (" / " + " / ".join(parts)) if parts else ""


def markdown(report):
    """The first table (where it ran) and the EM table (where it ran)."""
    parts = []
    if report["experiments"] or not report.get("em_experiments"):
        parts.append(main_markdown(report))
    if report.get("em_experiments"):
        parts.append(em_markdown(report))
    return "\n".join(parts)


def main_markdown(report):
    s = report["settings"]
    lines = [f"# DRMM on MNIST: {s['preset']}, {s['algorithm'].upper()}, seed {s['seed']}", "",
             f"top {s['top']}, "
             f"train images {s['train_images']}, test images {s['test_images']}, epochs "
             f"<= {s['epochs']}, batch {s['batch_size']}, rate {s['learning_rate']:g} "
             f"({s['lr_schedule']}), weights xent {s['xent_weight']:g} / reconstruction "
             f"{s['reconstruction_weight']:g} / entropy {s['entropy_weight']:g} / "
             f"non-negativity {s['nonnegativity_weight']:g}" + _few_label_terms(s)
             + ", validation fraction "
             f"{s['validation_fraction']:g}, time budget "
             + ("none" if s["time_budget_s"] is None else _duration(s["time_budget_s"]))
             + f"; {report['machine']['cpu_count']} CPUs", ""]
    head = ["experiment", "labels", "epochs run", "wall time", "test error %",
            "paper DRMM 5-layer %", "paper DRMM 2-layer %", "paper DRMM +NN+KL %", "target %",
            "met"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in report["experiments"]:
        paper = r["paper"]
        met = "" if r["target_met"] is None else ("yes" if r["target_met"] else "no")
        lines.append("| " + " | ".join([
            r["experiment"], str(r["labels"]), f"{r['epochs']}/{r['max_epochs']}",
            _duration(r["wall_s"]), f"{r['test_error_pct']:.2f}",
            _f(paper.get("drmm_5layer")), _f(paper.get("drmm_2layer")),
            _f(paper.get("drmm_nn_kl")),
            "" if r["target_pct"] is None else f"<= {r['target_pct']:.2f}", met]) + " |")
    lines += ["", "Paper: Patel, Nguyen & Baraniuk (2016), MNIST test error; 5-layer and 2-layer "
              "DRMM semi-supervised, +NN+KL with the non-negativity and KL terms (N_L = 100 "
              "only); no supervised figure is quoted here (the project's target is <= 0.7 %). "
              "wall time: training only (every fit call), evaluation apart."]
    notes = sorted({w for r in report["experiments"] for w in r["warnings"]})
    if notes:
        lines += [""] + [f"warning: {w}" for w in notes]
    return "\n".join(lines) + "\n"


def em_markdown(report):
    """The EM table: semi-supervised EM beside EM on the labels alone and the first table."""
    s, em = report["settings"], report["em_settings"]
    main = {r["experiment"]: r for r in report["experiments"]}
    settings = ", ".join(f"{k}={v}" for k, v in sorted(em["given"].items()))
    lines = [f"# Semi-supervised EM on MNIST: {s['preset']}, top {em['top']}, seed {s['seed']}",
             "", f"train images {s['train_images']}, test images {s['test_images']}, EM "
             f"iterations <= {em['iterations']}; EM settings: {settings or 'DRMM defaults'}"
             + (f"; first table: {s['algorithm'].upper()} (top {s['top']})" if main else ""),
             ""]
    head = ["experiment", "labels", "iterations run", "wall time", "EM test error %",
            "EM on the labels alone %", "unlabeled helps", "first table %",
            "paper DRMM 5-layer %", "paper DRMM 2-layer %"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in report["em_experiments"]:
        alone = r.get("labels_alone")
        helps = "" if alone is None else (
            "yes" if r["test_error_pct"] < alone["test_error_pct"] else "no")
        first = main.get(r["experiment"])
        lines.append("| " + " | ".join([
            r["experiment"], str(r["labels"]), f"{r['epochs']}/{r['max_epochs']}",
            _duration(r["wall_s"]), f"{r['test_error_pct']:.2f}",
            "—" if alone is None else f"{alone['test_error_pct']:.2f}", helps,
            "—" if first is None else f"{first['test_error_pct']:.2f}",
            _f(r["paper"].get("drmm_5layer")), _f(r["paper"].get("drmm_2layer"))]) + " |")
    lines += ["", "EM on the labels alone: the same EM fitted on the N_L labeled images only "
              "(no unlabeled data); unlabeled helps: the semi-supervised error is the lower. "
              "wall time: training only."]
    notes = sorted({w for r in report["em_experiments"] for w in r["warnings"]}
                   | {w for r in report["em_experiments"] if r.get("labels_alone")
                      for w in r["labels_alone"]["warnings"]})
    if notes:
        lines += [""] + [f"warning: {w}" for w in notes]
    return "\n".join(lines) + "\n"


#: DRMM settings only EG reads: the EM table leaves them at DRMM's defaults
EG_ONLY = ("batch_size", "learning_rate", "lr_schedule", "xent_weight", "reconstruction_weight",
           "entropy_weight", "nonnegativity_weight", "kl_weight", "consistency_weight",
           "translation", "teacher_decay", "weight_decay")


def em_table_args(args):
    """The arguments of the EM table's experiments: algorithm em, --em-top, --em-iterations,
    the --em-* settings, every other setting DRMM's default (the dtype, validation fraction,
    seed and verbosity kept)."""
    import copy

    import em_mnist
    from fastdrmm import DRMM

    defaults = DRMM().get_params()
    em = em_mnist.em_params(args, prefix="em-")
    out = copy.copy(args)
    out.algorithm, out.top, out.epochs = "em", args.em_top, args.em_iterations
    for name in EG_ONLY + ("unlabeled_weight", "confidence_threshold"):
        setattr(out, name, em.pop(name, defaults[name]))
    out.extra_params = em
    return out


def run_em_table(keys, args, X, y, X_test, y_test, ck_dir):
    """The EM table's experiments (each with its labels-only run): a list of result dicts."""
    em_args = em_table_args(args)
    results = []
    for key in keys:
        name = checkpoint_name(key, em_args, y.size)
        print(f"reproduce_mnist.py: EM table {experiment_name(key)} ({args.preset}, top "
              f"{em_args.top}, <= {em_args.epochs} iterations)", file=sys.stderr, flush=True)
        result = run_experiment(key, em_args, X, y, X_test, y_test, None,
                                os.path.join(ck_dir, "em-table-" + name))
        if key != "supervised" and args.em_labels_only:
            result["labels_alone"] = run_experiment(
                key, em_args, X, y, X_test, y_test, None,
                os.path.join(ck_dir, "em-labels-only-" + name), labels_only=True)
        print(f"reproduce_mnist.py: EM table {result['experiment']}: test error "
              f"{result['test_error_pct']:.2f} %" + (
                  f" (labels alone {result['labels_alone']['test_error_pct']:.2f} %)"
                  if "labels_alone" in result else ""), file=sys.stderr, flush=True)
        results.append(result)
    return results, em_args


def write_outputs(path, report, text):
    root, ext = os.path.splitext(path)
    targets = {".json": [path], ".md": [path]}.get(ext, [path + ".json", path + ".md"])
    for target in targets:
        folder = os.path.dirname(os.path.abspath(target))
        os.makedirs(folder, exist_ok=True)
        with open(target, "w") as f:
            if target.endswith(".json"):
                json.dump(report, f, indent=1)
            else:
                f.write(text)


# --------------------------------------------------------------------------------- main


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="conv-small", help="DRMM layers preset (conv-small, "
                    "two-layer)")
    ap.add_argument("--experiments", default=DEFAULT_EXPERIMENTS,
                    help="comma-separated: supervised and label counts N_L (100, semi-600, ...)"
                         f" (default {DEFAULT_EXPERIMENTS})")
    ap.add_argument("--epochs", type=int, default=10, help="epochs (EM: iterations) per "
                    "experiment, at most")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="total training time for all experiments (see the module docstring)")
    ap.add_argument("--train-size", type=int, default=None,
                    help="use a seeded random subset of this many training images")
    ap.add_argument("--test-size", type=int, default=None,
                    help="score on the first this many test images (default all 10,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--algorithm", choices=["eg", "em"], default="eg")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--lr-schedule", choices=["auto", "cosine", "constant", "step"],
                    default="auto", help="auto: cosine, or constant under --time-budget")
    ap.add_argument("--xent-weight", type=float, default=1.0)
    ap.add_argument("--reconstruction-weight", type=float, default=0.1)
    ap.add_argument("--entropy-weight", type=float, default=0.1)
    ap.add_argument("--nonnegativity-weight", type=float, default=0.01)
    ap.add_argument("--kl-weight", type=float, default=0.0,
                    help="class-balance term on unlabeled predictions (DRMM kl_weight)")
    ap.add_argument("--consistency-weight", type=float, default=0.0,
                    help="translation-consistency term (DRMM consistency_weight)")
    ap.add_argument("--translation", type=int, default=0,
                    help="max translation nuisance in pixels sampled per image and step")
    ap.add_argument("--teacher-decay", type=float, default=0.0,
                    help="moving-average decay of the consistency targets' parameters")
    ap.add_argument("--confidence-threshold", type=float, default=0.0,
                    help="hard consistency targets where the posterior reaches this")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--unlabeled-weight", type=float, default=1.0, help="EM only")
    ap.add_argument("--validation-fraction", type=float, default=0.0,
                    help="labeled samples held out to pick the best epoch (default 0)")
    ap.add_argument("--top", choices=["average", "full"], default="average",
                    help="DRMM(top=...): class templates on the averaged top code (the "
                         "paper's Conv-Small) or on the whole top code")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default all)")
    ap.add_argument("--data-dir", default=None,
                    help="MNIST directory (default $FASTDRMM_DATA/mnist, else "
                         "../shared/data/mnist, else the user cache)")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="keep checkpoints here and resume from them when run again")
    ap.add_argument("--out", default=None, metavar="PATH",
                    help="write PATH.json and PATH.md (or only the one a .json/.md suffix names)")
    ap.add_argument("--test-every-epoch", action="store_true",
                    help="score the test set after every epoch (reported in the JSON and on "
                         "stderr, never used to select; its time counts in the wall time)")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="DRMM progress bars and per-epoch lines")
    ap.add_argument("--tables", default="eg",
                    help="comma-separated: eg (the table of --algorithm, default) and em (the "
                         "semi-supervised EM table; see the module docstring)")
    ap.add_argument("--em-iterations", type=int, default=10,
                    help="EM table: iterations per experiment, at most")
    ap.add_argument("--em-top", choices=["average", "full"], default="full",
                    help="EM table: DRMM(top=...) (default full)")
    ap.add_argument("--em-labels-only", action=argparse.BooleanOptionalAction, default=True,
                    help="EM table: also fit EM on the N_L labeled images alone")
    import em_mnist

    em_mnist.add_em_options(ap, prefix="em-")
    return ap


def main(argv=None, out=None):
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    keys = parse_experiments(args.experiments)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    if not tables or any(t not in ("eg", "em") for t in tables):
        raise SystemExit("--tables: a comma-separated subset of eg,em")
    if args.em_iterations < 1:
        raise SystemExit("--em-iterations must be >= 1")
    if args.epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    if args.time_budget is not None and not args.time_budget > 0:
        raise SystemExit("--time-budget must be > 0 seconds")
    args.lr_schedule = resolve_schedule(args.lr_schedule, args.time_budget)
    if args.time_budget is not None and args.lr_schedule in ("cosine", "step") \
            and args.algorithm == "eg":
        print(f"reproduce_mnist.py: warning: lr_schedule={args.lr_schedule!r} with "
              "--time-budget: every resumed fit(max_iter=k) decays the rate over k epochs, "
              "so the schedule is not that of one run (use constant)", file=sys.stderr)

    import fastdrmm
    from fastdrmm.layers import PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"--preset: unknown preset {args.preset!r}; choose from "
                         f"{sorted(PRESETS)}")
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
    X, y, X_test, y_test = fastdrmm.load_mnist(args.data_dir or default_mnist_dir(),
                                               return_X_y=True, dtype=np.dtype(args.dtype))
    if args.train_size is not None:
        if not 10 <= args.train_size <= X.shape[0]:
            raise SystemExit(f"--train-size must lie in [10, {X.shape[0]}]")
        rows = np.sort(np.random.default_rng([args.seed, 10]).permutation(X.shape[0])
                       [:args.train_size])
        X, y = np.ascontiguousarray(X[rows]), y[rows]
    if args.test_size is not None:
        if not 1 <= args.test_size <= X_test.shape[0]:
            raise SystemExit(f"--test-size must lie in [1, {X_test.shape[0]}]")
        X_test, y_test = X_test[:args.test_size], y_test[:args.test_size]
    too_many = [k for k in keys if k != "supervised" and k > y.size]
    if too_many:
        raise SystemExit(f"--experiments: {too_many} labels but only {y.size} training images")

    report = dict(
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                     python=platform.python_version(), numpy=np.__version__,
                     fastdrmm=fastdrmm.__version__),
        settings=dict(preset=args.preset, epochs=args.epochs, time_budget_s=args.time_budget,
                      seed=args.seed, **training_options(args), train_images=int(y.size),
                      test_images=int(y_test.size),
                      experiments=[experiment_name(k) for k in keys]),
        experiments=[])
    tmp = None
    ck_dir = args.checkpoint_dir
    if ck_dir is None:
        ck_dir = tmp = tempfile.mkdtemp(prefix="reproduce_mnist_")
    os.makedirs(ck_dir, exist_ok=True)
    start = time.perf_counter()
    try:
        for i, key in enumerate(keys if "eg" in tables else []):
            share = None
            if args.time_budget is not None:
                used = time.perf_counter() - start
                share = max(args.time_budget - used, 0.0) / (len(keys) - i)
            checkpoint = os.path.join(ck_dir, checkpoint_name(key, args, y.size))
            print(f"reproduce_mnist.py: {experiment_name(key)} ({args.preset}, "
                  f"{args.algorithm}, <= {args.epochs} epochs"
                  + ("" if share is None else f", share {_duration(share)}") + ")",
                  file=sys.stderr, flush=True)
            result = run_experiment(key, args, X, y, X_test, y_test, share, checkpoint)
            report["experiments"].append(result)
            print(f"reproduce_mnist.py: {result['experiment']}: {result['epochs']} epochs, "
                  f"{_duration(result['wall_s'])}, test error {result['test_error_pct']:.2f} %",
                  file=sys.stderr, flush=True)
        if "em" in tables:
            import em_mnist

            report["em_experiments"], em_args = run_em_table(keys, args, X, y, X_test, y_test,
                                                             ck_dir)
            report["em_settings"] = dict(top=em_args.top, iterations=em_args.epochs,
                                         labels_only=bool(args.em_labels_only),
                                         given=em_mnist.em_params(args, prefix="em-"),
                                         params={k: v for k, v in model_params(em_args).items()
                                                 if k not in ("layers", "n_classes",
                                                              "random_state", "verbose")})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report["total_s"] = time.perf_counter() - start
    text = markdown(report)
    out.write(text)
    if args.out:
        write_outputs(args.out, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
