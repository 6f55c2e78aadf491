"""The depth sweep of the plain deep MLP (002 Sec. 3.4), quick setting: files, shapes, numbers and verdict fields."""
from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import one_thread, quick_run

import linprobe as lp
from linprobe.cli import main
from linprobe.experiments import reproduce
from linprobe.experiments.depth import QUICK, Outcome, break_depth, escaped, last_quarter, model_curve, state
from linprobe.experiments.report import Summary, standard_error

pytestmark = pytest.mark.slow  # about 20 s of CPU: `pytest -m "not slow"` leaves it out

N_TEST = 1000  # the bundled MNIST's test split


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Summary]]:
    """One quick sweep, shared by the tests."""
    yield from quick_run(tmp_path_factory, "depth")


def table(out: Path) -> list[dict[str, str]]:
    """``depths.csv`` as rows of text."""
    return list(csv.DictReader((out / "depths.csv").read_text().splitlines()))


def test_writes_one_result_per_depth_the_table_figures_and_summary(quick: tuple[Path, Summary]) -> None:
    out, summary = quick
    figures = ["probe_curves.png", "training.png", "model_errors.png"]
    for name in ["depths.csv", "summary.md", *figures]:
        assert (out / name).stat().st_size > 0, name
    assert summary.figures == figures
    for depth in QUICK.depths:
        result = lp.ProbeResult.load(out / f"depth{depth}")
        every = QUICK.probe_every(depth)
        assert result.names == QUICK.probed(depth) == ["input", *(f"layer{k}" for k in range(every, depth + 1, every))]
        assert result.steps == [QUICK.minibatches] and result.meta["depth"] == depth
        assert list(result.meta["model_test_error"]) == ["0", *map(str, QUICK.moments)]  # the training curve
        assert len(result.names) == 1 + min(depth, QUICK.probe_points)
    assert [int(r["depth"]) for r in table(out)] == list(QUICK.depths)
    assert len(QUICK.moments) == QUICK.evaluations and QUICK.moments[-1] == QUICK.minibatches


def test_the_table_holds_each_depths_numbers_with_their_standard_errors(quick: tuple[Path, Summary]) -> None:
    out, _ = quick
    for row in table(out):
        depth = int(row["depth"])
        result = lp.ProbeResult.load(out / f"depth{depth}")
        errors = result.errors("test")
        model = float(row["model_error"])
        assert model == pytest.approx(result.meta["model_test_error"][str(QUICK.minibatches)])
        assert float(row["model_se"]) == pytest.approx(standard_error(model, N_TEST))
        assert float(row["last_quarter"]) == pytest.approx(last_quarter(errors, depth))
        assert float(row["input_error"]) == pytest.approx(errors["input"])
        outcome = Outcome(depth, model, float(row["last_quarter"]))
        assert row["state"] == state(outcome, chance=result.chance_error, n=N_TEST)
        left = escaped(model_curve(result), chance=result.chance_error, n=N_TEST)
        assert row["left_chance"] == ("" if left is None else str(left))


def test_quick_claims_shallow_models_train_and_the_deepest_breaks(quick: tuple[Path, Summary]) -> None:
    out, summary = quick
    rows = {int(r["depth"]): r for r in table(out)}
    assert all(rows[d]["state"] == "trains" for d in QUICK.depths if d <= QUICK.shallow)
    assert float(rows[QUICK.depths[0]]["model_error"]) < 0.2  # far below chance (0.9)
    deepest = rows[QUICK.depths[-1]]
    assert deepest["state"] == "broken" and float(deepest["model_error"]) > 0.8
    assert [c.core for c in summary.checks] == [True, True, False, False]
    assert all(c.passed for c in summary.checks if c.core) and summary.verdict in ("reproduced", "partly")
    found = break_depth([Outcome(int(r["depth"]), float(r["model_error"]), float(r["last_quarter"]))
                         for r in rows.values()], chance=lp.ProbeResult.load(out / "depth4").chance_error, n=N_TEST)
    assert found is not None and QUICK.shallow < found <= QUICK.depths[-1]
    assert f"the shallowest broken depth: {found} (the paper: 64)" in summary.findings[-1]
    text = (out / "summary.md").read_text()
    assert "## Checks" in text and "holds (core)" in text and "FAILS (core)" not in text
    assert "300 minibatches of 120 are about 10 epochs" in text and "quick: width 32" in text


def test_the_command_line_sweeps_the_depths_it_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with one_thread():
        assert main(["reproduce", "depth", "--quick", "--depths", "4", "--out", str(tmp_path), "--quiet"]) == 0
    assert [r["depth"] for r in table(tmp_path)] == ["4"]
    assert "**Verdict:** not reproduced" in capsys.readouterr().out  # one shallow depth: nothing broke



@pytest.mark.parametrize("depths", [[], [0, 8]])
def test_depths_must_be_whole_numbers_of_layers(tmp_path: Path, depths: list[int]) -> None:
    with pytest.raises(ValueError, match="depths must be"):
        reproduce("depth", tmp_path, quick=True, progress=False, depths=depths)
