"""The benchmark scripts (benchmarks/, not installed with the package) loaded as modules."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(path, name):
    """The script at ``path`` as a module named ``name``; the test is skipped where the
    checkout does not hold it."""
    if not path.exists():
        pytest.skip("benchmarks/ is not shipped with this installation")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def md_table(text, head):
    """The rows (lists of cells) of the markdown table whose header row starts with ``head``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    width = lines[start].count("|") - 1
    assert lines[start + 1] == "|" + " --- |" * width
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows
