"""The command line under generated argument lists (hypothesis), run in this process through
``cli.main(argv)``: every subcommand with valid and invalid numbers, huge values, empty
strings, odd paths (missing files and directories, FIFOs, directories, junk files, the input
model itself as an output). The property: the exit status is 0, 1 or 2, no exception escapes,
no traceback is printed and there is at most one error line (exactly one for status 1).

Runs stay tiny (the 8x8 digits, tens of training images, one epoch): valid values are drawn
small, invalid ones anywhere. A case that blocks (e.g. opening a FIFO) fails after
``CASE_SECONDS`` instead of hanging the suite.
"""

import contextlib
import io
import os
import signal

import pytest
from campaign import campaign
from hypothesis import given
from hypothesis import strategies as st

from fastdrmm import cli

CASE_SECONDS = 60

pytestmark = pytest.mark.filterwarnings("ignore")

HUGE = ["99999999999", "9" * 40, "1e400", str(2**64), "-" + "9" * 25]
# (not "1_0": a valid int, 10, which makes a valid but long run of the demo's DRMM)
JUNK = ["", " ", "x", "-1", "0", "nan", "inf", "-inf", "1.5", "0x10", "--", "\0", "é", "[",
        "{}"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Named paths of every kind, and a tiny trained DRMM (and an RMM) to read."""
    root = tmp_path_factory.mktemp("cli_campaign")
    (root / "dir").mkdir()
    (root / "out").mkdir()
    os.mkfifo(root / "fifo")
    (root / "text.npz").write_bytes(b"not a model")
    (root / "empty.npz").write_bytes(b"")
    mnist_fifos = root / "mnist_fifos"  # a data directory whose files are FIFOs
    mnist_fifos.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.mkfifo(mnist_fifos / name)
    model = root / "model.npz"
    status = cli.main(["train", "--dataset", "digits", "--layers", "2:3:1:2,4:3:1",
                       "--train-size", "60", "--epochs", "1", "--batch-size", "30",
                       "--test-limit", "0", "--quiet", "--out", str(model)])
    assert status == 0
    (root / "truncated.npz").write_bytes(model.read_bytes()[:300])
    import numpy as np

    from fastdrmm import RMM
    rng = np.random.default_rng(0)
    RMM(2, n_nuisances=1, max_iter=1, random_state=0).fit(
        rng.random((20, 1, 8, 8)), np.arange(20) % 2).save(root / "rmm.npz")
    return root


def path_choices(root):
    """Input and output path candidates: good, missing, odd."""
    r = str(root)
    return {
        "model_in": [f"{r}/model.npz", f"{r}/rmm.npz", f"{r}/missing.npz", f"{r}/dir",
                     f"{r}/fifo", f"{r}/text.npz", f"{r}/empty.npz", f"{r}/truncated.npz", "",
                     f"{r}/dir/", f"{r}/nope/model.npz"],
        "out": [f"{r}/out/a.png", f"{r}/out/b.npy", f"{r}/out/c.npz", f"{r}/out/./a.png",
                f"{r}/missing/x.png", f"{r}/dir", f"{r}/dir/", f"{r}/fifo", "", " ",
                f"{r}/model.npz", f"{r}/text.npz/x.png", "/proc/version"],
        "data_dir": [f"{r}/dir", f"{r}/missing", f"{r}/fifo", f"{r}/text.npz",
                     f"{r}/mnist_fifos", ""],
    }


def values(valid, extra=()):
    """An option's value: one of the valid ones (small; two times in three, so that runs
    reach past the parsing) or an invalid/huge one."""
    valid = st.sampled_from(valid)
    return st.one_of(valid, valid, st.sampled_from([*extra, *HUGE, *JUNK]))


def options(spec):
    """A list of (option, value) pairs drawn from {option: strategy of its values}."""
    items = sorted(spec.items())
    return st.lists(st.sampled_from(items).flatmap(
        lambda item: item[1].map(lambda value: [item[0]] if value is None else [item[0], value])),
        max_size=4).map(lambda pairs: [token for pair in pairs for token in pair])


FLAG = st.just(None)


def train_argv(p):
    # the base keeps every run tiny; generated options come after it and override it (the
    # valid values they may set are tiny too)
    base = ["train", "--dataset", "digits", "--layers", "2:3:1:2", "--train-size", "40",
            "--epochs", "1", "--batch-size", "20", "--test-limit", "10", "--quiet",
            "--out", f"{p['out'][0]}.npz"]
    spec = {
        "--dataset": values(["digits", "mnist"]),
        "--data-dir": st.sampled_from(p["data_dir"]),
        "--train-size": values(["30", "41"], ["5000", "1"]),
        "--labels-per-class": values(["1", "2"], ["500"]),
        "--labels": values(["10", "13"], ["100000"]),
        "--layers": values(["2:3", "2:3:1:2,3:3:1", '[{"n_templates": 2, "kernel_size": 3}]',
                            "2:3:1:2:0.1", "2:9", "2:3:0:99"],
                           ["[" * 3000, "1025:3", "2:33", "0:3", "2:3:1:2:1.5", "2:3,"]),
        "--preset": values(["two-layer"], ["huge"]),
        "--top": values(["full", "average"]),
        "--algorithm": values(["eg", "em"]),
        "--epochs": values(["1"], ["1000001"]),
        "--batch-size": values(["7", "40"], ["4097"]),
        "--learning-rate": values(["0.01"], ["1e300", "-0.1"]),
        "--lr-schedule": values(["step", "constant"]),
        "--kl-weight": values(["0.5"]),
        "--consistency-weight": values(["1"]),
        "--translation": values(["1"], ["33"]),
        "--teacher-decay": values(["0.5"], ["1"]),
        "--confidence-threshold": values(["0.5"]),
        "--validation-fraction": values(["0", "0.2"], ["0.6"]),
        "--seed": values(["0", "7"], [str(2**32)]),
        "--backend": values(["cpu", "numpy", "auto"], ["cupy", "numba-cuda", "gpu"]),
        "--out": st.sampled_from(p["out"]),
        "--checkpoint": st.sampled_from(p["out"]),
        "--resume": FLAG,
        "--test-limit": values(["0", "5"]),
    }
    return options(spec).map(lambda extra: base + extra)


def model_argv(p):
    common = {
        "--backend": values(["cpu", "numpy"], ["cupy"]),
        "--dataset": values(["digits", "mnist"]),
        "--data-dir": st.sampled_from(p["data_dir"]),
    }
    evaluate = options({**common, "--limit": values(["3", "50"])})
    pictures = {"--out": st.sampled_from(p["out"]), "--npy": st.sampled_from(p["out"])}
    reconstruct = options({**common, **pictures, "-n": values(["1", "12"], ["1001"])})
    sample = options({"--backend": common["--backend"], **pictures,
                      "--per-class": values(["1", "3"], ["1001"]),
                      "--classes": values(["0", "1,3", "9,9"], ["10", "-1", "1,,2",
                                                                 ",".join(["0"] * 101)]),
                      "--seed": values(["3"])})
    model = st.sampled_from(p["model_in"])
    return st.one_of(
        st.tuples(st.just("evaluate"), model, evaluate),
        st.tuples(st.just("reconstruct"), model, reconstruct),
        st.tuples(st.just("sample"), model, sample),
    ).map(lambda t: [t[0], t[1], *t[2]])


def demo_argv(p):
    base = ["demo", "--max-iter", "1", "--n-nuisances", "1", "--drmm-epochs", "0",
            "--plot", ""]
    spec = {
        "--n-nuisances": values(["2"], ["257"]),
        "--inference": values(["soft", "hard"]),
        "--max-iter": values(["2"], ["10001"]),
        "--labels-per-class": values(["3"], ["1000"]),
        "--unlabeled-weight": values(["0.5"]),
        "--test-size": values(["0.5", "0.9"], ["1", "0"]),
        "--seed": values(["1"]),
        "--backend": values(["numpy", "cpu"], ["cupy"]),
        "--plot": st.sampled_from(p["out"]),
        "--drmm-epochs": values(["0"]),
    }
    return options(spec).map(lambda extra: base + extra)


def junk_argv():
    # no bare "demo" or "train": with their defaults they run for minutes (valid, just long)
    words = st.sampled_from(["evaluate", "reconstruct", "sample", "--help",
                             "--version", "-n", "--out", "--npy", "--layers", "--epochs",
                             "--resume", "-h", *JUNK, *HUGE])
    return st.lists(st.one_of(words, st.text(max_size=12)), max_size=5)


class CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CaseTimeout(f"a case ran for more than {CASE_SECONDS} s (blocked?)")


def run_main(argv):
    """cli.main(argv) in this process -> (status, stdout, stderr); fails (rather than hangs)
    after CASE_SECONDS."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(list(argv))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return status, out.getvalue(), err.getvalue()


def check_clean_exit(argv):
    """Run ``argv``: exit status 0, 1 or 2, no traceback or raw exception, at most one error
    line (exactly one for status 1)."""
    status, _, err = run_main(argv)
    assert status in (0, 1, 2), (argv, status, err)
    assert "Traceback" not in err, (argv, err)
    assert "Error:" not in err and "Exception" not in err, (argv, err)  # no raw exception
    errors = [line for line in err.splitlines() if line.startswith("fastdrmm: error")]
    assert len(errors) <= 1, (argv, err)
    if status == 1:
        assert len(errors) == 1, (argv, err)


def command_line_campaign(argv_of, n_examples, then=None):
    """A campaign over the command lines ``argv_of(path_choices(paths))`` draws; ``then``
    checks the files afterwards."""

    @campaign(n_examples)
    @given(data=st.data())
    def test(paths, data):
        check_clean_exit(data.draw(argv_of(path_choices(paths))))
        if then is not None:
            then(paths)

    return test


def model_kept(paths):
    assert (paths / "model.npz").stat().st_size > 1000  # never written over


test_campaign_cli_train = command_line_campaign(train_argv, 40)
test_campaign_cli_model_commands = command_line_campaign(model_argv, 40, then=model_kept)
test_campaign_cli_demo = command_line_campaign(demo_argv, 15)


@campaign(40)
@given(argv=junk_argv())
def test_campaign_cli_junk_command_lines(argv):
    check_clean_exit(argv)
