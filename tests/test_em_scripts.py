"""The EM benchmark scripts (benchmarks/em_digits.py, em_mnist.py, the EM contender of
time_to_accuracy.py and the EM table of reproduce_mnist.py) run end to end at tiny sizes and
report well-formed numbers; their helpers count and choose what they say they do."""

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from benchmark_scripts import BENCHMARKS, load_script, md_table


def mnist_dir():
    root = os.environ.get("FASTDRMM_DATA")
    if root:
        return Path(root) / "mnist"
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


MNIST = mnist_dir()


@pytest.fixture(scope="module")
def em_mnist():
    return load_script(BENCHMARKS / "em_mnist.py", "fastdrmm_em_mnist")


@pytest.fixture(scope="module")
def em_digits():
    return load_script(BENCHMARKS / "em_digits.py", "fastdrmm_em_digits")


@pytest.fixture(scope="module")
def mnist_present():
    if not MNIST.is_dir():
        pytest.skip(f"no MNIST at {MNIST}")
    return str(MNIST)


# ------------------------------------------------------------------------------ helpers


def test_objective_rises_counts_each_kind(em_mnist):
    """M-step rises (after > before) and E-step rises (next before > after) apart, a relative
    tolerance for rounding, nothing counted on a monotone history."""
    assert em_mnist.objective_rises([(10.0, 8.0), (7.0, 6.0), (6.0, 5.0)]) == (0, 0)
    assert em_mnist.objective_rises([(10.0, 11.0), (12.0, 9.0), (9.5, 9.4)]) == (1, 2)
    assert em_mnist.objective_rises([(-5.0, -6.0), (-5.5, -5.5)]) == (0, 1)
    # a rise of 1e-12 relative is rounding, 1e-6 is not
    assert em_mnist.objective_rises([(1.0, 1.0 + 1e-12)]) == (0, 0)
    assert em_mnist.objective_rises([(1.0, 1.0 + 1e-6)]) == (1, 0)
    assert em_mnist.objective_rises([]) == (0, 0)


def test_em_options_pass_only_what_is_given(em_mnist):
    """Unset options leave DRMM's defaults (absent from the keyword arguments); the prefixed
    set keeps --em-targets unprefixed twice; --param takes any setting, typed."""
    import argparse

    ap = argparse.ArgumentParser()
    em_mnist.add_em_options(ap)
    assert em_mnist.em_params(ap.parse_args([])) == {}
    got = em_mnist.em_params(ap.parse_args(["--amplitude-steps", "3", "--shrinkage", "0.25",
                                            "--em-targets", "top-down", "--param", "ridge=0.01",
                                            "--param", "init=em"]))
    assert got == {"amplitude_steps": 3, "shrinkage": 0.25, "em_targets": "top-down",
                   "ridge": 0.01, "init": "em"}
    assert em_mnist.em_params(ap.parse_args(["--shrinkage", "oas"])) == {"shrinkage": "oas"}
    ap = argparse.ArgumentParser()
    em_mnist.add_em_options(ap, prefix="em-")
    got = em_mnist.em_params(ap.parse_args(["--em-targets", "top-down", "--em-unlabeled-weight",
                                            "0.5", "--em-param", "tol=0"]), prefix="em-")
    assert got == {"em_targets": "top-down", "unlabeled_weight": 0.5, "tol": 0}
    with pytest.raises(SystemExit):
        ap.parse_args(["--em-param", "no-equals-sign"])
    assert [em_mnist.parse_value(t) for t in ("2", "0.5", "None", "true", "oas")] == [
        2, 0.5, None, True, "oas"]


def test_tracker_measures_outside_training_time_and_stops(em_mnist):
    """The tracker scores the snapshot, keeps its own time out of train_s, and lowers the
    model's max_iter at the first iteration its stop rule accepts."""
    import time

    class Snapshot:
        def __init__(self, acc):
            self.acc = acc

        def score(self, X, y):
            time.sleep(0.05)  # measurement time, which train_s must not count
            return self.acc

    model = SimpleNamespace(max_iter=10)
    tracker = em_mnist.IterationTracker(None, None, model=model,
                                        stop=lambda row: row["accuracy"] >= 0.9).start()
    tracker(Snapshot(0.5), {"epoch": 1, "objective": 3.0, "time": 0.0})
    assert model.max_iter == 10
    tracker(Snapshot(0.95), {"epoch": 2, "objective": 2.0, "time": 0.0})
    assert model.max_iter == 2
    first, second = tracker.rows
    assert (first["accuracy"], second["accuracy"]) == (0.5, 0.95)
    assert first["eval_s"] >= 0.05 and second["train_s"] - first["train_s"] < 0.04
    assert first["objective"] == 3.0 and "recon_mse" not in first
    tracker.attach_objective(SimpleNamespace(objective_history_=[(5.0, 4.0), (4.5, 4.0)]))
    assert (second["objective"], second["objective_after_m_step"]) == (4.5, 4.0)


