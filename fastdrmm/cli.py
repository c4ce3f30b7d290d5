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

from . import _cli_data  # noqa: E402
from ._cli_data import (DATASETS, CLIError, check_distinct_outputs, check_input_file,
                        check_layer_sizes, check_output_path, check_resume_data, data_identity,
                        data_identity_path, dataset_for_shape, load_split, parse_layers,
                        read_data_identity, select_labels, take_subset, write_data_identity)

DEFAULT_MODEL = "fastdrmm-model.npz"
#: the EG loss weights: option -> DRMM parameter
LOSS_WEIGHTS = {"xent": "xent_weight", "reconstruction": "reconstruction_weight",
                "entropy": "entropy_weight", "nonnegativity": "nonnegativity_weight",
                "kl": "kl_weight", "consistency": "consistency_weight"}
#: where ``fastdrmm train`` departs from DRMM's own defaults: the settings that learn in a
#: short run (the fully connected top reaches far higher accuracy in a few epochs than the
#: global average; see the README)
TRAIN_DEFAULTS = {"top": "full", "learning_rate": 5e-3}
#: the backends the command line computes on (its models keep their arrays on the host)
HOST_BACKENDS = ("cpu", "numpy")
BACKEND_CHOICES = ("auto", "cpu", "numpy", "numba-cuda", "cupy")

#: the largest values the options accept (larger runs go through the Python API)
MAX_EPOCHS = 1_000_000
MAX_BATCH = 4096
MAX_TRANSLATION = 32
MAX_SEED = 2**32 - 1
MAX_IMAGES = 1000  # reconstruct -n, sample --per-class
MAX_CLASSES_LISTED = 100
MAX_NUISANCES = 256
MAX_EM_ITER = 10_000


# --------------------------------------------------------------------------------------------
# argument types (their messages become "argument --x: <message>")


def _number(text, kind):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _int_in(low, high=None):
    """An argument type: an integer >= low (and <= high when given)."""

    def parse(text):
        value = _number(text.strip(), int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


_positive_int = _int_in(1)
_nonnegative_int = _int_in(0)
_seed = _int_in(0, MAX_SEED)


def _positive_float(text):
    value = _number(text, float)
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonnegative_float(text):
    value = _number(text, float)
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _unit_interval(text):
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _validation_fraction(text):
    value = _number(text, float)
    if not 0.0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"must lie in [0, 0.5], got {text}")
    return value


def _class_list(text):
    parts = [part for part in text.split(",") if part.strip()]
    if len(parts) > MAX_CLASSES_LISTED:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_CLASSES_LISTED} class indices, got {len(parts)}")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated class indices such as 0,1,2, got {text[:60]!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one class index")
    return values


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fastdrmm: error: <message> (see <prog> --help)``."""

    def error(self, message):
        self.exit(2, f"fastdrmm: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------------
# the parser


def _drmm_defaults():
    """The defaults of ``fastdrmm train``: DRMM's own, but for TRAIN_DEFAULTS."""
    import inspect

    from .drmm import DRMM

    defaults = {name: p.default for name, p in inspect.signature(DRMM).parameters.items()}
    defaults.update(TRAIN_DEFAULTS)
    return defaults


def _add_data_options(p, dataset_default="mnist"):
    if dataset_default is None:
        help_ = "the data set (default: the one whose images have the model's shape)"
    else:
        help_ = f"the data set (default {dataset_default})"
    p.add_argument("--dataset", choices=sorted(DATASETS), default=dataset_default, help=help_)
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="the directory holding the MNIST IDX files (default: $FASTDRMM_DATA/"
                        "mnist, else ~/.cache/fastdrmm/mnist)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing MNIST files (checksummed) into that directory")


