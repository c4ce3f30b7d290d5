"""Wall time to a test accuracy on MNIST: fastdrmm's DRMM (EG, and EM) vs the same model in
PyTorch.

Usage::

    python benchmarks/time_to_accuracy.py                              # conv-small, to 99 %
    python benchmarks/time_to_accuracy.py --target 0.99 --max-epochs 20 --out results/tta
    python benchmarks/time_to_accuracy.py --preset two-layer --train-size 2000 --max-epochs 2
    python benchmarks/time_to_accuracy.py --contenders torch --learning-rate 3e-3
    python benchmarks/time_to_accuracy.py --contenders fastdrmm,torch,em --em-top full

The contenders train the same layers on the same data, supervised (every training label):

* ``fastdrmm``: ``DRMM(preset, algorithm="eg", lr_schedule="constant",
  validation_fraction=0, ...)``, one ``partial_fit(X, y)`` per epoch (an EG epoch with Adam at
  the constant rate, the optimizer state kept between calls);
* ``torch``: the architecture and EG loss of ``compare.py --drmm-step`` (conv2d, leaky_relu,
  max_pool2d up; max_unpool2d, conv_transpose2d down; cross-entropy, reconstruction and
  non-negativity terms with fastdrmm's weights) in autograd, ``torch.optim.Adam`` with the same
  rate, betas and eps;
* ``em`` (on request, ``--contenders fastdrmm,torch,em``): ``DRMM(preset, algorithm="em",
  top=--em-top, max_iter=--em-max-iter, validation_fraction=0, random_state=--seed, **EM
  settings)``, one ``fit`` whose ``callback=`` measures the test accuracy after every EM
  iteration (a full pass: E-step over every training image, closed-form M-step) and ends
  the fit (by lowering ``max_iter``) at the target or the time limit. Its "epochs" are EM
  iterations; its training time is the wall time since ``fit`` was called minus the
  measurements, so it includes the kernels' warm-up before the first iteration. The EM
  settings (``--em-amplitude-steps``, ``--em-targets``, ``--em-shrinkage``, ``--em-ridge``,
  ``--em-bias``, ``--em-init``, ``--em-tol``, ``--em-param NAME=VALUE``) are passed only
  where given (DRMM's defaults otherwise).
  ``--em-top`` defaults to "full" (EM's class model on the whole top code; "average" is the
  paper's Conv-Small top, the EG contenders' default); the layers are the same.

The EG contenders start from the very same parameters (``DRMM._init_params`` with
``--seed``), and the PyTorch run visits the training images in fastdrmm's order (the
permutation of epoch e is ``numpy.random.default_rng([seed, 2, e])``, batches of
``--batch-size``, sorted within a batch), so the two differ only by floating-point rounding
and by speed. After every epoch the test accuracy is measured (not timed); a contender stops
at the first epoch that reaches ``--target``, after ``--max-epochs`` (EM: ``--em-max-iter``),
or once its training time passes ``--time-limit``. The reported time to accuracy is the
training time (evaluation excluded) summed up to that epoch. All use every core
(``--threads``).

Outputs: a markdown summary and per-epoch table on stdout; ``--out PATH`` writes PATH.json and
PATH.md (or the one a .json/.md suffix names).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare  # noqa: E402  (benchmarks/compare.py: the PyTorch model of the DRMM)
import em_mnist  # noqa: E402  (benchmarks/em_mnist.py: the EM options and measurements)

CONTENDERS = ("fastdrmm", "torch", "em")
#: the contenders run by default (EM on request: --contenders fastdrmm,torch,em)
DEFAULT_CONTENDERS = ("fastdrmm", "torch")
EVAL_BATCH = 1000


def epoch_batches(n, batch_size, seed, epoch):
    """fastdrmm's supervised EG order: the permutation of epoch ``epoch``, cut in batches,
    each sorted (``fastdrmm._training.EG._steps`` with every sample labeled)."""
    order = np.random.default_rng([seed, 2, epoch]).permutation(n)
    return [np.sort(order[i:i + batch_size]) for i in range(0, n, batch_size)]


def model_kwargs(args):
    return dict(layers=args.preset, algorithm="eg", batch_size=args.batch_size,
                learning_rate=args.learning_rate, lr_schedule="constant",
                xent_weight=args.xent_weight, reconstruction_weight=args.reconstruction_weight,
                entropy_weight=args.entropy_weight,
                nonnegativity_weight=args.nonnegativity_weight, validation_fraction=0.0,
                top=args.top, random_state=args.seed, verbose=int(args.verbose))


def train_fastdrmm(args, X, y, X_test, y_test, log):
    from fastdrmm import DRMM

    model = DRMM(**model_kwargs(args))
    return _loop(args, lambda: model.partial_fit(X, y),
                 lambda: float(model.score(X_test, y_test)), "fastdrmm", log)


def train_torch(args, X, y, X_test, y_test, log):
    import torch

    from fastdrmm._network import LossWeights

    net, params = compare.drmm_setup(args.preset, X, y, args.seed, "float32", args.top)
    scale = float(params["class_scale"])
    tp = compare.torch_params(torch, net, params)
    optimizer = torch.optim.Adam(list(tp.values()), lr=args.learning_rate, betas=(0.9, 0.999),
                                 eps=1e-8)
    weights = LossWeights(xent=args.xent_weight, reconstruction=args.reconstruction_weight,
                          entropy=args.entropy_weight, nonnegativity=args.nonnegativity_weight)
    X_t = torch.from_numpy(X)
    epoch = [0]

    def train_epoch():
        for rows in epoch_batches(X.shape[0], args.batch_size, args.seed, epoch[0]):
            index = torch.from_numpy(rows)
            compare.torch_step(torch, net, tp, scale, X_t.index_select(0, index), y[rows],
                               weights)
            optimizer.step()
        epoch[0] += 1

    def accuracy():
        correct = 0
        with torch.no_grad():
            for start in range(0, X_test.shape[0], EVAL_BATCH):
                xb = torch.from_numpy(X_test[start:start + EVAL_BATCH])
                scores = compare.torch_bottom_up(torch, net, tp, scale, xb)[3]
                correct += int((scores.argmax(1).numpy() == y_test[start:start + EVAL_BATCH])
                               .sum())
        return correct / X_test.shape[0]

    return _loop(args, train_epoch, accuracy, "torch", log)


def train_em(args, X, y, X_test, y_test, log):
    """The EM contender: one fit, measured and stopped by its callback after every
    iteration."""
    from fastdrmm import DRMM

    em = em_mnist.em_params(args, prefix="em-")
    model = DRMM(args.preset, 10, algorithm="em", top=args.em_top,
                 max_iter=args.em_max_iter or args.max_epochs, validation_fraction=0.0,
                 random_state=args.seed, verbose=int(args.verbose), **em)

    def stop(row):
        return row["accuracy"] >= args.target or (args.time_limit is not None
                                                  and row["train_s"] >= args.time_limit)

    tracker = em_mnist.IterationTracker(X_test, y_test, model=model, stop=stop,
                                        log=lambda m: log(f"time_to_accuracy.py: {m}"))
    tracker.start()
    caught = em_mnist.fit_quietly(model, X, y, tracker)
    rows = tracker.attach_objective(model)
    epochs = [dict(epoch=r["iteration"], train_s=r["train_s"], accuracy=r["accuracy"],
                   eval_s=r["eval_s"], objective=r.get("objective"),
                   objective_after_m_step=r.get("objective_after_m_step")) for r in rows]
    reached = next((e["epoch"] for e in epochs if e["accuracy"] >= args.target), None)
    elapsed = epochs[-1]["train_s"]
    return dict(contender="em", epochs=epochs, reached_epoch=reached,
                time_to_target_s=None if reached is None else epochs[reached - 1]["train_s"],
                final_accuracy=epochs[-1]["accuracy"],
                best_accuracy=max(e["accuracy"] for e in epochs), train_s=elapsed,
                s_per_epoch=elapsed / len(epochs), top=args.em_top, em_settings=em,
                objective_rises=em_mnist.objective_rises(model.objective_history_),
                warnings=caught)


def _loop(args, train_epoch, accuracy, name, log):
    """Train epoch by epoch until the target, --max-epochs or --time-limit."""
    epochs, elapsed, reached = [], 0.0, None
    for e in range(1, args.max_epochs + 1):
        tic = time.perf_counter()
        train_epoch()
        elapsed += time.perf_counter() - tic
        tic = time.perf_counter()
        acc = accuracy()
        epochs.append(dict(epoch=e, train_s=elapsed, accuracy=acc,
                           eval_s=time.perf_counter() - tic))
        log(f"time_to_accuracy.py: {name} epoch {e}: test accuracy {acc:.4f}, "
            f"{elapsed:.1f} s of training")
        if acc >= args.target:
            reached = e
            break
        if args.time_limit is not None and elapsed >= args.time_limit:
            break
    return dict(contender=name, epochs=epochs, reached_epoch=reached,
                time_to_target_s=None if reached is None else epochs[-1]["train_s"],
                final_accuracy=epochs[-1]["accuracy"],
                best_accuracy=max(r["accuracy"] for r in epochs),
                train_s=elapsed, s_per_epoch=elapsed / len(epochs))


# --------------------------------------------------------------------------------- output


def _f(v, fmt="{:.1f}"):
    return "" if v is None else fmt.format(v)


def markdown(report):
    s = report["settings"]
    names = [r["contender"] for r in report["results"]]
    em = next((r for r in report["results"] if r["contender"] == "em"), None)
    kinds = " and ".join(k for k, on in (("EG", set(names) - {"em"}), ("EM", em)) if on)
    lines = [f"# Time to {100 * s['target']:g} % test accuracy on MNIST: {s['preset']} "
             f"(top {s['top']}), {kinds} supervised", "",
             f"train images {s['train_images']}, test images {s['test_images']}, batch "
             f"{s['batch_size']}, Adam rate {s['learning_rate']:g} (constant), weights xent "
             f"{s['xent_weight']:g} / reconstruction {s['reconstruction_weight']:g} / "
             f"non-negativity {s['nonnegativity_weight']:g}, seed {s['seed']}, at most "
             f"{s['max_epochs']} epochs; {report['machine']['threads']} threads, torch "
             f"{report['machine']['torch']}", ""]
    if em is not None:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(em["em_settings"].items()))
        lines[-1:-1] = ["", f"EM: top {em['top']}, at most {s['em_max_iter']} iterations, "
                        f"settings: {settings or 'DRMM defaults'}; its epochs are EM "
                        "iterations"]
    head = ["contender", "reached", "epochs", "time to target s", "s/epoch", "final acc %",
            "best acc %"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in report["results"]:
        lines.append("| " + " | ".join([
            r["contender"], "yes" if r["reached_epoch"] else "no", str(len(r["epochs"])),
            _f(r["time_to_target_s"]), _f(r["s_per_epoch"]),
            f"{100 * r['final_accuracy']:.2f}", f"{100 * r['best_accuracy']:.2f}"]) + " |")
    # every contender against PyTorch where it ran, else the first against the last
    results = report["results"]
    ref = next((r for r in results if r["contender"] == "torch"), results[-1])
    for a in (results if ref["contender"] == "torch" else results[:1]):
        if a is ref:
            continue
        b = ref
        if a["time_to_target_s"] and b["time_to_target_s"]:
            lines += ["", f"{a['contender']} / {b['contender']} time to target: "
                      f"{a['time_to_target_s'] / b['time_to_target_s']:.2f}x"]
        lines += ["", f"{a['contender']} / {b['contender']} time per epoch: "
                  f"{a['s_per_epoch'] / b['s_per_epoch']:.2f}x"]
    head = ["epoch"] + [f"{n} {col}" for n in names for col in ("acc %", "train s")]
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    longest = max(len(r["epochs"]) for r in report["results"])
    for e in range(longest):
        cells = [str(e + 1)]
        for r in report["results"]:
            rec = r["epochs"][e] if e < len(r["epochs"]) else None
            cells += ["", ""] if rec is None else [f"{100 * rec['accuracy']:.2f}",
                                                   f"{rec['train_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="conv-small")
    ap.add_argument("--top", choices=["average", "full"], default="average")
    ap.add_argument("--target", type=float, default=0.99, help="test accuracy (fraction)")
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="stop a contender after the epoch in which its training time "
                         "passes this")
    ap.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                    help="comma-separated subset of fastdrmm,torch,em (run in that order; "
                         "default fastdrmm,torch)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--xent-weight", type=float, default=1.0)
    ap.add_argument("--reconstruction-weight", type=float, default=0.1)
    ap.add_argument("--entropy-weight", type=float, default=0.1,
                    help="(supervised: no unlabeled sample, so no entropy term)")
    ap.add_argument("--nonnegativity-weight", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-size", type=int, default=None,
                    help="a seeded random subset of this many training images")
    ap.add_argument("--test-size", type=int, default=None,
                    help="the first this many test images (default all 10,000)")
    ap.add_argument("--threads", type=int, default=None, help="default: os.cpu_count()")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, metavar="PATH")
    ap.add_argument("--verbose", "-v", action="store_true")
    ap.add_argument("--em-top", choices=["average", "full"], default="full",
                    help="the EM contender's top (default full)")
    ap.add_argument("--em-max-iter", type=int, default=None,
                    help="the EM contender's iterations at most (default --max-epochs)")
    em_mnist.add_em_options(ap, prefix="em-")
    return ap


def main(argv=None, out=None):
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    names = [s.strip() for s in args.contenders.split(",") if s.strip()]
    if not names or any(n not in CONTENDERS for n in names):
        raise SystemExit(f"--contenders: choose from {', '.join(CONTENDERS)}")
    if not 0 < args.target <= 1:
        raise SystemExit("--target is a fraction in (0, 1]")
    if args.max_epochs < 1:
        raise SystemExit("--max-epochs must be >= 1")
    if args.em_max_iter is not None and args.em_max_iter < 1:
        raise SystemExit("--em-max-iter must be >= 1")

    import fastdrmm
    from fastdrmm.layers import PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"--preset: choose from {sorted(PRESETS)}")
    torch = compare.import_torch("torch" in names)
    if "torch" in names and torch is None:
        raise SystemExit("PyTorch is not installed (use --contenders fastdrmm)")
    threads = args.threads or os.cpu_count() or 1
    compare.set_threads(threads, torch)
    X, y, X_test, y_test = fastdrmm.load_mnist(args.data_dir or compare.default_mnist_dir(),
                                               return_X_y=True)
    if args.train_size is not None:
        rows = np.sort(np.random.default_rng([args.seed, 10]).permutation(X.shape[0])
                       [:args.train_size])
        X, y = np.ascontiguousarray(X[rows]), y[rows]
    if args.test_size is not None:
        X_test, y_test = X_test[:args.test_size], y_test[:args.test_size]

    def log(message):
        print(message, file=sys.stderr, flush=True)

    report = dict(
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), threads=threads,
                     python=platform.python_version(), numpy=np.__version__,
                     torch=None if torch is None else torch.__version__,
                     fastdrmm=fastdrmm.__version__),
        settings=dict(preset=args.preset, top=args.top, target=args.target,
                      max_epochs=args.max_epochs, time_limit_s=args.time_limit,
                      batch_size=args.batch_size, learning_rate=args.learning_rate,
                      xent_weight=args.xent_weight,
                      reconstruction_weight=args.reconstruction_weight,
                      entropy_weight=args.entropy_weight,
                      nonnegativity_weight=args.nonnegativity_weight, seed=args.seed,
                      em_top=args.em_top, em_max_iter=args.em_max_iter or args.max_epochs,
                      train_images=int(y.size), test_images=int(y_test.size)),
        results=[])
    trainers = {"fastdrmm": train_fastdrmm, "torch": train_torch, "em": train_em}
    for name in names:
        report["results"].append(trainers[name](args, X, y, X_test, y_test, log))
    text = markdown(report)
    out.write(text)
    if args.out:
        root, ext = os.path.splitext(args.out)
        targets = {".json": [args.out], ".md": [args.out]}.get(
            ext, [args.out + ".json", args.out + ".md"])
        for target in targets:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            with open(target, "w") as f:
                if target.endswith(".json"):
                    json.dump(report, f, indent=1)
                else:
                    f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
