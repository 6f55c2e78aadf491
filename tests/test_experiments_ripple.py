"""The ripple experiment (002 Sec. 3.4), quick setting: files, its measured ripple, the same bits whatever the global
random state."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_thread

import linprobe as lp
from linprobe.experiments import reproduce
from linprobe.experiments.report import Summary
from linprobe.experiments.ripple import FULL, QUICK, log_moments, measure

pytestmark = pytest.mark.slow  # about a minute a run on a free core: `pytest -m "not slow"` leaves it out


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Summary]]:
    """One quick run, made with the global generator in one state (the bit-identity test uses another)."""
    out = tmp_path_factory.mktemp("ripple")
    with one_thread():
        torch.manual_seed(1)
        yield out, reproduce("ripple", out, quick=True, progress=False)


def test_moments_are_log_spaced_with_zero() -> None:
    assert FULL.run.steps == log_moments(5000, 20) and len(FULL.run.steps) >= 21
    assert FULL.run.steps[:4] == (0, 1, 2, 4) and FULL.run.steps[-1] == 5000
    assert len(set(FULL.run.steps)) == len(FULL.run.steps) and list(FULL.run.steps) == sorted(FULL.run.steps)
    ratios = [b / a for a, b in zip(FULL.run.steps[5:], FULL.run.steps[6:])]
    assert max(ratios) / min(ratios) < 1.1  # evenly spaced in log once rounding no longer merges them
    assert QUICK.run.steps == (0, 1, 2, 4, 7, 14, 28, 54, 106, 206, 400)
    with pytest.raises(ValueError, match="count"):
        log_moments(5, 20)


def test_writes_the_video_and_the_measured_ripple(quick: tuple[Path, Summary]) -> None:
    out, _ = quick
    for name in ["results.csv", "results.json", "predictions.npz", "summary.md", "halfway.png", "heatmap.png",
                 "animation.gif", "diagnostics.md"]:
        assert (out / name).stat().st_size > 0, name
    result = lp.ProbeResult.load(out)
    assert result.steps == list(QUICK.run.steps)
    assert result.names == ["input", *(f"layer{k}" for k in range(4, 65, 4))]
    text = (out / "summary.md").read_text()
    assert "**Verdict:** reproduced" in text and "![animation.gif](animation.gif)" in text
    assert "001 Fig. 4b" in text and "layer64's probe sees exactly the input" in text


def test_quick_numbers(quick: tuple[Path, Summary]) -> None:
    out, summary = quick
    measured = measure(lp.ProbeResult.load(out), QUICK, seed=0)
    half = measured[0.5]
    assert half.left_out == ("input",) and len(half.layers) == 16  # every probed layer learned
    assert half.rho > 0.8 and half.interval is not None and half.interval[0] > 0.5
    assert all(r.rho > 0.7 and r.interval is not None and r.interval[0] > 0.3 for r in measured.values())
    assert 10 < half.times[0] < 40 and 60 < half.times[-1] < 120  # layer4 about 25 minibatches, layer64 about 85
    lag, interval = half.lag({f"layer{k}": k for k in range(4, 65, 4)}, QUICK.run.aux_every)
    assert interval is not None and 0 < interval[0] <= lag <= interval[1] < 20
    assert [c.passed for c in summary.checks] == [True, True, True]


def test_same_bits_whatever_the_global_rng(quick: tuple[Path, Summary], tmp_path: Path) -> None:
    out, summary = quick
    with one_thread():
        torch.manual_seed(2)
        again = reproduce("ripple", tmp_path, quick=True, progress=False)
    assert (tmp_path / "results.csv").read_bytes() == (out / "results.csv").read_bytes()
    first, second = np.load(out / "predictions.npz"), np.load(tmp_path / "predictions.npz")
    assert sorted(first.files) == sorted(second.files)
    assert all(np.array_equal(first[k], second[k]) for k in first.files)
    assert again.findings == summary.findings and [c.evidence for c in again.checks] == [c.evidence for c in
                                                                                         summary.checks]
