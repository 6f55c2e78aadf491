"""The resnet experiment (001 Table 4a, Fig. 4b), quick setting: 17 pooled probes, the table and the figures."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import quick_run

import linprobe as lp
from linprobe.experiments.report import Summary, depth_trend
from linprobe.models import resnet_probe_points, small_resnet

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m "not slow"` leaves it out

PROBES = resnet_probe_points(small_resnet(), before_relu=True)  # each block's sum, before its ReLU


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Summary]]:
    yield from quick_run(tmp_path_factory, "resnet")


def test_writes_results_table_figures_and_summary(resnet_run: tuple[Path, Summary]) -> None:
    out, summary = resnet_run
    for name in ("results.csv", "results.json", "summary.md", "table_4a.md", "resnet_errors.png",
                 "resnet_diagram.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "summary.md").read_text()
    assert "**Paper:**" in text and "| add_16" in text and summary.settings["epochs"] == 2


def test_seventeen_pooled_probes_input_then_every_addition(resnet_run: tuple[Path, Summary]) -> None:
    result = lp.ProbeResult.load(resnet_run[0])
    assert result.names == PROBES == ["input", *(f"add_{k}.relu:input" for k in range(1, 17))]
    assert all(info.reduction == {"kind": "pool", "size": [1]} for info in result.layers)
    assert all(info.features_out == info.shape[0] for info in result.layers)  # one average per channel
    for split in ("train", "valid", "test"):
        assert len(result.errors(split)) == 17


def test_table_4a_has_one_row_per_probe_with_c_x_h_x_w(resnet_run: tuple[Path, Summary]) -> None:
    rows = [line.split("|")[1:-1] for line in (resnet_run[0] / "table_4a.md").read_text().splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["input", *(f"add_{k}" for k in range(1, 17))]  # Table 4a's names
    topologies = [r[1].strip() for r in rows]
    assert all(re.fullmatch(r"\d+ x \d+ x \d+", t) for t in topologies)
    assert topologies[0] == "1 x 28 x 28" and topologies[-1] == "256 x 2 x 2"
    assert len(set(topologies[1:])) == 4  # the four stages of ResNet-50, each with its own C x H x W
    result = lp.ProbeResult.load(resnet_run[0])
    assert [float(r[3]) for r in rows] == pytest.approx(list(result.errors("valid").values()), abs=5e-4)
    n = int(resnet_run[1].settings["train/valid/test"].split("/")[1])
    assert [float(r[4]) for r in rows] == pytest.approx([100 * (e * (1 - e) / n) ** 0.5 for e in
                                                         result.errors("valid").values()], abs=0.051)


def test_deep_additions_well_below_chance_and_not_worse_than_the_input(resnet_run: tuple[Path, Summary]) -> None:
    result = lp.ProbeResult.load(resnet_run[0])
    chance = result.layers[0].chance_error
    assert 0.85 < chance < 0.95
    for split in ("valid", "test"):
        errors = result.errors(split)
        last = [errors[f"add_{k}.relu:input"] for k in (14, 15, 16)]
        assert max(last) < chance - 0.25, (split, last)
        assert sum(last) / 3 <= errors["input"] + 0.05, (split, last, errors["input"])
    assert 0.0 <= result.meta["model_valid_error"] <= 1.0


def test_depth_trend_counts_significant_rises_and_ranks() -> None:
    errors = {"a": 0.9, "b": 0.5, "c": 0.52, "d": 0.2}
    rho, rises = depth_trend(errors, 10_000)  # SE of the b->c difference about 0.7 points: 2 points count
    assert rho == pytest.approx(-0.8) and rises == [("b", "c", pytest.approx(0.02))]
    assert depth_trend(errors, 1000)[1] == []  # on 1000 samples 2 points are noise
    assert depth_trend({"a": 0.3, "b": 0.2, "c": 0.1}, 1000) == (pytest.approx(-1.0), [])
