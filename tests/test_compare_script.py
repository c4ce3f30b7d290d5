"""benchmarks/compare.py runs end to end on a tiny shape and writes well-formed tables."""

import importlib.util
import io
import json
from pathlib import Path

import pytest
from benchmark_scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "compare.py"
TINY = ["--shapes", "l4", "--batch", "2", "--repeats", "1", "--warmup", "0", "--copies", "2"]
OPS = {"match_switch_pool", "render", "template_stats B+s", "template_stats B+s+G"}


@pytest.fixture(scope="module")
def compare():
    return load_script(SCRIPT, "fastdrmm_compare")


def run(compare, tmp_path, *extra):
    out = io.StringIO()
    js, md = tmp_path / "t.json", tmp_path / "t.md"
    code = compare.main([*TINY, *extra, "--json", str(js), "--markdown", str(md)], out=out)
    assert code == 0
    assert md.read_text() == out.getvalue()
    return json.loads(js.read_text()), out.getvalue()


def test_without_torch(compare, tmp_path):
    """The fastdrmm side alone: timings, GFLOP/s, memory, no peer, the DRMM step unpaired."""
    report, text = run(compare, tmp_path, "--no-torch", "--no-single-thread", "--drmm-step",
                       "--drmm-presets", "two-layer")
    assert report["import_fastdrmm_s"] > 0
    step = report["drmm_step"]
    assert step["available"] is True
    (row,) = step["rows"]
    assert row["preset"] == "two-layer" and row["batch"] == 2 and row["labeled"] == 1
    assert row["fastdrmm_ms"] > 0 and row["fastdrmm_epoch_s"] > 0
    assert row["peer_ms"] is None and row["ratio"] is None and row["check"] == ""
    assert "PyTorch not available" in text and "## full DRMM training step" in text
    (only,) = report["passes"]
    assert only["peaks"]["matmul_gflops"] > 0 and only["peaks"]["copy_gbs"] > 0
    rows = only["rows"]
    assert {r["op"] for r in rows} == OPS
    for r in rows:
        assert r["shape"] == "l4" and r["batch"] == 2 and r["dtype"] == "float32"
        assert r["fastdrmm_ms"] > 0 and r["first_call_ms"] > 0
        assert r["peer"] is None and r["peer_ms"] is None and r["ratio"] is None
        assert (r["gflops"] is None) == r["op"].endswith("+G")
    header = [line for line in text.splitlines() if line.startswith("| op |")]
    assert len(header) == 1
    assert len([line for line in text.splitlines() if line.startswith("| template")]) == 2


def test_with_torch(compare, tmp_path):
    """The PyTorch contenders: peer times, ratios, agreement checks and the 1-thread pass."""
    pytest.importorskip("torch")
    report, text = run(compare, tmp_path, "--no-memory", "--threads", "2")
    main, single = report["passes"]
    assert (main["threads"], single["threads"]) == (2, 1)
    peers = [r for r in main["rows"] if r["peer"] is not None]
    assert {r["op"] for r in peers} == {"match_switch_pool", "render", "template_stats B+s"}
    for r in peers:
        assert r["peer_ms"] > 0 and r["ratio"] == pytest.approx(r["fastdrmm_ms"] / r["peer_ms"])
        assert r["check"].startswith("ok"), r
    assert len(report["scaling"]) == len(single["rows"]) == 3
    assert "## 1-thread vs 2-thread scaling" in text