def test_digits_data_splits_and_labels(em_digits):
    X, y = em_digits.load_digits_images()
    assert X.shape == (1797, 1, 8, 8) and X.dtype == np.float32
    assert 0.0 <= X.min() and X.max() <= 1.0
    X_tr, X_te, y_tr, y_te = em_digits.split(X, y, 1)
    assert (X_tr.shape[0], X_te.shape[0]) == (1257, 540)
    assert np.abs(np.bincount(y_te) / 540 - np.bincount(y) / 1797).max() < 0.01  # stratified
    few = em_digits.few_labels(y_tr, 20, 1)
    assert np.array_equal(np.bincount(few[few >= 0]), np.full(10, 20))
    assert np.array_equal(few[few >= 0], y_tr[few >= 0]) and np.sum(few < 0) == 1257 - 200
    assert not np.array_equal(few, em_digits.few_labels(y_tr, 20, 2))
    assert [len(em_digits.layer_stack(n)) for n in ("1", "2")] == [1, 2]


# ------------------------------------------------------------------------------ the scripts


def test_em_digits_tiny_run(em_digits, tmp_path):
    """One seed, the 1-layer model, top average, one iteration, 3 labels per class: every
    table, and JSON numbers that agree with them."""
    out = io.StringIO()
    path = tmp_path / "d.json"
    assert em_digits.main(["--seeds", "0", "--layers", "1", "--tops", "average",
                           "--max-iter", "1", "--labels-per-class", "3",
                           "--amplitude-steps", "1",
                           "--json", str(path)], out=out) == 0
    text = out.getvalue()
    report = json.loads(path.read_text())
    runs = {r["mode"]: r for r in report["runs"]}
    assert set(runs) == {"supervised", "semi", "labels-only"}
    assert (runs["semi"]["labels"], runs["semi"]["unlabeled"]) == (30, 1227)
    assert (runs["labels-only"]["labels"], runs["labels-only"]["unlabeled"]) == (30, 0)
    for r in runs.values():
        assert len(r["accuracy"]) == len(r["recon_mse"]) == len(r["objective"]) == 1
        assert 0.0 <= r["accuracy"][0] <= 1.0 and np.isfinite(r["recon_mse"][0])
        assert r["recon_mse"][0] >= 0 and r["iterations"][0]["train_s"] > 0
    assert 0.12 < report["pixel_variance"] < 0.16  # digits / 16: about 0.141
    (row,) = md_table(text, "| layers | top | seed 0 |")
    assert row[:3] == ["1", "average", f"{runs['supervised']['accuracy'][-1]:.3f}"]
    (semi,) = md_table(text, "| layers | top | seed | labels | unlabeled |")
    diff = runs["semi"]["accuracy"][-1] - runs["labels-only"]["accuracy"][-1]
    assert semi[3:] == ["30", "1227", f"{runs['labels-only']['accuracy'][-1]:.3f}",
                        f"{runs['semi']['accuracy'][-1]:.3f}", f"{diff:+.3f}"]
    (obj,) = md_table(text, "| layers | top | seed | objective |")
    assert "→" in obj[3] and obj[4:] == [str(v) for v in runs["supervised"]["objective_rises"]]
    (acc,) = md_table(text, "| layers | top | seed | 1 |")  # accuracy after every iteration
    assert acc == ["1", "average", "0", f"{runs['supervised']['accuracy'][0]:.3f}"]
    (rec,) = md_table(text.split("reconstruction MSE per pixel after every")[1],
                      "| layers | top | seed | 1 |")
    assert float(rec[3]) == pytest.approx(runs["supervised"]["recon_mse"][0], rel=1e-2)


