"""The ``fastdrmm`` command line (also ``python -m fastdrmm``).

``fastdrmm demo`` fits a shallow RMM by EM on scikit-learn's bundled 8x8 digits, prints the EM
log-likelihood per iteration and the held-out accuracy, and writes a picture of the learned
templates when matplotlib is installed.

``fastdrmm train`` fits a DRMM (EG or hard EM) on MNIST or the digits, fully or partly
labeled, with a checkpoint after every epoch (``--resume`` continues from it), and writes the
model; ``fastdrmm evaluate MODEL`` reports its test accuracy (overall and per class);
``fastdrmm reconstruct MODEL`` and ``fastdrmm sample MODEL`` write test images and their
top-down reconstructions, or images generated per class, as a PNG grid and/or a .npy array.

Errors are one line on stderr (``fastdrmm: error: ...``) and exit status 1 (2 for a bad
command line), raised before any long work; Ctrl-C exits with status 130 and one line
("fastdrmm: interrupted"), at any moment, the start-up included, leaving the last checkpoint
intact. Every size an option sets is bounded (the maximums are in ``--help``).

The digits have no test split of their own: every command uses the same fixed, stratified 30%
of them (seed 0) as the test split and the rest as the training split.
"""

from __future__ import annotations

# Only the standard library's light modules at import time: the console entry point imports
# this module and calls main(), which installs the Ctrl-C handling before NumPy, Numba and
# scikit-learn are imported (see fastdrmm/__init__.py and _startup_interrupts).
import os
import sys

from . import _interrupt

if os.path.basename(sys.argv[0] if sys.argv else "") == "fastdrmm":
    _interrupt.install()  # run as the console script: answer Ctrl-C from here on

import argparse  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from ._cli_data import (DATASETS, CLIError, check_distinct_outputs,  # noqa: E402
                        check_input_file, check_output_path, dataset_for_shape, layers_label,
                        load_split)
from ._cli_options import (MAX_CLASSES_LISTED, MAX_EM_ITER, MAX_EPOCHS,  # noqa: E402
                           MAX_IMAGES, MAX_NUISANCES, MAX_SEED, add_backend_option,
                           add_data_options, host_backend)
from ._cli_train import Interrupted, add_train_parser, run_train  # noqa: E402

