"""benchmarks/reproduce_mnist.py runs end to end on a tiny MNIST subset and writes its table."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import BENCHMARKS, load_script, md_table

SCRIPT = BENCHMARKS / "reproduce_mnist.py"
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
TINY = ["--train-size", "300", "--test-size", "200", "--data-dir", str(MNIST)]
HEAD = ("| experiment | labels | epochs run | wall time | test error % | paper DRMM 5-layer % | "
        "paper DRMM 2-layer % | paper DRMM +NN+KL % | target % | met |")


@pytest.fixture(scope="module")
def reproduce():
    return load_script(SCRIPT, "fastdrmm_reproduce_mnist")


@pytest.fixture(scope="module")
def mnist():
    if not MNIST.is_dir():
        pytest.skip(f"no MNIST at {MNIST}")
    import fastdrmm

    return fastdrmm.load_mnist(MNIST, subset="train", return_X_y=True)


def table_rows(text):
    return md_table(text, HEAD)  # HEAD has the table's ten columns


def test_tiny_run_prints_the_table(reproduce, mnist, tmp_path):
    """Default preset (conv-small), one epoch, supervised and N_L = 100: table and JSON."""
    out = io.StringIO()
    code = reproduce.main([*TINY, "--epochs", "1", "--experiments", "supervised,100",
                           "--out", str(tmp_path / "r")], out=out)
    assert code == 0
    text = out.getvalue()
    assert (tmp_path / "r.md").read_text() == text
    assert "# DRMM on MNIST: conv-small, EG, seed 0" in text and "(cosine)" in text
    rows = table_rows(text)
    assert [r[:3] for r in rows] == [["supervised", "300", "1/1"], ["semi-100", "100", "1/1"]]
    sup, semi = rows
    assert sup[5:9] == ["—", "—", "—", "<= 0.70"]
    assert semi[5:9] == ["3.50", "11.81", "0.57", "<= 3.50"]
    for r in rows:
        assert r[3].endswith((" s", " min")) and 0.0 <= float(r[4]) <= 100.0
        assert r[9] in ("yes", "no")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["train_images"] == 300 and report["settings"]["test_images"] == 200
    first, second = report["experiments"]
    assert (first["labels"], first["unlabeled"]) == (300, 0)
    assert (second["labels"], second["unlabeled"]) == (100, 200)
    for e in report["experiments"]:
        assert e["epochs"] == 1 and len(e["history"]) == 1 and e["fit_calls"] == 1
        assert e["wall_s"] > 0 and e["time_share_s"] is None
        assert e["test_error_pct"] == pytest.approx(100 * (1 - e["test_accuracy"]))
        assert {"loss", "xent", "reconstruction"} <= set(e["history"][0])
    assert "entropy" in second["history"][0]
    assert all(e["test_error_by_epoch_pct"] is None for e in report["experiments"])


def test_test_error_after_every_epoch(reproduce, mnist, tmp_path):
    """--test-every-epoch records one test error per epoch; the last is the table's."""
    reproduce.main([*TINY, "--preset", "two-layer", "--epochs", "2", "--experiments", "semi-50",
                    "--test-every-epoch", "--kl-weight", "1", "--consistency-weight", "1",
                    "--translation", "2", "--out", str(tmp_path / "r.json")], out=io.StringIO())
    (e,) = json.loads((tmp_path / "r.json").read_text())["experiments"]
    curve = e["test_error_by_epoch_pct"]
    assert len(curve) == 2 and curve[-1] == pytest.approx(e["test_error_pct"])
    assert e["history"][-1]["consistency"] > 0
    assert "non-negativity 0.01 / kl 1 / consistency 1 / translation 2, validation" in \
        reproduce.markdown(json.loads((tmp_path / "r.json").read_text()))
    settings = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert (settings["kl_weight"], settings["translation"]) == (1.0, 2)


def test_time_budget_stops_after_the_epoch_that_exceeds_the_share(reproduce, mnist, tmp_path):
    """A budget smaller than one epoch: every experiment runs exactly one (resumed) epoch, the
    schedule turns constant, and the checkpoints of --checkpoint-dir are kept."""
    out = io.StringIO()
    ckpt = tmp_path / "ck"
    reproduce.main([*TINY, "--preset", "two-layer", "--epochs", "3", "--time-budget", "0.01",
                    "--experiments", "supervised,semi-50", "--checkpoint-dir", str(ckpt),
                    "--out", str(tmp_path / "r.json")], out=out)
    assert not (tmp_path / "r.md").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["lr_schedule"] == "constant"
    assert [r[:3] for r in table_rows(out.getvalue())] == [["supervised", "300", "1/3"],
                                                          ["semi-50", "50", "1/3"]]
    for e in report["experiments"]:
        assert e["epochs"] == 1 and e["fit_calls"] == 1 and e["time_share_s"] is not None
    assert len(os.listdir(ckpt)) == 2


def test_epoch_by_epoch_resume_equals_one_fit(reproduce, mnist, tmp_path):
    """fit(max_iter=k, resume=True) for k = 1, 2 gives one fit(max_iter=2)'s parameters
    (constant schedule: the cosine/step schedules span max_iter and do not)."""
    from fastdrmm import DRMM

    X, y = np.ascontiguousarray(mnist[0][:96]), mnist[1][:96].copy()
    y[40:] = -1
    params = dict(layers="two-layer", batch_size=32, lr_schedule="constant",
                  validation_fraction=0.0, random_state=3)
    stepwise, _, calls = reproduce.fit_by_epochs(params, X, y, 2, None,
                                                 str(tmp_path / "c.fdz"))
    whole = DRMM(**params, max_iter=2).fit(X, y)
    assert calls == 2 and stepwise.n_iter_ == whole.n_iter_ == 2
    for name, value in whole.parameters_.items():
        np.testing.assert_array_equal(stepwise.parameters_[name], value, err_msg=name)


def test_labels_and_experiment_names(reproduce):
    assert reproduce.parse_experiments("supervised, 100,semi-600,100") == ["supervised", 100,
                                                                           600]
    with pytest.raises(SystemExit):
        reproduce.parse_experiments("semi-x")
    y = np.repeat(np.arange(10), 30)
    chosen = reproduce.choose_labels(y, 25, seed=1)
    kept = chosen[chosen >= 0]
    assert kept.size == 25 and np.array_equal(kept, y[chosen >= 0])
    counts = np.bincount(kept, minlength=10)
    assert counts.min() == 2 and counts.max() == 3
    assert np.array_equal(chosen, reproduce.choose_labels(y, 25, seed=1))
    assert not np.array_equal(chosen, reproduce.choose_labels(y, 25, seed=2))
    assert reproduce.resolve_schedule("auto", None) == "cosine"
    assert reproduce.resolve_schedule("auto", 10.0) == "constant"
