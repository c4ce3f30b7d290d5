"""benchmarks/compare.py runs end to end on a tiny shape and writes well-formed tables."""

import importlib.util
import io
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
TINY = ["--shapes", "l4", "--batch", "2", "--repeats", "1", "--warmup", "0", "--copies", "2"]
OPS = {"match_switch_pool", "render", "template_stats B+s", "template_stats B+s+G"}


@pytest.fixture(scope="module")
def compare():
    if not SCRIPT.exists():
        pytest.skip("benchmarks/ is not shipped with this installation")
    spec = importlib.util.spec_from_file_location("fastdrmm_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(compare, tmp_path, *extra):
    out = io.StringIO()
    js, md = tmp_path / "t.json", tmp_path / "t.md"
    code = compare.main([*TINY, *extra, "--json", str(js), "--markdown", str(md)], out=out)
    assert code == 0
    assert md.read_text() == out.getvalue()
    return json.loads(js.read_text()), out.getvalue()


def test_without_torch(compare, tmp_path):
    """The fastdrmm side alone: timings, GFLOP/s, memory, no peer, placeholder for DRMM."""
    report, text = run(compare, tmp_path, "--no-torch", "--no-single-thread", "--drmm-step")
    assert report["import_fastdrmm_s"] > 0
    assert report["drmm_step"]["available"] is False
    assert "not available yet" in text and "PyTorch not available" in text
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