__all__ = ["build_parser", "main", "run_demo", "run_train", "run_evaluate", "run_reconstruct",
           "run_sample"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fastdrmm: error: <message> (see <prog> --help)``."""

    def error(self, message):
        self.exit(2, f"fastdrmm: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------------
# the parser


def _add_model_parser(sub, name, help_, description):
    p = sub.add_parser(name, help=help_, description=description)
    p.add_argument("model", metavar="MODEL", help="a model file written by 'fastdrmm train'")
    add_backend_option(p, default=None)
    return p


def _rmm_constraints():
    """What each RMM setting accepts: the model's own ``_parameter_constraints``."""
    from .rmm import RMM

    return RMM._parameter_constraints


def _add_demo_parser(sub):
    """The ``demo`` subcommand: the RMM settings it passes, checked against their constraints
    within the command line's bounds."""
    from ._cli_params import integers, option_choices, option_type

    c = _rmm_constraints()
    demo = sub.add_parser("demo", help="fit an RMM on the bundled digits and report accuracy")
    demo.add_argument("--n-nuisances", type=option_type(c["n_nuisances"],
                                                        integers(1, MAX_NUISANCES)),
                      default=8, help=f"templates per class, at most {MAX_NUISANCES} (default 8)")
    demo.add_argument("--inference", choices=option_choices(c["inference"], "soft"),
                      default="soft")
    demo.add_argument("--max-iter", type=option_type(c["max_iter"], integers(1, MAX_EM_ITER)),
                      default=50, help=f"EM iterations, at most {MAX_EM_ITER} (default 50)")
    demo.add_argument("--labels-per-class", type=option_type(integers(1)), default=None,
                      help="keep only this many labels per class and fit semi-supervised")
    demo.add_argument("--unlabeled-weight", type=option_type(c["unlabeled_weight"]),
                      default=0.1,
                      help="weight of the unlabeled samples in the M-step when "
                           "--labels-per-class is set (default 0.1: with few labels, a small "
                           "weight keeps the unlabeled mass from outvoting the labels)")
    demo.add_argument("--test-size", type=float, default=0.3,
                      help="the held-out fraction, in (0, 1) (default 0.3)")
    demo.add_argument("--seed", type=option_type(integers(0, MAX_SEED)), default=0,
                      help=f"0 to {MAX_SEED} (default 0)")
    add_backend_option(demo)
    demo.add_argument("--plot", default="fastdrmm-demo-templates.png",
                      help="where to write the template picture ('' to skip)")
    demo.add_argument("--drmm-epochs", type=option_type(integers(0, MAX_EPOCHS)), default=12,
                      help="then train a small 2-layer DRMM by EG for this many epochs on the "
                           "same split (default 12; 0 skips it)")


def _add_model_commands(sub):
    """evaluate, reconstruct and sample: they read a saved model."""
    from ._cli_params import class_list, integers, option_type

    ev = _add_model_parser(sub, "evaluate", "test accuracy of a saved model, overall and per "
                           "class", "Print a saved model's accuracy on the test split, "
                           "overall and per class.")
    add_data_options(ev, dataset_default=None)
    ev.add_argument("--limit", type=option_type(integers(1)), metavar="N", default=None,
                    help="only the first N test images")

    rec = _add_model_parser(sub, "reconstruct", "render test images back top-down (PNG/.npy)",
                            "Reconstruct the first N test images (bottom-up inference, then "
                            "the top-down rendering from the inferred class and latents) and "
                            "write originals above reconstructions as a PNG grid and/or the "
                            "arrays as .npy, shape (2, N, C, H, W).")
    add_data_options(rec, dataset_default=None)
    rec.add_argument("-n", "--n-images", type=option_type(integers(1, MAX_IMAGES)), metavar="N",
                     default=10, help=f"how many test images, at most {MAX_IMAGES} (default 10)")
    _add_picture_outputs(rec)

    smp = _add_model_parser(sub, "sample", "generate images of every class (PNG/.npy)",
                            "Generate images from the model: one row of --per-class images "
                            "for each class, as a PNG grid and/or the array as .npy, shape "
                            "(classes, per_class, C, H, W).")
    smp.add_argument("--per-class", type=option_type(integers(1, MAX_IMAGES)), metavar="N",
                     default=8, help=f"images per class, at most {MAX_IMAGES} (default 8)")
    smp.add_argument("--classes", type=class_list(MAX_CLASSES_LISTED), metavar="LIST",
                     default=None, help="comma-separated class indices, at most "
                                        f"{MAX_CLASSES_LISTED} (default: every class)")
    smp.add_argument("--seed", type=option_type(integers(0, MAX_SEED)), default=0,
                     help=f"seeds the drawn latents, 0 to {MAX_SEED} (default 0)")
    _add_picture_outputs(smp)


def build_parser():
    parser = _Parser(prog="fastdrmm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_parser(sub)
    add_train_parser(sub)
    _add_model_commands(sub)
    return parser


def _add_picture_outputs(p):
    p.add_argument("--out", metavar="PNG", default=None,
                   help="the PNG grid to write (needs matplotlib: pip install "
                        "'fastdrmm[plot]')")
    p.add_argument("--npy", metavar="PATH", default=None, help="also (or instead) write the "
                   "arrays in NumPy's .npy format")


# --------------------------------------------------------------------------------------------
# demo


def run_demo(args, out=None):
    import numpy as np
    from sklearn.model_selection import train_test_split

    from . import RMM
    from .datasets import load_digits

    out = sys.stdout if out is None else out
    if not 0.0 < args.test_size < 1.0:
        raise ValueError(f"--test-size must lie in (0, 1), got {args.test_size}")
    if args.plot:  # before fitting: a bad path must not cost the whole run
        check_output_path(args.plot, "--plot")
    backend = host_backend(args.backend)
    x, y = load_digits(return_X_y=True, dtype=np.float64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=args.test_size, random_state=args.seed, stratify=y)
    y_fit = y_train.copy()
    mode = "supervised"
    if args.labels_per_class is not None:
        rng = np.random.default_rng(args.seed)
        keep = np.zeros(len(y_fit), bool)
        for c in np.unique(y_fit):
            members = np.flatnonzero(y_fit == c)
            keep[rng.choice(members, min(args.labels_per_class, len(members)), replace=False)] = 1
        y_fit[~keep] = -1
        mode = f"semi-supervised, {args.labels_per_class} labels per class"
    print(f"fastdrmm demo: RMM on the digits ({len(x_train)} train, {len(x_test)} held out, "
          f"{mode}), {args.n_nuisances} templates per class, {args.inference} EM, "
          f"backend {backend}", file=out)
    model = RMM(n_classes=10, n_nuisances=args.n_nuisances, inference=args.inference,
                max_iter=args.max_iter, unlabeled_weight=args.unlabeled_weight,
                random_state=args.seed, backend=args.backend)
    from ._compiling import CompileClock

    with CompileClock(lambda line: print(line, file=out, flush=True)) as compiling:
        accuracy = _demo_rmm(args, model, x_train, y_fit, x_test, y_test, out, compiling)
        if args.drmm_epochs:
            _demo_drmm(args, x_train.astype(np.float32), y_fit, x_test.astype(np.float32),
                       y_test, out, compiling)
    return accuracy


def _compiled(compiling, before):
    """' (of which N s compiling kernels)' where this part compiled any, else ''."""
    seconds = compiling.seconds - before
    return f" (of which {seconds:.1f} s compiling kernels)" if seconds >= 0.1 else ""


def _demo_rmm(args, model, x_train, y_fit, x_test, y_test, out, compiling):
    """The shallow model: EM, its log-likelihood per iteration, the held-out accuracy."""
    import numpy as np

    start, before = time.perf_counter(), compiling.seconds
    model.fit(x_train, y_fit)
    seconds = time.perf_counter() - start
    print("iteration  log-likelihood per sample", file=out)
    for i, value in enumerate(model.lower_bounds_, 1):
        print(f"{i:9d}  {value:.6f}", file=out)
    status = "converged" if model.converged_ else "stopped at max_iter"
    # RMM.score is the mean log-likelihood (as GaussianMixture's), so accuracy is computed here
    accuracy = float(np.mean(model.predict(x_test) == y_test))
    print(f"EM {status} after {model.n_iter_} iterations in {seconds:.2f} s"
          f"{_compiled(compiling, before)}", file=out)
    print(f"held-out accuracy: {accuracy:.4f}", file=out)
    if args.plot:
        _write_templates(model, args.plot, out)
    return accuracy


def _write_templates(model, path, out):
    """The RMM's templates as one PNG grid (rows: class, columns: nuisance); without
    matplotlib, a line saying so (the demo's numbers stand without the picture)."""
    from .plotting import PLOT_EXTRA_HINT, require_matplotlib, save_image_grid

    try:
        require_matplotlib()
    except ImportError:
        print(f"matplotlib is not installed: no template picture ({PLOT_EXTRA_HINT})",
              file=out)
        return
    templates = model.templates_
    rows = templates.reshape(*templates.shape[:2], -1, *templates.shape[-2:])
    save_image_grid(path, rows, row_labels=[str(c) for c in model.classes_],
                    title="RMM templates (rows: class, columns: nuisance)")
    print(f"templates written to {path}", file=out)


def _demo_drmm(args, x_train, y_fit, x_test, y_test, out, compiling):
    """The deep model on the same split: two small layers, EG, test accuracy every epoch."""
    import numpy as np

    from . import DRMM, Layer

    layers = [Layer(16, 3, padding=1, pool=2), Layer(32, 3, padding=1)]
    print(f"DRMM on the same split: {layers_label(layers)}, EG, {args.drmm_epochs} epochs",
          file=out)
    model = DRMM(layers, 10, algorithm="eg", max_iter=args.drmm_epochs, batch_size=32,
                 learning_rate=5e-3, top="full", validation_fraction=0,
                 random_state=args.seed, backend=args.backend)

    def report(snapshot, record):
        accuracy = snapshot.score(x_test, y_test)
        print(f"  epoch {record['epoch']:2d}  loss {record['loss']:.4f}  held-out accuracy "
              f"{accuracy:.4f}  ({record['time']:.1f} s)", file=out)
        return {"test_accuracy": accuracy}

    start, before = time.perf_counter(), compiling.seconds
    model.fit(x_train, y_fit, callback=report)
    seconds = time.perf_counter() - start
    error = float(np.mean((model.reconstruct(x_test) - x_test) ** 2))
    print(f"DRMM held-out accuracy: {model.score(x_test, y_test):.4f} after {seconds:.1f} s"
          f"{_compiled(compiling, before)}; top-down reconstruction error {error:.4f} per "
          "pixel", file=out)


# --------------------------------------------------------------------------------------------
# evaluate, reconstruct, sample


def _load_model(args):
    from ._persistence import load

    path = check_input_file(args.model)
    host_backend(args.backend)
    model = load(path)
    if args.backend is not None:
        model.set_params(backend=args.backend)
    return model


def _image_shape(model):
    shape = getattr(model, "input_shape_", None)
    if shape is None:
        shape = getattr(model, "feature_shape_", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _test_data(model, args, limit=None):
    """(dataset name, X_test, y_test) for this model: --dataset, else the data set whose
    images have the model's shape."""
    shape = _image_shape(model)
    dataset = args.dataset or dataset_for_shape(shape)
    if dataset is None:
        raise CLIError(f"cannot tell the data set from the model's image shape {shape}: "
                       "pass --dataset")
    if shape is not None and shape != DATASETS[dataset]:
        raise CLIError(f"{args.model} was fitted on images of shape {shape}, but {dataset} "
                       f"images have shape {DATASETS[dataset]}")
    X, y = load_split(dataset, "test", args.data_dir, args.download)
    return dataset, X[:limit], y[:limit]


def _describe(model):
    name = type(model).__name__
    if name == "DRMM":
        return (f"DRMM ({layers_label(model.layers)}, {model.algorithm.upper()}, "
                f"{model.n_iter_} epoch(s))")
    if name == "RMM":
        return f"RMM ({model.n_classes} classes x {model.n_nuisances} nuisances)"
    return name


def _require_drmm(model, args, what):
    from .drmm import DRMM

    if not isinstance(model, DRMM):
        raise CLIError(f"{args.model} holds a {type(model).__name__}; {what} needs a DRMM")


def run_evaluate(args, out=None):
    """Print the test accuracy, overall and per class; returns (accuracy, per_class dict)."""
    import numpy as np

    out = sys.stdout if out is None else out
    model = _load_model(args)
    dataset, X, y = _test_data(model, args, args.limit)
    predicted = np.asarray(model.predict(X))
    correct = predicted == y
    accuracy = float(np.mean(correct))
    print(f"{_describe(model)} from {args.model}", file=out)
    print(f"test accuracy: {accuracy:.4f} ({int(correct.sum())}/{y.size} {dataset} test "
          "images)", file=out)
    print("class  images  accuracy", file=out)
    per_class = {}
    for c in np.unique(y):
        members = y == c
        per_class[int(c)] = float(np.mean(correct[members]))
        print(f"{int(c):5d}  {int(members.sum()):6d}  {per_class[int(c)]:8.4f}", file=out)
    return accuracy, per_class


def _check_picture_outputs(args):
    from .plotting import require_matplotlib

    if args.out is None and args.npy is None:
        raise CLIError("nothing to write: give --out PNG and/or --npy PATH")
    for path, option in ((args.out, "--out"), (args.npy, "--npy")):
        if path is not None:
            check_output_path(path, option)
    # two outputs on one file would silently keep only the second; over MODEL, lose it
    check_distinct_outputs(("MODEL", args.model), ("--out", args.out), ("--npy", args.npy))
    if args.out is not None:
        require_matplotlib()


def _write_pictures(args, rows, row_labels, title, array, what, out):
    from .plotting import save_image_grid, save_npy

    if args.out is not None:
        save_image_grid(args.out, rows, row_labels=row_labels, title=title)
        print(f"{what} written to {args.out}", file=out)
    if args.npy is not None:
        save_npy(args.npy, array)
        print(f"array of shape {array.shape} written to {args.npy}", file=out)


def run_reconstruct(args, out=None, columns=10):
    """Reconstruct the first N test images; returns (originals, reconstructions)."""
    import numpy as np

    out = sys.stdout if out is None else out
    _check_picture_outputs(args)
    model = _load_model(args)
    _require_drmm(model, args, "reconstruct")
    dataset, X, _ = _test_data(model, args, args.n_images)
    R = model.reconstruct(X)
    error = float(np.mean((R - X) ** 2))
    print(f"{_describe(model)}: {X.shape[0]} {dataset} test images reconstructed, mean squared "
          f"error per pixel {error:.5g}", file=out)
    rows, labels = [], []
    for start in range(0, X.shape[0], columns):
        for name, images in (("original", X), ("reconstructed", R)):
            chunk = images[start:start + columns]
            pad = np.full((columns - chunk.shape[0], *chunk.shape[1:]), np.nan)
            rows.append(np.concatenate([chunk, pad]) if pad.shape[0] else chunk)
            labels.append(name)
    _write_pictures(args, np.stack(rows), labels, f"{dataset} test images and their "
                    "reconstructions", np.stack([X, R]), "picture", out)
    return X, R


def run_sample(args, out=None):
    """Generate --per-class images of every class; returns (classes, per_class, C, H, W)."""
    import numpy as np

    out = sys.stdout if out is None else out
    _check_picture_outputs(args)
    model = _load_model(args)
    _require_drmm(model, args, "sample")
    classes = list(model.classes_) if args.classes is None else args.classes
    bad = [c for c in classes if not 0 <= c < model.n_classes]
    if bad:
        raise CLIError(f"--classes: {bad[0]} is not a class of the model (0 to "
                       f"{model.n_classes - 1})")
    wanted = np.repeat(np.asarray(classes, np.int64), args.per_class)
    images = model.sample(wanted, random_state=args.seed)
    images = images.reshape(len(classes), args.per_class, *images.shape[1:])
    print(f"{_describe(model)}: {args.per_class} sample(s) of each of {len(classes)} "
          f"class(es), seed {args.seed}", file=out)
    _write_pictures(args, images, [str(c) for c in classes], "samples (rows: class)", images,
                    "picture", out)
    return images


# --------------------------------------------------------------------------------------------
# main


COMMANDS = {"demo": run_demo, "train": run_train, "evaluate": run_evaluate,
            "reconstruct": run_reconstruct, "sample": run_sample}


def _one_line(exc):
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"fastdrmm: warning: {_one_line(message)}", file=sys.stderr)


def _set_sigint(handler):
    """Install a SIGINT handler; returns the previous one (None where signals cannot be set:
    outside the main thread)."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except (ValueError, OSError):
        return None


def _preload(command):
    """Import what the command needs while Ctrl-C still exits at once (see main)."""
    import numpy  # noqa: F401

    from . import _persistence, datasets, drmm, ops, rmm  # noqa: F401

    if command == "demo":
        import sklearn.model_selection  # noqa: F401


def main(argv=None):
    """Run the command line; returns the exit status (0, 1 error, 2 usage, 130 Ctrl-C).

    Ctrl-C is answered in two phases. While the modules load and the arguments are parsed it
    exits at once (one line, 130): a KeyboardInterrupt inside an import would print a long
    traceback. Then it raises KeyboardInterrupt, so that training reports the checkpoint it
    kept and files being written are removed, and is reported as one line.
    """
    previous = _interrupt.install()
    try:
        return _main(argv)
    finally:
        if previous is not None:
            _set_sigint(previous)


def _main(argv):
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad command line (2, one line printed)
        return exc.code
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _preload(args.command)
    _set_sigint(signal.default_int_handler)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            COMMANDS[args.command](args)
        except Interrupted as exc:
            _set_sigint(signal.SIG_IGN)  # a second Ctrl-C must not interrupt the report
            print(exc, file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            _set_sigint(signal.SIG_IGN)
            print("fastdrmm: interrupted", file=sys.stderr)
            return 130
        except (CLIError, ValueError, TypeError, ImportError, OSError, ArithmeticError) as exc:
            print(f"fastdrmm: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        except MemoryError as exc:
            detail = f" ({_one_line(exc)})" if str(exc) else ""
            print(f"fastdrmm: error: out of memory{detail}: choose smaller sizes",
                  file=sys.stderr)
            return 1
        except RecursionError:
            print("fastdrmm: error: an input is nested too deeply", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