def test_drmm_step_with_torch(compare, tmp_path):
    """--drmm-step: one EG step of fastdrmm vs PyTorch autograd, losses/gradients checked."""
    pytest.importorskip("torch")
    report, text = run(compare, tmp_path, "--drmm-step", "--drmm-only", "--batch", "4",
                       "--drmm-presets", "conv-small,two-layer", "--threads", "2")
    assert report["passes"] == []
    assert "| op |" not in text and "## full DRMM training step (2 threads)" in text
    rows = report["drmm_step"]["rows"]
    assert [(r["preset"], r["batch"], r["labeled"]) for r in rows] == [
        ("conv-small", 4, 2), ("two-layer", 4, 2)]
    for r in rows:
        assert r["check"].startswith("ok"), r
        details = r["check_details"]
        assert details["max_rel_err"] <= compare.DRMM_STEP_TOLERANCE["float32"]
        assert {"loss", "xent", "entropy", "reconstruction", "nonnegativity", "dW0", "db0",
                "dmu", "dbeta"} <= set(details["rel_err"])
        assert r["peer_ms"] > 0 and r["ratio"] == pytest.approx(r["fastdrmm_ms"] / r["peer_ms"])
        assert r["peer_epoch_s"] == pytest.approx(r["peer_ms"] * 60000 / 4 / 1e3)
    table_rows = [line for line in text.splitlines() if line.startswith("| conv-small")]
    assert len(table_rows) == 1 and "ok (max rel err" in table_rows[0]


def test_drmm_step_catches_a_wrong_gradient(compare):
    """The step check is not vacuous: a perturbed fastdrmm gradient fails it."""
    torch = pytest.importorskip("torch")
    import numpy as np

    from fastdrmm._network import LossWeights, eg_loss_and_grads

    x, y, _ = compare.mnist_or_random(6, 0)
    y[3:] = -1
    net, params = compare.drmm_setup("two-layer", x, y, 0)
    weights = LossWeights()
    loss, terms, grads, fw = eg_loss_and_grads(net, params, x, y, weights)
    tp = compare.torch_params(torch, net, params)
    verdict, _ = compare.check_drmm_step(torch, net, tp, float(params["class_scale"]), x, y,
                                         weights, (loss, terms, grads, fw), 1e-3)
    assert verdict.startswith("ok"), verdict
    grads["W1"] = grads["W1"] * np.float32(1.01)
    verdict, details = compare.check_drmm_step(torch, net, tp, float(params["class_scale"]), x,
                                               y, weights, (loss, terms, grads, fw), 1e-3)
    assert verdict.startswith("FAIL") and "dW1" in verdict, verdict


def test_time_to_accuracy_tiny(compare, tmp_path):
    """benchmarks/time_to_accuracy.py: both contenders from the same start, one tiny epoch."""
    pytest.importorskip("torch")
    mnist = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    if not mnist.is_dir():
        pytest.skip(f"no MNIST at {mnist}")
    import numpy as np

    from fastdrmm import DRMM

    spec = importlib.util.spec_from_file_location("fastdrmm_time_to_accuracy",
                                                  SCRIPT.parent / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    # the PyTorch copy starts from DRMM.fit's own initial parameters
    x, y, _ = compare.mnist_or_random(64, 0)
    start = DRMM("two-layer", max_iter=0, validation_fraction=0.0, random_state=4).fit(x, y)
    _, params = compare.drmm_setup("two-layer", x, y, 4)
    for name, value in params.items():
        np.testing.assert_array_equal(start.parameters_[name], value, err_msg=name)
    out = io.StringIO()
    code = tta.main(["--preset", "two-layer", "--train-size", "128", "--test-size", "100",
                     "--max-epochs", "1", "--target", "0.999", "--data-dir", str(mnist),
                     "--out", str(tmp_path / "t")], out=out)
    assert code == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert (tmp_path / "t.md").read_text() == out.getvalue()
    fd, tc = report["results"]
    assert (fd["contender"], tc["contender"]) == ("fastdrmm", "torch")
    for r in (fd, tc):
        assert len(r["epochs"]) == 1 and r["reached_epoch"] is None
        assert r["time_to_target_s"] is None and r["train_s"] > 0
    # same start, same batches: after one step the two models predict (almost) alike
    assert abs(fd["final_accuracy"] - tc["final_accuracy"]) <= 0.02
    assert "| fastdrmm | no | 1 |" in out.getvalue() and "time per epoch" in out.getvalue()
