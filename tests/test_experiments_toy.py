"""The toy experiment (002 Fig. 3), quick setting: files written and the paper's shape of the curve."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import quick_run

import linprobe as lp
from linprobe.experiments.report import Summary
from linprobe.fit.solvers import DEFAULT_L2_PATH

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m "not slow"` leaves it out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Summary]]:
    yield from quick_run(tmp_path_factory, "toy")


def test_writes_results_figure_and_summary(toy_run: tuple[Path, Summary]) -> None:
    out, summary = toy_run
    for name in ("results.csv", "results.json", "summary.md", "toy.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "cache").exists()  # a new model every repetition: nothing to keep
    assert "**Paper:**" in (out / "summary.md").read_text()
    assert summary.verdict == "reproduced"  # with the full L2 path the input is essentially 0 as well


def test_one_mean_row_per_layer_split_and_metric(toy_run: tuple[Path, Summary]) -> None:
    result = lp.ProbeResult.load(toy_run[0])
    assert result.names == ["input", *(f"layer{k}" for k in range(1, 33))]
    assert result.steps == [0] and result.meta["repetitions"] == 2
    assert all(info.l2 is None and abs(info.chance_error - 0.5) < 0.05 for info in result.layers)
    metrics = {r.metric for r in result.rows}
    assert {"top1_error", "top1_error_std", "cross_entropy"} <= metrics and "l2" not in metrics
    chosen = result.meta["chosen_l2"]
    assert list(chosen) == ["input", "layer32"] and all(sum(c.values()) == 2 for c in chosen.values())
    assert set(chosen["input"]) <= {f"{l2:g}" for l2 in DEFAULT_L2_PATH}


def test_input_separable_and_deep_layers_near_a_coin_flip(toy_run: tuple[Path, Summary]) -> None:
    errors = list(lp.ProbeResult.load(toy_run[0]).errors("test").values())
    assert errors[0] < 0.02  # the weak end of the default L2 path fits the separable input (2-point path: 2.9%)
    assert sum(errors[-5:]) / 5 > 0.3
    assert sum(errors[-5:]) / 5 > sum(errors[1:6]) / 5 > errors[0]