def _add_train_parser(sub):
    d = _drmm_defaults()
    p = sub.add_parser(
        "train", help="train a DRMM (EG or hard EM) and write the model",
        description="Train a DRMM on MNIST or the digits, with a checkpoint after every epoch, "
                    "then report the test accuracy and write the model.")
    _add_data_options(p)
    p.add_argument("--train-size", type=_positive_int, metavar="N", default=None,
                   help="train on a seeded random subset of N training images (default all)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels-per-class", type=_positive_int, metavar="N", default=None,
                        help="keep N labels of every class (seeded); the rest are unlabeled")
    labels.add_argument("--labels", type=_positive_int, metavar="N", default=None,
                        help="keep N labels in all, balanced over the classes (seeded); the "
                             "rest are unlabeled (default: every label is kept)")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=["conv-small", "two-layer"], default=None,
                      help=f"a named architecture (default {d['layers']})")
    arch.add_argument("--layers", metavar="SPEC", default=None,
                      help="the layers, bottom first: K:k[:padding[:pool[:leak]]] per layer, "
                           "comma-separated (e.g. 8:3:1:2,16:3:1:2), or a JSON list of "
                           "fastdrmm.Layer fields; at most "
                           f"{_cli_data.MAX_LAYERS} layers, K <= "
                           f"{_cli_data.LAYER_LIMITS['n_templates']}, k, padding and pool <= "
                           f"{_cli_data.LAYER_LIMITS['kernel_size']}, "
                           f"{_cli_data.MAX_PARAMETERS:,} template entries in all")
    p.add_argument("--top", choices=["full", "average"], default=d["top"],
                   help="the class layer: 'full' (fully connected over the top code) or "
                        "'average' (global average pooling, Conv-Small's) (default "
                        f"{d['top']})")
    p.add_argument("--algorithm", choices=["eg", "em"], default=d["algorithm"],
                   help=f"gradient training (eg) or hard EM (default {d['algorithm']})")
    p.add_argument("--epochs", type=_int_in(1, MAX_EPOCHS), metavar="N",
                   default=d["max_iter"],
                   help=f"EG epochs or EM iterations, at most {MAX_EPOCHS} (default "
                        f"{d['max_iter']})")
    p.add_argument("--batch-size", type=_int_in(1, MAX_BATCH), metavar="N",
                   default=d["batch_size"],
                   help=f"samples per EG step, at most {MAX_BATCH} (default {d['batch_size']})")
    p.add_argument("--learning-rate", type=_positive_float, metavar="LR",
                   default=d["learning_rate"], help=f"Adam's step (default {d['learning_rate']})")
    p.add_argument("--lr-schedule", choices=["cosine", "constant", "step"],
                   default=d["lr_schedule"], help=f"(default {d['lr_schedule']})")
    for term, name in LOSS_WEIGHTS.items():
        p.add_argument(f"--{term}-weight", type=_nonnegative_float, metavar="W",
                       default=d[name], help=f"EG loss weight (default {d[name]})")
    p.add_argument("--translation", type=_int_in(0, MAX_TRANSLATION), metavar="T",
                   default=d["translation"],
                   help="EG: move every training image by a random translation of up to T "
                        f"pixels per step, at most {MAX_TRANSLATION} (default "
                        f"{d['translation']}: off)")
    p.add_argument("--teacher-decay", type=_unit_interval, metavar="D",
                   default=d["teacher_decay"],
                   help="EG: the consistency targets come from a moving average of the "
                        f"parameters with this decay per step (default {d['teacher_decay']})")
    p.add_argument("--confidence-threshold", type=_unit_interval, metavar="TAU",
                   default=d["confidence_threshold"],
                   help="EG: consistency targets become the most probable class where its "
                        "posterior is >= TAU, other samples are left out (default "
                        f"{d['confidence_threshold']}: soft targets)")
    p.add_argument("--validation-fraction", type=_validation_fraction, metavar="F",
                   default=d["validation_fraction"],
                   help="fraction of the labeled images held out to pick the best epoch "
                        f"(default {d['validation_fraction']}; 0 disables)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seeds the subset, the labels, the initialisation, the validation "
                        f"split and the batches, 0 to {MAX_SEED} (default 0)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="the kernel backend: cpu or numpy (default auto: $FASTDRMM_BACKEND, "
                        "else cpu)")
    p.add_argument("--out", metavar="PATH", default=DEFAULT_MODEL,
                   help=f"where to write the model (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="the checkpoint, rewritten atomically after every epoch "
                        "(default: OUT.ckpt)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint (run the same command again with "
                        "--resume; --epochs may be raised; other data options are refused)")
    p.add_argument("--test-limit", type=_nonnegative_int, metavar="N", default=None,
                   help="report the accuracy on the first N test images only (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    return p


def _add_model_parser(sub, name, help_, description):
    p = sub.add_parser(name, help=help_, description=description)
    p.add_argument("model", metavar="MODEL", help="a model file written by 'fastdrmm train'")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="the kernel backend: cpu or numpy (default: the model's own setting)")
    return p


def build_parser():
    parser = _Parser(prog="fastdrmm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="fit an RMM on the bundled digits and report accuracy")
    demo.add_argument("--n-nuisances", type=_int_in(1, MAX_NUISANCES), default=8,
                      help=f"templates per class, at most {MAX_NUISANCES} (default 8)")
    demo.add_argument("--inference", choices=["soft", "hard"], default="soft")
    demo.add_argument("--max-iter", type=_int_in(1, MAX_EM_ITER), default=50,
                      help=f"EM iterations, at most {MAX_EM_ITER} (default 50)")
    demo.add_argument("--labels-per-class", type=_positive_int, default=None,
                      help="keep only this many labels per class and fit semi-supervised")
    demo.add_argument("--unlabeled-weight", type=_nonnegative_float, default=0.1,
                      help="weight of the unlabeled samples in the M-step when "
                           "--labels-per-class is set (default 0.1: with few labels, a small "
                           "weight keeps the unlabeled mass from outvoting the labels)")
    demo.add_argument("--test-size", type=float, default=0.3,
                      help="the held-out fraction, in (0, 1) (default 0.3)")
    demo.add_argument("--seed", type=_seed, default=0, help=f"0 to {MAX_SEED} (default 0)")
    demo.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                      help="the kernel backend: cpu or numpy (default auto: "
                           "$FASTDRMM_BACKEND, else cpu)")
    demo.add_argument("--plot", default="fastdrmm-demo-templates.png",
                      help="where to write the template picture ('' to skip)")
    demo.add_argument("--drmm-epochs", type=_int_in(0, MAX_EPOCHS), default=12,
                      help="then train a small 2-layer DRMM by EG for this many epochs on the "
                           "same split (default 12; 0 skips it)")

    _add_train_parser(sub)

    ev = _add_model_parser(sub, "evaluate", "test accuracy of a saved model, overall and per "
                           "class", "Print a saved model's accuracy on the test split, "
                           "overall and per class.")
    _add_data_options(ev, dataset_default=None)
    ev.add_argument("--limit", type=_positive_int, metavar="N", default=None,
                    help="only the first N test images")

    rec = _add_model_parser(sub, "reconstruct", "render test images back top-down (PNG/.npy)",
                            "Reconstruct the first N test images (bottom-up inference, then "
                            "the top-down rendering from the inferred class and latents) and "
                            "write originals above reconstructions as a PNG grid and/or the "
                            "arrays as .npy, shape (2, N, C, H, W).")
    _add_data_options(rec, dataset_default=None)
    rec.add_argument("-n", "--n-images", type=_int_in(1, MAX_IMAGES), metavar="N", default=10,
                     help=f"how many test images, at most {MAX_IMAGES} (default 10)")
    _add_picture_outputs(rec)

    smp = _add_model_parser(sub, "sample", "generate images of every class (PNG/.npy)",
                            "Generate images from the model: one row of --per-class images "
                            "for each class, as a PNG grid and/or the array as .npy, shape "
                            "(classes, per_class, C, H, W).")
    smp.add_argument("--per-class", type=_int_in(1, MAX_IMAGES), metavar="N", default=8,
                     help=f"images per class, at most {MAX_IMAGES} (default 8)")
    smp.add_argument("--classes", type=_class_list, metavar="LIST", default=None,
                     help="comma-separated class indices, at most "
                          f"{MAX_CLASSES_LISTED} (default: every class)")
    smp.add_argument("--seed", type=_seed, default=0,
                     help=f"seeds the drawn latents, 0 to {MAX_SEED} (default 0)")
    _add_picture_outputs(smp)
    return parser


def _add_picture_outputs(p):
    p.add_argument("--out", metavar="PNG", default=None,
                   help="the PNG grid to write (needs matplotlib: pip install "
                        "'fastdrmm[plot]')")
    p.add_argument("--npy", metavar="PATH", default=None, help="also (or instead) write the "
                   "arrays in NumPy's .npy format")


# --------------------------------------------------------------------------------------------
# the backend


def host_backend(requested):
    """The host backend a command computes on, checked before any work: ``requested`` is the
    --backend value (None: the model's own, "auto": $FASTDRMM_BACKEND, else cpu). A GPU
    backend is refused (the command line's models keep their arrays on the host), saying
    plainly when this machine has no usable GPU; a missing package names its extra."""
    from . import _backends

    name, option = requested, "--backend"
    if name in (None, "auto"):
        try:
            chosen = _backends.get_backend()
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        name, option = ("cpu", None) if chosen == "auto" else (chosen, f"${_backends.ENV_VAR}")
    if name not in HOST_BACKENDS:
        reason = _backends.device_unavailable_reason(name)
        where = (f"{option}={name}" if option and option.startswith("$")
                 else f"{option} {name}")
        why = f"{name} runs on a GPU" + (f", and {reason}" if reason else "")
        raise CLIError(f"{where}: {why}; the command line computes on the host: use "
                       "--backend cpu or --backend numpy"
                       + (f" (or unset {option[1:]})" if option.startswith("$") else ""))
    _backends.load(name)  # an ImportError naming the extra when its package is missing
    return name


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
        path = plot_templates(model, args.plot)
        if path:
            print(f"templates written to {path}", file=out)
        else:
            print("matplotlib is not installed: no template picture "
                  "(pip install 'fastdrmm[plot]')", file=out)
    return accuracy


def _demo_drmm(args, x_train, y_fit, x_test, y_test, out, compiling):
    """The deep model on the same split: two small layers, EG, test accuracy every epoch."""
    import numpy as np

    from . import DRMM, Layer

    layers = [Layer(16, 3, padding=1, pool=2), Layer(32, 3, padding=1)]
    print(f"DRMM on the same split: {_layers_label(layers)}, EG, {args.drmm_epochs} epochs",
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
    from .io import atomic_write

    with atomic_write(path) as (f, _):  # a complete picture or none
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# train


class Interrupted(Exception):
    """Ctrl-C: the message says what was kept; exit status 130."""


def _file_signature(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _checkpoint_epoch(path):
    """The epoch a checkpoint holds (read from its header only), or None."""
    from . import io

    try:
        return int(io.read_header(path)["metadata"]["checkpoint"]["epoch"])
    except Exception:  # noqa: BLE001 - only decorates a message
        return None


def _interrupt_message(checkpoint, before, resumed):
    now = _file_signature(checkpoint)
    if now is not None and (now != before or resumed):
        epoch = _checkpoint_epoch(checkpoint)
        at = f" (epoch {epoch})" if epoch is not None else ""
        return (f"fastdrmm: interrupted; the last checkpoint, {checkpoint}{at}, is intact: run "
                "the same command with --resume to continue from it")
    if now is None:
        return "fastdrmm: interrupted before the first epoch ended; no checkpoint was written"
    return (f"fastdrmm: interrupted before the first epoch ended; {checkpoint} (from an "
            "earlier run) was left as it was")


def _layers_label(layers):
    if isinstance(layers, str):
        return layers
    return ",".join(f"{la.n_templates}:{la.kernel_size[0]}" for la in layers) + " (custom)"


def run_train(args, out=None):
    """Train a DRMM as the arguments say; returns a dict (model, test_accuracy, paths)."""
    import numpy as np

    from .drmm import DRMM

    out = sys.stdout if out is None else out
    verbose = not args.quiet
    model_path, checkpoint = _train_paths(args)
    backend = host_backend(args.backend)
    layers, option = _train_layers(args)
    _check_layers_fit(layers, option, DATASETS[args.dataset])  # before loading any data
    X, y = load_split(args.dataset, "train", args.data_dir, args.download)
    X, y = take_subset(X, y, args.train_size, args.seed)
    y_fit = select_labels(y, 10, args.seed, args.labels_per_class, args.labels)
    identity = data_identity(args, X, y_fit)
    before = _file_signature(checkpoint)
    if args.resume and before is not None:
        check_resume_data(checkpoint, identity)
    test = None
    if args.test_limit != 0:  # loaded now, so that a missing file fails before training
        X_test, y_test = load_split(args.dataset, "test", args.data_dir, args.download)
        test = X_test[:args.test_limit], y_test[:args.test_limit]

    model = DRMM(layers, 10, algorithm=args.algorithm, max_iter=args.epochs,
                 batch_size=args.batch_size, learning_rate=args.learning_rate,
                 lr_schedule=args.lr_schedule, top=args.top,
                 **{name: getattr(args, f"{term}_weight") for term, name in LOSS_WEIGHTS.items()},
                 translation=args.translation, teacher_decay=args.teacher_decay,
                 confidence_threshold=args.confidence_threshold,
                 validation_fraction=args.validation_fraction, random_state=args.seed,
                 backend=args.backend, verbose=int(verbose), checkpoint=checkpoint)
    n_labeled = int(np.sum(y_fit >= 0))
    labels = ("all labeled" if n_labeled == y_fit.size
              else f"{n_labeled} labeled, {y_fit.size - n_labeled} unlabeled")
    if verbose:
        print(f"fastdrmm train: DRMM {_layers_label(layers)} by {args.algorithm.upper()} on "
              f"{args.dataset}: {y_fit.size} training images ({labels}), up to {args.epochs} "
              f"epoch(s), top {args.top}, backend {backend}", file=out, flush=True)
    if args.resume and before is None:
        print(f"no checkpoint at {checkpoint} yet: starting from scratch", file=out, flush=True)
    elif args.resume:
        print(f"resuming from {checkpoint} (epoch {_checkpoint_epoch(checkpoint)})", file=out,
              flush=True)
    elif before is not None:
        print(f"note: {checkpoint} exists; this run starts afresh and replaces it after its "
              "first epoch (--resume continues from it instead)", file=out, flush=True)

    tic = time.perf_counter()
    with _data_record(checkpoint, identity, before):
        try:
            model.fit(X, y_fit, resume=args.resume,
                      callback=lambda snapshot, record: _record_data(checkpoint, identity))
            model.save(model_path)
        except KeyboardInterrupt:
            raise Interrupted(_interrupt_message(checkpoint, before, args.resume)) from None
    seconds = time.perf_counter() - tic

    summary = f"trained {model.n_iter_} epoch(s) in {seconds:.1f} s"
    if model.validation_score_ is not None:
        summary += (f"; best validation accuracy {model.validation_score_:.4f} "
                    f"(epoch {model.best_iteration_}, the parameters kept)")
    print(summary, file=out)
    accuracy = None
    if test is not None:
        accuracy = float(np.mean(model.predict(test[0]) == test[1]))
        print(f"test accuracy: {accuracy:.4f} on {test[1].size} {args.dataset} test images",
              file=out)
    print(f"model written to {model_path} (checkpoint: {checkpoint})", file=out)
    return {"model": model, "test_accuracy": accuracy, "out": model_path,
            "checkpoint": checkpoint}


def _train_paths(args):
    """(model path, checkpoint path), checked writable and distinct before any work."""
    model_path = os.fspath(args.out)
    checkpoint = os.fspath(args.checkpoint) if args.checkpoint is not None else None
    check_output_path(model_path, "--out")
    if checkpoint is None:
        checkpoint = model_path + ".ckpt"
    check_output_path(checkpoint, "--checkpoint")
    check_distinct_outputs(("--out", model_path), ("--checkpoint", checkpoint),
                           ("the checkpoint's data record", data_identity_path(checkpoint)))
    return model_path, checkpoint


def _train_layers(args):
    """(layers, the option that chose them)."""
    if args.layers is not None:
        return parse_layers(args.layers), "--layers"
    return args.preset or _drmm_defaults()["layers"], "--preset"


def _check_layers_fit(layers, option, input_shape):
    """The layers must fit the images and stay within the command line's size bounds."""
    from .layers import layer_shapes, resolve_layers

    resolved = resolve_layers(layers)
    try:
        shapes = layer_shapes(resolved, input_shape)
    except ValueError as exc:
        raise CLIError(f"{option}: {exc}") from None
    check_layer_sizes(shapes, resolved)


_recorded = set()


def _record_data(checkpoint, identity):
    """Called after every epoch, just before the checkpoint is written: record the data the
    checkpoint is about to hold (once per run)."""
    key = (checkpoint, identity["sha256"])
    if key not in _recorded:
        write_data_identity(checkpoint, identity)
        _recorded.add(key)


class _data_record:
    """Keep the data record beside the checkpoint true to it: when a run ends (error or
    Ctrl-C) without having replaced the checkpoint, the record it wrote just before the
    first checkpoint write is put back as it was."""

    def __init__(self, checkpoint, identity, before):
        self.checkpoint, self.identity, self.before = checkpoint, identity, before
        self.previous = read_data_identity(checkpoint)

    def __enter__(self):
        _recorded.discard((self.checkpoint, self.identity["sha256"]))
        return self

    def __exit__(self, kind, exc, tb):
        _recorded.discard((self.checkpoint, self.identity["sha256"]))
        if kind is not None and _file_signature(self.checkpoint) == self.before:
            try:
                write_data_identity(self.checkpoint, self.previous)
            except OSError:
                pass
        return False


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
        return (f"DRMM ({_layers_label(model.layers)}, {model.algorithm.upper()}, "
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
