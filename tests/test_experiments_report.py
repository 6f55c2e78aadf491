"""The summaries' helpers for trends and differences (linprobe.experiments.report): made-up numbers, no training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from linprobe.experiments.report import (
    Check,
    Summary,
    depth_trend,
    depth_trend_interval,
    difference_with_se,
    summary_settings,
    trend_text,
)


def _wrong(errors: list[float], n: int, seed: int = 0) -> np.ndarray:
    """(n, L) made-up per-sample mistakes whose column means are ``errors`` exactly."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(n) < round(e * n)) for e in errors], axis=1)


def test_the_trend_interval_is_tight_for_clear_gaps_and_wide_for_noise() -> None:
    falling = _wrong([0.40, 0.35, 0.30, 0.25, 0.20, 0.15], 6000)
    rho = depth_trend(dict(enumerate(falling.mean(axis=0))), 6000)[0]
    lo, hi = depth_trend_interval(falling)
    assert rho == pytest.approx(-1.0) and lo == pytest.approx(-1.0) and hi == pytest.approx(-1.0)
    level = _wrong([0.200, 0.201, 0.199, 0.200, 0.202, 0.198], 6000)  # differences far below one SE
    lo, hi = depth_trend_interval(level)
    assert lo < -0.5 and hi > 0.5  # the ranks are noise: the interval spans most of [-1, 1]
    assert depth_trend_interval(level) == (lo, hi)  # seeded: the same draws every time
    assert depth_trend_interval(level, seed=1) != (lo, hi)
    with pytest.raises(ValueError, match="at least 3"):
        depth_trend_interval(falling[:, :2])


def test_a_tied_replicate_has_no_rank_correlation_and_is_left_out() -> None:
    tied = np.zeros((50, 4), dtype=bool)  # every probe right on every sample: every replicate ties
    assert all(np.isnan(v) for v in depth_trend_interval(tied))


def test_trend_and_difference_texts() -> None:
    assert trend_text(-0.971, (-0.99, -0.93)) == "-0.97 (95% -0.99 to -0.93)"
    assert difference_with_se(0.20, 0.21, 6000) == "-1.0% (SE 0.7)"
    assert difference_with_se(0.30, 0.10, 1000).startswith("+20.0%")


def test_summary_settings_read_back_what_a_summary_wrote(tmp_path: Path) -> None:
    summary = Summary("x", "claim", ["f"], [Check("c", True, "e", core=True)], seconds=12.4,
                      settings={"train/valid/test": "10/5/7", "seed": 3, "model": "a: b"}, tables=["| t |"])
    settings = summary_settings(summary.write(tmp_path))
    assert settings == {"train/valid/test": "10/5/7", "seed": "3", "model": "a: b", "wall time": "12 s"}
    (tmp_path / "other.md").write_text("# no settings here\n")
    with pytest.raises(ValueError, match="Settings"):
        summary_settings(tmp_path / "other.md")
