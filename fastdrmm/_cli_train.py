"""``fastdrmm train``: its options and its run.

It trains a DRMM (EG or hard EM) on MNIST or the digits, fully or partly labeled, with a
checkpoint after every epoch (``--resume`` continues from it), and writes the model. Beside the
checkpoint it records the training data the checkpoint belongs to (``<checkpoint>.data.json``),
so that a resumed run refuses other data.

Only the standard library at import time (see ``fastdrmm.cli``).
"""

from __future__ import annotations

import os
import sys
import time

from . import _cli_data
from ._cli_data import (DATASETS, CLIError, check_distinct_outputs, check_layer_sizes,
                        check_output_path, check_resume_data, data_identity,
                        data_identity_path, layers_label, load_split, parse_layers,
                        read_data_identity, select_labels, take_subset, write_data_identity)
from ._cli_options import (MAX_BATCH, MAX_EM_ITER, MAX_EPOCHS, MAX_SEED, MAX_TRANSLATION,
                           add_backend_option, add_data_options, host_backend)

__all__ = ["DEFAULT_MODEL", "TRAIN_DEFAULTS", "Interrupted",
           "add_train_parser", "run_train"]

DEFAULT_MODEL = "fastdrmm-model.npz"
#: where ``fastdrmm train`` departs from DRMM's own defaults: the settings that learn in a
#: short run (the fully connected top reaches far higher accuracy in a few epochs than the
#: global average; see the README)
TRAIN_DEFAULTS = {"top": "full", "learning_rate": 5e-3}


def _drmm_defaults():
    """The defaults of ``fastdrmm train``: DRMM's own, but for TRAIN_DEFAULTS."""
    import inspect

    from .drmm import DRMM

    defaults = {name: p.default for name, p in inspect.signature(DRMM).parameters.items()}
    defaults.update(TRAIN_DEFAULTS)
    return defaults


def _drmm_constraints():
    """What each DRMM setting accepts: the model's own ``_parameter_constraints`` (the options
    that set them are checked against these, within the command line's bounds)."""
    from .drmm import DRMM

    return DRMM._parameter_constraints


