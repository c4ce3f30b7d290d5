"""The command line: the demo, and train/evaluate/reconstruct/sample end to end on tiny data
(8x8 digits; a 300-image MNIST subset where ../shared/data/mnist exists), checkpoints and
Ctrl-C, and errors as one clear line with a non-zero exit status."""

import importlib.util
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from campaign import MNIST_DIR, requires_mnist

import fastdrmm
from fastdrmm import _cli_data, cli
from fastdrmm import _training


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_demo_runs_and_reports(tmp_path, monkeypatch):
    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib

        def switch_backend(*args, **kwargs):
            raise AssertionError("the demo's picture switched matplotlib's global backend")
        monkeypatch.setattr(matplotlib, "use", switch_backend)
    out = io.StringIO()
    picture = tmp_path / "templates.png"
    args = cli.build_parser().parse_args(
        ["demo", "--max-iter", "5", "--n-nuisances", "3", "--plot", str(picture)])
    accuracy = cli.run_demo(args, out=out)
    text = out.getvalue()
    assert "log-likelihood" in text and "held-out accuracy" in text
    lines = [line for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert 1 <= len(lines) <= 5  # one line per EM iteration
    assert 0.85 < accuracy <= 1.0
    pytest.importorskip("matplotlib")
    assert picture.exists() and picture.stat().st_size > 1000


def test_kernel_compilation_is_announced_once_and_timed(monkeypatch):
    import numba

    from fastdrmm._compiling import CompileClock

    monkeypatch.setattr(CompileClock, "announced", False)
    lines = []
    with CompileClock(lines.append) as compiling:
        assert numba.njit(lambda a: a + 1)(1) == 2
        assert numba.njit(lambda a: a * 3)(2) == 6
    assert lines == ["compiling the kernels (once per machine: Numba caches them on disk; "
                     "a few minutes)..."]
    assert compiling.seconds > 0
    with CompileClock(lines.append) as again:   # once per process
        assert numba.njit(lambda a: a - 1)(1) == 0
    assert len(lines) == 1 and again.seconds > 0
    with CompileClock(lines.append) as idle:
        pass
    assert idle.seconds == 0


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_demo_semi_supervised(tmp_path):
    out = io.StringIO()
    args = cli.build_parser().parse_args(
        ["demo", "--max-iter", "5", "--n-nuisances", "2", "--labels-per-class", "5", "--plot", ""])
    accuracy = cli.run_demo(args, out=out)
    assert "semi-supervised, 5 labels per class" in out.getvalue()
    assert 0.5 < accuracy <= 1.0


def test_errors_are_one_line_and_nonzero():
    proc = subprocess.run([sys.executable, "-m", "fastdrmm", "demo", "--test-size", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "--test-size" in proc.stderr and "Traceback" not in proc.stderr


def test_version_and_help():
    proc = subprocess.run([sys.executable, "-m", "fastdrmm", "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stdout.strip()
    assert cli.main([]) == 2


# --------------------------------------------------------------------------------------------
# train / evaluate / reconstruct / sample (DRMM)

SHARED_MNIST = MNIST_DIR

#: a tiny DRMM on 300 digits, 10 labels per class: well under a second an epoch on 2 cores
TINY = ["train", "--dataset", "digits", "--layers", "4:3:1:2,8:3:1:2", "--train-size", "300",
        "--labels-per-class", "10", "--epochs", "2", "--batch-size", "50",
        "--learning-rate", "0.01", "--test-limit", "100", "--seed", "3", "--quiet"]


def run_cli(capsys, *argv):
    """main(argv) in this process -> (exit status, stdout, stderr)."""
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, err, *fragments, code=1):
    assert status == code, err
    assert err.startswith("fastdrmm: error: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The TINY model trained through the CLI: (model path, its stdout)."""
    directory = tmp_path_factory.mktemp("cli")
    model_path = directory / "tiny.npz"
    out = io.StringIO()
    args = cli.build_parser().parse_args(TINY + ["--out", str(model_path)])
    result = cli.run_train(args, out=out)
    return model_path, out.getvalue(), result


def test_train_writes_model_and_checkpoint_and_reports(trained):
    model_path, text, result = trained
    assert model_path.is_file() and Path(str(model_path) + ".ckpt").is_file()
    assert f"model written to {model_path} (checkpoint: {model_path}.ckpt)" in text
    assert "test accuracy: " in text and "on 100 digits test images" in text
    model = fastdrmm.load(model_path)
    assert isinstance(model, fastdrmm.DRMM) and model.n_iter_ == 2
    assert model.input_shape_ == (1, 8, 8) and [la.n_templates for la in model.layers_] == [4, 8]
    assert model.get_params()["learning_rate"] == 0.01 and model.random_state == 3
    X, y = _cli_data.load_split("digits", "test")
    assert result["test_accuracy"] == pytest.approx(model.score(X[:100], y[:100]))


def test_train_passes_the_semi_supervised_terms_to_the_model(tmp_path, capsys):
    argv = list(TINY)
    argv[argv.index("--epochs") + 1] = "1"
    path = tmp_path / "semi.npz"
    status, _, err = run_cli(capsys, *argv, "--out", path, "--test-limit", "0", "--kl-weight",
                             "0.5", "--consistency-weight", "2", "--translation", "1",
                             "--teacher-decay", "0.9", "--confidence-threshold", "0.2")
    assert status == 0, err
    model = fastdrmm.load(path)
    assert (model.kl_weight, model.consistency_weight, model.translation,
            model.teacher_decay, model.confidence_threshold) == (0.5, 2.0, 1, 0.9, 0.2)
    assert model.history_[0]["consistency"] > 0 and model.history_[0]["kl"] >= 0


def test_train_progress_lines_unless_quiet(tmp_path, capsys):
    argv = [a for a in TINY if a != "--quiet"]
    argv[argv.index("--epochs") + 1] = "1"
    status, out, err = run_cli(capsys, *argv, "--out", tmp_path / "m.npz", "--test-limit", "0")
    assert status == 0, err
    assert "DRMM 4:3,8:3 (custom) by EG on digits: 300 training images (100 labeled, 200 " \
           "unlabeled)" in out
    assert "epoch 1/1" in out and "val acc" in out and "test accuracy" not in out


def test_evaluate_overall_and_per_class(trained, capsys):
    model_path = trained[0]
    status, out, err = run_cli(capsys, "evaluate", model_path, "--limit", 120)
    assert status == 0, err
    X, y = _cli_data.load_split("digits", "test")
    model = fastdrmm.load(model_path)
    predicted = model.predict(X[:120])
    assert f"test accuracy: {np.mean(predicted == y[:120]):.4f} (" in out
    assert "/120 digits test images" in out  # the data set is told by the image shape
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and
            line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(10))
    for c, count, accuracy in rows:
        members = y[:120] == int(c)
        assert int(count) == members.sum()
        assert float(accuracy) == pytest.approx(np.mean(predicted[members] == int(c)), abs=1e-4)


def is_png(path):
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reconstruct_and_sample_write_png_and_npy(trained, tmp_path, capsys):
    model = fastdrmm.load(trained[0])
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    png = ["--out", tmp_path / "r.png"] if has_matplotlib else []
    status, out, err = run_cli(capsys, "reconstruct", trained[0], "-n", 13,
                               "--npy", tmp_path / "r.npy", *png)
    assert status == 0, err
    pair = np.load(tmp_path / "r.npy")
    X, _ = _cli_data.load_split("digits", "test")
    assert pair.shape == (2, 13, 1, 8, 8)
    np.testing.assert_array_equal(pair[0], X[:13])
    np.testing.assert_array_equal(pair[1], model.reconstruct(X[:13]))
    assert f"written to {tmp_path / 'r.npy'}" in out

    png = ["--out", tmp_path / "s.png"] if has_matplotlib else []
    status, out, err = run_cli(capsys, "sample", trained[0], "--per-class", 3, "--classes",
                               "2,7", "--seed", 5, "--npy", tmp_path / "s.npy", *png)
    assert status == 0, err
    images = np.load(tmp_path / "s.npy")
    assert images.shape == (2, 3, 1, 8, 8)
    np.testing.assert_array_equal(images.reshape(6, 1, 8, 8),
                                  model.sample(np.array([2, 2, 2, 7, 7, 7]), random_state=5))
    if has_matplotlib:
        assert is_png(tmp_path / "r.png") and is_png(tmp_path / "s.png")
        status, _, err = run_cli(capsys, "sample", trained[0], "--out", tmp_path / "all.png")
        assert status == 0 and is_png(tmp_path / "all.png"), err


def test_png_without_matplotlib_is_one_line_naming_the_extra(trained, tmp_path, capsys,
                                                              monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    for command in ("reconstruct", "sample"):
        status, _, err = run_cli(capsys, command, trained[0], "--out", tmp_path / "x.png",
                                 "--npy", tmp_path / "x.npy")
        assert_one_line_error(status, err, "matplotlib", "fastdrmm[plot]")
    assert not list(tmp_path.iterdir())  # nothing written, not even the .npy
    status, _, err = run_cli(capsys, "sample", trained[0], "--npy", tmp_path / "x.npy")
    assert status == 0 and (tmp_path / "x.npy").is_file(), err


def test_ctrl_c_keeps_the_checkpoint_and_resume_ends_as_an_uninterrupted_run(
        trained, tmp_path, capsys, monkeypatch):
    model_path = tmp_path / "m.npz"
    ckpt = tmp_path / "m.npz.ckpt"
    original = _training.EG.epoch
    calls = []

    def interrupt_at(n):
        def epoch(self, run, constant_rate=False):
            calls.append(run.epoch)
            if len(calls) == n:
                raise KeyboardInterrupt
            return original(self, run, constant_rate)
        return epoch

    monkeypatch.setattr(_training.EG, "epoch", interrupt_at(1))
    status, _, err = run_cli(capsys, *TINY, "--out", model_path)
    assert status == 130 and "no checkpoint was written" in err and not ckpt.exists()

    calls.clear()
    monkeypatch.setattr(_training.EG, "epoch", interrupt_at(2))
    status, _, err = run_cli(capsys, *TINY, "--out", model_path)
    assert status == 130 and err.strip().count("\n") == 0 and "Traceback" not in err
    assert f"the last checkpoint, {ckpt} (epoch 1), is intact" in err and "--resume" in err
    assert not model_path.exists() and fastdrmm.load(ckpt).n_iter_ == 1

    monkeypatch.setattr(_training.EG, "epoch", original)
    status, out, err = run_cli(capsys, *TINY, "--out", model_path, "--resume")
    assert status == 0, err
    assert f"resuming from {ckpt} (epoch 1)" in out
    resumed, whole = fastdrmm.load(model_path), fastdrmm.load(trained[0])
    assert resumed.n_iter_ == 2
    for name, value in whole.parameters_.items():
        np.testing.assert_array_equal(resumed.parameters_[name], value, err_msg=name)
    # other settings than the checkpoint's: refused, one line
    status, _, err = run_cli(capsys, *TINY, "--out", model_path, "--resume", "--batch-size", 7)
    assert_one_line_error(status, err, "refusing to resume", "batch_size")


def test_a_real_sigint_exits_130_with_the_checkpoint_intact(tmp_path):
    argv = list(TINY)
    # far more epochs than can finish before the signal (an epoch of TINY takes milliseconds
    # once the kernels are compiled, so 500 could all be done by the time SIGINT arrives)
    argv[argv.index("--epochs") + 1] = "1000000"
    ckpt = tmp_path / "m.npz.ckpt"
    # a job started in the background by a non-interactive shell (as CI may run the suite)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler: give the
    # child the default disposition, as a terminal would
    proc = subprocess.Popen([sys.executable, "-m", "fastdrmm", *argv, "--out",
                             str(tmp_path / "m.npz")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def after_the_first_checkpoint():
        # generous: the first epoch includes compiling the kernels on a busy machine
        deadline = time.monotonic() + 600
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # (not proc.communicate() in the message: a run still going would block it)
        assert ckpt.exists(), f"no checkpoint after {time.monotonic() - deadline + 600:.0f} s"

    err = interrupt_when(proc, after_the_first_checkpoint)
    assert proc.returncode == 130, err
    assert f"the last checkpoint, {ckpt} (epoch" in err and "Traceback" not in err
    assert fastdrmm.load(ckpt).n_iter_ >= 1  # complete and checked
    # the checkpoint and the record of its training data; no temp files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz.ckpt", "m.npz.ckpt.data.json"]


@requires_mnist
def test_train_and_evaluate_on_a_tiny_mnist_subset(tmp_path, capsys):
    model_path = tmp_path / "mnist.npz"
    status, out, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-dir", SHARED_MNIST,
                               "--preset", "two-layer", "--train-size", 300, "--epochs", 1,
                               "--labels", 55, "--batch-size", 64, "--test-limit", 200,
                               "--out", model_path, "--quiet")
    assert status == 0, err
    assert "on 200 mnist test images" in out
    status, out, err = run_cli(capsys, "evaluate", model_path, "--data-dir", SHARED_MNIST,
                               "--limit", 50)
    assert status == 0, err
    assert "/50 mnist test images" in out and "DRMM (two-layer, EG, 1 epoch(s))" in out


# --------------------------------------------------------------------------------------------
# labels, subsets, layer specs


def test_label_selection_is_balanced_and_seeded():
    y = np.repeat(np.arange(10), 30)
    kept = _cli_data.select_labels(y, 10, seed=1, per_class=4)
    assert np.array_equal(np.bincount(kept[kept >= 0], minlength=10), [4] * 10)
    assert np.all(kept[kept >= 0] == y[kept >= 0]) and np.sum(kept < 0) == 260
    assert np.array_equal(kept, _cli_data.select_labels(y, 10, seed=1, per_class=4))
    assert not np.array_equal(kept, _cli_data.select_labels(y, 10, seed=2, per_class=4))
    total = _cli_data.select_labels(y, 10, seed=1, total=25)
    counts = np.bincount(total[total >= 0], minlength=10)
    assert counts.sum() == 25 and set(counts) == {2, 3}
    assert np.array_equal(_cli_data.select_labels(y, 10, seed=1), y)
    with pytest.raises(_cli_data.CLIError, match="--labels-per-class 31 asks for 31 labels"):
        _cli_data.select_labels(y, 10, seed=1, per_class=31)
    with pytest.raises(_cli_data.CLIError, match="--labels 301 exceeds"):
        _cli_data.select_labels(y, 10, seed=1, total=301)
    X = np.arange(300.0)
    Xs, ys = _cli_data.take_subset(X, y, 50, seed=4)
    assert Xs.shape == (50,) and np.all(np.diff(Xs) > 0) and np.array_equal(ys, y[Xs.astype(int)])


def test_layer_specs():
    from fastdrmm import Layer

    assert _cli_data.parse_layers("8:3:1:2, 16:3") == (Layer(8, 3, padding=1, pool=2),
                                                        Layer(16, 3))
    assert _cli_data.parse_layers("4:5:2:2:0.1") == (Layer(4, 5, padding=2, pool=2, leak=0.1),)
    assert _cli_data.parse_layers('[{"n_templates": 4, "kernel_size": [3, 2], "pool": 2}]') == (
        Layer(4, (3, 2), pool=2),)
    for bad in ("8", "8:x", "0:3", "[{", '[{"templates": 3}]', "8:3:1:2:3:4"):
        with pytest.raises(_cli_data.CLIError, match="--layers"):
            _cli_data.parse_layers(bad)


# --------------------------------------------------------------------------------------------
# errors: one line, non-zero


@pytest.mark.parametrize("argv, code, fragments", [
    (["evaluate", "{tmp}/nothing.npz"], 1, ["model file not found: {tmp}/nothing.npz"]),
    (["sample", "{tmp}", "--npy", "{tmp}/s.npy"], 1, ["is a directory"]),
    (["train", "--labels-per-class", "0"], 2, ["--labels-per-class", "must be >= 1, got 0"]),
    (["train", "--labels-per-class", "many"], 2, ["--labels-per-class", "expected an integer"]),
    (["train", "--labels", "5", "--labels-per-class", "5"], 2, ["not allowed with"]),
    (["train", "--dataset", "digits", "--labels-per-class", "500", "--test-limit", "0"], 1,
     ["--labels-per-class 500 asks for 500 labels of class 0"]),
    (["train", "--dataset", "mnist", "--data-dir", "{tmp}/empty"], 1,
     ["not found in {tmp}/empty", "--data-dir"]),
    (["train", "--dataset", "digits", "--layers", "4:3,8:9"], 1,
     ["--layers: layers[1] does not fit"]),
    (["train", "--dataset", "digits", "--layers", "4:x"], 1, ["--layers: layer 0"]),
    (["train", "--dataset", "digits", "--out", "{tmp}/no/such/dir/m.npz"], 1,
     ["--out", "does not exist"]),
    (["train", "--validation-fraction", "0.9"], 2, ["must be in [0, 0.5], got 0.9"]),
    (["train", "--learning-rate", "-1"], 2, ["--learning-rate", "must be a finite number > 0"]),
    (["train", "--preset", "huge"], 2, ["invalid choice"]),
    (["train", "--teacher-decay", "1"], 2, ["--teacher-decay", "must be in [0, 1)"]),
    (["train", "--translation", "-2"], 2, ["--translation", "must be >= 0"]),
    (["reconstruct", "{model}"], 1, ["nothing to write"]),
    (["sample", "{model}", "--classes", "3,12", "--npy", "{tmp}/s.npy"], 1,
     ["--classes: 12 is not a class"]),
    (["evaluate", "{model}", "--dataset", "mnist"], 1, ["images of shape (1, 8, 8)"]),
    (["evaluate"], 2, ["MODEL"]),
])
def test_errors_are_one_line(argv, code, fragments, trained, tmp_path, capsys):
    fill = {"tmp": str(tmp_path), "model": str(trained[0])}
    status, _, err = run_cli(capsys, *[a.format(**fill) for a in argv])
    assert_one_line_error(status, err, *[f.format(**fill) for f in fragments], code=code)
    assert not (tmp_path / "s.npy").exists()


def test_corrupted_or_wrong_model_files(trained, tmp_path, capsys):
    data = trained[0].read_bytes()
    half = len(data) // 2  # inside the arrays' data: caught by the sha256 check
    cases = {"truncated.npz": data[:len(data) // 2],
             "flipped.npz": data[:half] + bytes([data[half] ^ 0xFF]) + data[half + 1:],
             "text.npz": b"not a model at all"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for command in (["evaluate"], ["sample", "--npy", tmp_path / "s.npy"]):
            status, _, err = run_cli(capsys, command[0], path, *command[1:])
            assert_one_line_error(status, err, str(path))
    assert not (tmp_path / "s.npy").exists()


def test_module_help_and_a_real_process_error(tmp_path):
    for argv in (["--help"], ["train", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "fastdrmm", *argv], capture_output=True,
                              text=True)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: fastdrmm"), proc.stderr
    assert all(c in proc.stdout for c in ("--labels-per-class", "--resume", "--checkpoint"))
    proc = subprocess.run([sys.executable, "-m", "fastdrmm", "evaluate",
                           str(tmp_path / "none.npz")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"fastdrmm: error: model file not found: {tmp_path / 'none.npz'}\n"


# --------------------------------------------------------------------------------------------
# start-up: light imports, Ctrl-C at any moment


def test_importing_the_command_line_loads_no_heavy_module():
    code = ("import sys, fastdrmm.cli; "
            "print(sorted(m for m in ('numpy', 'numba', 'sklearn', 'scipy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_the_package_names_still_resolve_lazily():
    code = ("import fastdrmm; names = list(fastdrmm.__all__); "
            "assert set(names) <= set(dir(fastdrmm)), names; "
            "from fastdrmm import DRMM, RMM, Layer, PRESETS, load, ops, io, datasets; "
            "import fastdrmm.drmm; "
            "assert all(getattr(fastdrmm, n) is not None for n in names); "
            "assert fastdrmm.DRMM is fastdrmm.drmm.DRMM and fastdrmm.ops.__name__ == "
            "'fastdrmm.ops'; "
            "exec('try:\\n fastdrmm.no_such_name\\nexcept AttributeError: print(\"ok\")')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def wait_for_heavy_imports(proc, timeout=30):
    """Wait until the child has begun importing NumPy (its extension is mapped), i.e. the
    interpreter's own start-up is over and the command line's imports are under way; False
    where /proc cannot tell."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "numpy" in maps.read_text():
                return True
        except OSError:
            return False
        time.sleep(0.01)
    return False


def interrupt_when(proc, ready):
    """Wait with ``ready()``, send ``proc`` SIGINT and return its stderr; the process never
    outlives the call (killed if it did not end)."""
    try:
        ready()
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def launchers():
    """``python -m fastdrmm``, and the console script where it is installed beside Python."""
    found = [[sys.executable, "-m", "fastdrmm"]]
    script = Path(sys.executable).parent / "fastdrmm"
    if script.is_file():
        found.append([sys.executable, str(script)])
    return found


@pytest.mark.parametrize("launcher", launchers(), ids=lambda argv: argv[-1])
def test_ctrl_c_during_start_up_exits_130_with_one_line(launcher, tmp_path):
    # SIGINT as NumPy starts loading, then during the imports (seconds of them) and the first
    # work; before the command line's first line runs, Python itself would answer
    for extra in (0.0, 0.3, 0.8):
        proc = subprocess.Popen([*launcher, "demo", "--plot", ""],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

        def during_start_up():
            if not wait_for_heavy_imports(proc):
                time.sleep(1.0)  # no /proc: a moment well after the interpreter's start-up
            time.sleep(extra)

        err = interrupt_when(proc, during_start_up)
        assert proc.returncode == 130, (extra, err)
        assert "Traceback" not in err and len(err.splitlines()) <= 2, (extra, err)
        assert "interrupted" in err, (extra, err)


# --------------------------------------------------------------------------------------------
# resume with other data, output paths, bounds, backends


def one_epoch_tiny(path, *extra):
    argv = list(TINY)
    argv[argv.index("--epochs") + 1] = "1"
    return [*argv, "--out", path, "--test-limit", "0", *extra]


def test_resume_refuses_other_training_data(tmp_path, capsys):
    model_path, ckpt = tmp_path / "m.npz", tmp_path / "m.npz.ckpt"
    status, _, err = run_cli(capsys, *one_epoch_tiny(model_path))
    assert status == 0, err
    before = ckpt.read_bytes()
    model_path.unlink()
    for change in (["--train-size", "250"], ["--labels-per-class", "5"],
                   ["--seed", "4"], ["--dataset", "digits", "--labels", "37"]):
        argv = one_epoch_tiny(model_path, "--resume", "--epochs", "2")
        for option in change[::2]:  # drop the original value of a changed option
            if option in argv:
                i = argv.index(option)
                del argv[i:i + 2]
        if "--labels" in change:
            i = argv.index("--labels-per-class")
            del argv[i:i + 2]
        status, out, err = run_cli(capsys, *argv, *change)
        assert_one_line_error(status, err, "--resume", str(ckpt), "other training data",
                              change[-2])
        assert "epoch" not in out.lower() or "resuming" not in out
    assert ckpt.read_bytes() == before and not model_path.exists()
    # the same data resumes
    status, out, err = run_cli(capsys, *one_epoch_tiny(model_path, "--resume", "--epochs", "2"))
    assert status == 0 and f"resuming from {ckpt} (epoch 1)" in out, err
    assert fastdrmm.load(model_path).n_iter_ == 2


def test_a_fresh_run_stopped_before_its_first_checkpoint_keeps_the_data_record(
        tmp_path, capsys, monkeypatch):
    model_path = tmp_path / "m.npz"
    status, _, err = run_cli(capsys, *one_epoch_tiny(model_path))
    assert status == 0, err

    def stop(self):
        raise KeyboardInterrupt

    # a run on other data, stopped after its first epoch but before that epoch's checkpoint
    monkeypatch.setattr(_training.Training, "save_checkpoint", stop)
    status, _, err = run_cli(capsys, *one_epoch_tiny(model_path, "--seed", "8"))
    assert status == 130, err
    monkeypatch.undo()
    # the checkpoint is still the first run's: resuming it with the other data is refused
    status, _, err = run_cli(capsys, *one_epoch_tiny(model_path, "--seed", "8", "--resume",
                                                      "--epochs", "2"))
    assert_one_line_error(status, err, "other training data", "--seed 8 now")


def test_output_paths_that_name_one_file_are_refused(trained, tmp_path, capsys):
    png = tmp_path / "p.png"
    link = tmp_path / "link.png"
    link.symlink_to(png)
    cases = [("reconstruct", png, png), ("reconstruct", png, f"{tmp_path}/./p.png"),
             ("sample", link, png), ("sample", png, png)]
    for command, out_path, npy_path in cases:
        status, _, err = run_cli(capsys, command, trained[0], "--out", out_path, "--npy",
                                 npy_path)
        assert_one_line_error(status, err, "--out and --npy name the same file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png"]
    model_bytes = trained[0].read_bytes()
    status, _, err = run_cli(capsys, "sample", trained[0], "--npy", trained[0])
    assert_one_line_error(status, err, "MODEL and --npy name the same file")
    assert trained[0].read_bytes() == model_bytes  # the input model is never written over
    status, _, err = run_cli(capsys, *one_epoch_tiny(tmp_path / "m.npz", "--checkpoint", link,
                                                     "--out", png))
    assert_one_line_error(status, err, "--out and --checkpoint name the same file")


@pytest.mark.parametrize("argv, code, fragments", [
    (["sample", "{model}", "--per-class", "100000000", "--npy", "{tmp}/s.npy"], 2,
     ["--per-class", "must be <= 1000"]),
    (["reconstruct", "{model}", "-n", "99999999999", "--npy", "{tmp}/s.npy"], 2,
     ["--n-images", "must be <= 1000"]),
    (["sample", "{model}", "--classes", ",".join(["1"] * 101), "--npy", "{tmp}/s.npy"], 2,
     ["at most 100 class indices"]),
    (["train", "--dataset", "digits", "--layers", "99999999999:3"], 1,
     ["--layers: layer 0: n_templates 99999999999 exceeds", "maximum of 1024"]),
    (["train", "--dataset", "digits", "--layers", "8:3:99999999999"], 1,
     ["padding 99999999999 exceeds"]),
    (["train", "--dataset", "digits", "--layers", "[" * 100_000], 1,
     ["--layers: 100000 characters"]),
    (["train", "--dataset", "digits", "--layers", "[" * 9_000], 1,
     ["--layers: not valid JSON"]),
    (["train", "--dataset", "digits", "--layers", '[{{"n_templates": 4, "kernel_size": 1e999}}]'],
     1, ["--layers"]),
    (["train", "--dataset", "digits", "--layers", "1024:32:32,1024:32:16"], 1,
     ["the templates have", "entries", "16,000,000"]),
    (["train", "--batch-size", "99999999999"], 2, ["--batch-size", "must be <= 4096"]),
    (["train", "--seed", str(2**64)], 2, ["--seed", "must be <="]),
    (["demo", "--n-nuisances", "99999999999"], 2, ["--n-nuisances", "must be <= 256"]),
    (["train", "--dataset", "digits", "--out", ""], 1, ["--out: empty path"]),
    (["train", "--dataset", "digits", "--out", "{tmp}/"], 1, ["is a directory"]),
    (["sample", "{model}", "--npy", ""], 1, ["--npy: empty path"]),
    (["demo", "--plot", "{tmp}/missing/t.png"], 1, ["--plot", "does not exist"]),
    (["train", "--dataset", "mnist", "--data-dir", "{tmp}/none", "--backend", "cupy"], 1,
     ["--backend cupy", "runs on a GPU", "use --backend cpu"]),
])
def test_sizes_paths_and_backends_fail_first_in_one_line(argv, code, fragments, trained,
                                                         tmp_path, capsys):
    fill = {"tmp": str(tmp_path), "model": str(trained[0])}
    status, out, err = run_cli(capsys, *[a.format(**fill) for a in argv])
    assert_one_line_error(status, err, *[f.format(**fill) for f in fragments], code=code)
    assert out == ""  # refused before any work (nothing loaded, fitted or written)
    assert not list(tmp_path.iterdir())


def test_help_states_the_maximums(capsys):
    for command, fragment in (("sample", "at most 1000"), ("train", "at most 16 layers"),
                              ("train", "at most 4096")):
        assert cli.main([command, "--help"]) == 0
        assert fragment in " ".join(capsys.readouterr().out.split())


def test_a_gpu_backend_from_the_environment_is_refused_before_any_work(capsys, monkeypatch):
    monkeypatch.setenv("FASTDRMM_BACKEND", "cupy")
    status, out, err = run_cli(capsys, "demo", "--plot", "")
    assert_one_line_error(status, err, "$FASTDRMM_BACKEND=cupy", "runs on a GPU",
                          "unset FASTDRMM_BACKEND")
    assert out == ""


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_the_demo_names_the_backend_it_computes_on(capsys, monkeypatch):
    monkeypatch.setenv("FASTDRMM_BACKEND", "numpy")
    status, out, err = run_cli(capsys, "demo", "--plot", "", "--max-iter", "1",
                               "--n-nuisances", "1", "--drmm-epochs", "0")
    assert status == 0, err
    assert "backend numpy" in out and "backend auto" not in out


def test_train_defaults_are_the_short_run_settings():
    args = cli.build_parser().parse_args(["train"])
    assert (args.top, args.learning_rate, args.batch_size) == ("full", 5e-3, 128)
    assert cli.build_parser().parse_args(["train", "--top", "average"]).top == "average"
