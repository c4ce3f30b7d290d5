"""The ``fastdrmm`` command line (also ``python -m fastdrmm``).

``fastdrmm demo`` fits a shallow RMM by EM on scikit-learn's bundled 8x8 digits, prints the EM
log-likelihood per iteration and the held-out accuracy, and writes a picture of the learned
templates when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import sys
import time


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="fastdrmm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="fit an RMM on the bundled digits and report accuracy")
    demo.add_argument("--n-nuisances", type=_positive_int, default=8,
                      help="templates per class (default 8)")
    demo.add_argument("--inference", choices=["soft", "hard"], default="soft")
    demo.add_argument("--max-iter", type=_positive_int, default=50)
    demo.add_argument("--labels-per-class", type=_positive_int, default=None,
                      help="keep only this many labels per class and fit semi-supervised")
    demo.add_argument("--unlabeled-weight", type=float, default=0.1,
                      help="weight of the unlabeled samples in the M-step when "
                           "--labels-per-class is set (default 0.1: with few labels, a small "
                           "weight keeps the unlabeled mass from outvoting the labels)")
    demo.add_argument("--test-size", type=float, default=0.3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", default="auto")
    demo.add_argument("--plot", default="fastdrmm-demo-templates.png",
                      help="where to write the template picture ('' to skip)")
    return parser


def run_demo(args, out=sys.stdout):
    import numpy as np
    from sklearn.model_selection import train_test_split

    from . import RMM
    from .datasets import load_digits

    if not 0.0 < args.test_size < 1.0:
        raise ValueError(f"--test-size must lie in (0, 1), got {args.test_size}")
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
          f"backend {args.backend}", file=out)
    model = RMM(n_classes=10, n_nuisances=args.n_nuisances, inference=args.inference,
                max_iter=args.max_iter, unlabeled_weight=args.unlabeled_weight,
                random_state=args.seed, backend=args.backend)
    start = time.perf_counter()
    model.fit(x_train, y_fit)
    seconds = time.perf_counter() - start
    print("iteration  log-likelihood per sample", file=out)
    for i, value in enumerate(model.lower_bounds_, 1):
        print(f"{i:9d}  {value:.6f}", file=out)
    status = "converged" if model.converged_ else "stopped at max_iter"
    # RMM.score is the mean log-likelihood (as GaussianMixture's), so accuracy is computed here
    accuracy = float(np.mean(model.predict(x_test) == y_test))
    print(f"EM {status} after {model.n_iter_} iterations in {seconds:.2f} s", file=out)
    print(f"held-out accuracy: {accuracy:.4f}", file=out)
    if args.plot:
        path = plot_templates(model, args.plot)
        if path:
            print(f"templates written to {path}", file=out)
        else:
            print("matplotlib is not installed: no template picture "
                  "(pip install 'fastdrmm[plot]')", file=out)
    return accuracy


def plot_templates(model, path):
    """A grid of the learned templates, one row per class; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    templates = model.templates_
    n_classes, n_nuisances = templates.shape[:2]
    images = templates.reshape(n_classes, n_nuisances, -1, *templates.shape[-2:])[:, :, 0]
    fig, axes = plt.subplots(n_classes, n_nuisances, squeeze=False,
                             figsize=(0.8 * n_nuisances + 0.6, 0.8 * n_classes))
    for c in range(n_classes):
        for g in range(n_nuisances):
            ax = axes[c, g]
            ax.imshow(images[c, g], cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if g == 0:
                ax.set_ylabel(str(model.classes_[c]), rotation=0, labelpad=10)
    fig.suptitle("RMM templates (rows: class, columns: nuisance)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            run_demo(args)
    except KeyboardInterrupt:
        print("fastdrmm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ImportError, OSError) as exc:
        print(f"fastdrmm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