def test_em_mnist_tiny_run(em_mnist, mnist_present, tmp_path):
    out = io.StringIO()
    assert em_mnist.main(["--preset", "two-layer", "--top", "average", "--train-size", "100",
                          "--test-size", "40", "--recon-size", "10", "--max-iter", "1",
                          "--amplitude-steps", "1", "--data-dir", mnist_present,
                          "--out", str(tmp_path / "m")], out=out) == 0
    text = out.getvalue()
    assert (tmp_path / "m.md").read_text() == text
    report = json.loads((tmp_path / "m.json").read_text())
    s = report["settings"]
    assert (s["train_images"], s["test_images"], s["recon_images"]) == (100, 40, 10)
    assert s["em"] == {"amplitude_steps": 1} and s["model"]["amplitude_steps"] == 1
    (it,) = report["iterations"]
    assert it["iteration"] == 1 and 0 < it["train_s"] and np.isfinite(it["recon_mse"])
    assert [it["objective"], it["objective_after_m_step"]] == report["objective_history"][0]
    (row,) = md_table(text, "| iteration | test error % |")
    assert row[:2] == ["1", f"{100 * (1 - it['accuracy']):.2f}"]
    assert "amplitude_steps=1" in text and "objective rises" in text


def test_time_to_accuracy_em_contender(mnist_present, tmp_path):
    """The EM contender alone (no PyTorch needed): it stops at the first iteration that
    reaches the target although more were allowed."""
    tta = load_script(BENCHMARKS / "time_to_accuracy.py", "fastdrmm_time_to_accuracy_em")
    out = io.StringIO()
    assert tta.main(["--preset", "two-layer", "--contenders", "em", "--em-top", "average",
                     "--train-size", "100", "--test-size", "40", "--max-epochs", "3",
                     "--target", "0.01", "--em-amplitude-steps", "1",
                     "--data-dir", mnist_present,
                     "--out", str(tmp_path / "t")], out=out) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    (em,) = report["results"]
    assert em["contender"] == "em" and em["top"] == "average"
    assert len(em["epochs"]) == 1 and em["reached_epoch"] == 1
    assert em["time_to_target_s"] == em["epochs"][0]["train_s"] > 0
    assert report["settings"]["em_max_iter"] == 3
    assert em["em_settings"] == {"amplitude_steps": 1}
    text = out.getvalue()
    assert "EM supervised" in text and "| em | yes | 1 |" in text
    assert "EM: top average, at most 3 iterations" in text


def test_reproduce_mnist_em_table(mnist_present, tmp_path):
    """--tables em: the semi-supervised EM fit beside EM on its labels alone; the first
    table's error joins the row of the same experiment."""
    rep = load_script(BENCHMARKS / "reproduce_mnist.py", "fastdrmm_reproduce_mnist_em")
    out = io.StringIO()
    assert rep.main(["--preset", "two-layer", "--train-size", "100", "--test-size", "40",
                     "--experiments", "30", "--tables", "em", "--em-top", "average",
                     "--em-iterations", "1", "--em-unlabeled-weight", "0.5",
                     "--em-amplitude-steps", "1",
                     "--data-dir", mnist_present, "--out", str(tmp_path / "r.json")],
                    out=out) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["experiments"] == []
    (e,) = report["em_experiments"]
    alone = e["labels_alone"]
    assert (e["labels"], e["unlabeled"], e["epochs"]) == (30, 70, 1)
    assert (alone["labels"], alone["unlabeled"], alone["train_images"]) == (30, 0, 30)
    settings = report["em_settings"]
    assert settings["given"] == {"unlabeled_weight": 0.5, "amplitude_steps": 1}
    assert settings["params"]["algorithm"] == "em" and settings["params"]["top"] == "average"
    assert settings["params"]["unlabeled_weight"] == 0.5
    assert settings["params"]["amplitude_steps"] == 1
    assert settings["params"]["learning_rate"] == 1e-3  # EG-only: DRMM's default, not passed on
    (row,) = md_table(out.getvalue(), "| experiment | labels | iterations run |")
    helps = "yes" if e["test_error_pct"] < alone["test_error_pct"] else "no"
    assert row[:8] == ["semi-30", "30", "1/1", row[3], f"{e['test_error_pct']:.2f}",
                       f"{alone['test_error_pct']:.2f}", helps, "—"]
    # beside a first table: its error of the same experiment fills the column
    report["experiments"] = [dict(e, test_error_pct=12.5, labels_alone=None)]
    text = rep.markdown(report)
    assert text.startswith("# DRMM on MNIST") and "# Semi-supervised EM on MNIST" in text
    (row,) = md_table(text, "| experiment | labels | iterations run |")
    assert row[7] == "12.50"
