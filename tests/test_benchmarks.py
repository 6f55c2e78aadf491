"""The benchmark suite cannot rot: ``python -m benchmarks --quick`` runs and reports every workload (no timing assertion)."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m "not slow"` leaves it out

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD_LABELS = ("1 live", "2 finished", "3 cache", "4 scaling", "5 solver", "6 resnet memory", "7 pixels")


def test_quick_suite_reports_every_workload_with_finite_ratios(tmp_path):
    out = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    for label in WORKLOAD_LABELS:
        found = [r for r in body if r[0] == f"| {label}"]
        assert found, f"no rows for workload {label}"
        for r in found:
            ratio = r[header.index("ratio")]
            assert ratio.endswith("x") and math.isfinite(float(ratio[:-1])), r
