"""The command line: the demo end to end, and errors as one clear line."""

import io
import subprocess
import sys

import pytest

from fastdrmm import cli


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_demo_runs_and_reports(tmp_path):
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