def add_train_parser(sub):
    """The ``train`` subcommand: DRMM's settings (its defaults but for TRAIN_DEFAULTS, its
    constraints within the command line's bounds), the data, the outputs."""
    from ._cli_params import integers, option_choices, option_type, reals

    d, c = _drmm_defaults(), _drmm_constraints()
    p = sub.add_parser(
        "train", help="train a DRMM (EG or hard EM) and write the model",
        description="Train a DRMM on MNIST or the digits, with a checkpoint after every epoch, "
                    "then report the test accuracy and write the model.")
    add_data_options(p)
    p.add_argument("--train-size", type=option_type(integers(1)), metavar="N", default=None,
                   help="train on a seeded random subset of N training images (default all)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels-per-class", type=option_type(integers(1)), metavar="N",
                        default=None,
                        help="keep N labels of every class (seeded); the rest are unlabeled")
    labels.add_argument("--labels", type=option_type(integers(1)), metavar="N", default=None,
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
    p.add_argument("--top", choices=option_choices(c["top"], d["top"]), default=d["top"],
                   help="the class layer: 'full' (fully connected over the top code) or "
                        "'average' (global average pooling, Conv-Small's) (default "
                        f"{d['top']})")
    p.add_argument("--algorithm", choices=option_choices(c["algorithm"], d["algorithm"]),
                   default=d["algorithm"],
                   help=f"gradient training (eg) or hard EM (default {d['algorithm']})")
    p.add_argument("--epochs", type=option_type(c["max_iter"], integers(1, MAX_EPOCHS)),
                   metavar="N", default=d["max_iter"],
                   help=f"EG epochs or EM iterations, at most {MAX_EPOCHS} (default "
                        f"{d['max_iter']})")
    p.add_argument("--batch-size", type=option_type(c["batch_size"], integers(1, MAX_BATCH)),
                   metavar="N", default=d["batch_size"],
                   help=f"samples per EG step, at most {MAX_BATCH} (default {d['batch_size']})")
    p.add_argument("--learning-rate", type=option_type(c["learning_rate"]), metavar="LR",
                   default=d["learning_rate"], help=f"Adam's step (default {d['learning_rate']})")
    p.add_argument("--lr-schedule", choices=option_choices(c["lr_schedule"], d["lr_schedule"]),
                   default=d["lr_schedule"], help=f"(default {d['lr_schedule']})")
    from ._drmm_params import LOSS_WEIGHTS  # the EG terms' weight settings, named once

    for name in LOSS_WEIGHTS:  # option --xent-weight sets xent_weight, ...
        p.add_argument(f"--{name.replace('_', '-')}", type=option_type(c[name]), metavar="W",
                       default=d[name], help=f"EG loss weight (default {d[name]})")
    p.add_argument("--translation",
                   type=option_type(c["translation"], integers(0, MAX_TRANSLATION)),
                   metavar="T", default=d["translation"],
                   help="EG: move every training image by a random translation of up to T "
                        f"pixels per step, at most {MAX_TRANSLATION} (default "
                        f"{d['translation']}: off)")
    p.add_argument("--teacher-decay", type=option_type(c["teacher_decay"]), metavar="D",
                   default=d["teacher_decay"],
                   help="EG: the consistency targets come from a moving average of the "
                        f"parameters with this decay per step (default {d['teacher_decay']})")
    p.add_argument("--confidence-threshold",
                   # the command line has always refused 1 (the model accepts it)
                   type=option_type(c["confidence_threshold"], reals(0, 1, closed="left")),
                   metavar="TAU", default=d["confidence_threshold"],
                   help="EG: consistency targets become the most probable class where its "
                        "posterior is >= TAU, other samples are left out; EM: unlabeled images "
                        "below TAU weigh nothing in that iteration (default "
                        f"{d['confidence_threshold']}: soft targets)")
    p.add_argument("--init", choices=option_choices(c["init"], d["init"]), default=d["init"],
                   help="the starting templates: 'he' (random), 'patches' (the data's), 'em' "
                        "(EG from a few EM iterations) or 'auto' (patches for EM, he for EG) "
                        f"(default {d['init']})")
    p.add_argument("--amplitude-steps", type=option_type(c["amplitude_steps"],
                                                         integers(0, MAX_EM_ITER)),
                   metavar="N", default=d["amplitude_steps"],
                   help="EM: steps per E-step refining the codes to render the layer below "
                        f"(default {d['amplitude_steps']}; 0: the bottom-up codes)")
    p.add_argument("--em-targets", choices=option_choices(c["em_targets"], d["em_targets"]),
                   default=d["em_targets"],
                   help="EM: fit each layer to the code below ('bottom-up') or to the "
                        f"top-down rendering of the chosen class (default {d['em_targets']})")
    p.add_argument("--unlabeled-weight", type=option_type(c["unlabeled_weight"]), metavar="W",
                   default=d["unlabeled_weight"],
                   help=f"EM: the weight of an unlabeled image (default {d['unlabeled_weight']})")
    p.add_argument("--validation-fraction", type=option_type(c["validation_fraction"]),
                   metavar="F", default=d["validation_fraction"],
                   help="fraction of the labeled images held out to pick the best epoch "
                        f"(default {d['validation_fraction']}; 0 disables)")
    p.add_argument("--seed", type=option_type(integers(0, MAX_SEED)), default=0,
                   help="seeds the subset, the labels, the initialisation, the validation "
                        f"split and the batches, 0 to {MAX_SEED} (default 0)")
    add_backend_option(p)
    p.add_argument("--out", metavar="PATH", default=DEFAULT_MODEL,
                   help=f"where to write the model (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="the checkpoint, rewritten atomically after every epoch "
                        "(default: OUT.ckpt)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint (run the same command again with "
                        "--resume; --epochs may be raised; other data options are refused)")
    p.add_argument("--test-limit", type=option_type(integers(0)), metavar="N", default=None,
                   help="report the accuracy on the first N test images only (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    return p


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


def run_train(args, out=None):
    """Train a DRMM as the arguments say; returns a dict (model, test_accuracy, paths)."""
    import numpy as np

    from ._drmm_params import LOSS_WEIGHTS
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
                 **{name: getattr(args, name) for name in LOSS_WEIGHTS},
                 translation=args.translation, teacher_decay=args.teacher_decay,
                 confidence_threshold=args.confidence_threshold, init=args.init,
                 amplitude_steps=args.amplitude_steps, em_targets=args.em_targets,
                 unlabeled_weight=args.unlabeled_weight,
                 validation_fraction=args.validation_fraction, random_state=args.seed,
                 backend=args.backend, verbose=int(verbose), checkpoint=checkpoint)
    if verbose:
        _announce(args, layers, y_fit, backend, out)
    _announce_checkpoint(args.resume, checkpoint, before, out)

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


def _announce(args, layers, y_fit, backend, out):
    """The run in one line: model, algorithm, data, labels, epochs, backend."""
    import numpy as np

    n_labeled = int(np.sum(y_fit >= 0))
    labels = ("all labeled" if n_labeled == y_fit.size
              else f"{n_labeled} labeled, {y_fit.size - n_labeled} unlabeled")
    print(f"fastdrmm train: DRMM {layers_label(layers)} by {args.algorithm.upper()} on "
          f"{args.dataset}: {y_fit.size} training images ({labels}), up to {args.epochs} "
          f"epoch(s), top {args.top}, backend {backend}", file=out, flush=True)


def _announce_checkpoint(resume, checkpoint, before, out):
    """Whether the run resumes, starts afresh, or will replace an earlier checkpoint."""
    if resume and before is None:
        print(f"no checkpoint at {checkpoint} yet: starting from scratch", file=out, flush=True)
    elif resume:
        print(f"resuming from {checkpoint} (epoch {_checkpoint_epoch(checkpoint)})", file=out,
              flush=True)
    elif before is not None:
        print(f"note: {checkpoint} exists; this run starts afresh and replaces it after its "
              "first epoch (--resume continues from it instead)", file=out, flush=True)


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

