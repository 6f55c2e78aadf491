"""The inception experiment (001 Fig. 5, 9, App. C), quick setting: five moments on the same feature subsets."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import quick_run

import linprobe as lp
from linprobe.experiments import reproduce
from linprobe.experiments.inception import QUICK, aux_lead, checks, early_steps
from linprobe.experiments.report import Summary, verdict
from linprobe.models import inception_probe_points, small_inception

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m "not slow"` leaves it out

PROBES = inception_probe_points(small_inception())


@pytest.fixture(scope="module")
def inception_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Summary]]:
    yield from quick_run(tmp_path_factory, "inception")


def test_every_moment_of_seventeen_probes(inception_run: tuple[Path, Summary]) -> None:
    out, summary = inception_run
    result = lp.ProbeResult.load(out)
    assert result.steps == list(QUICK.steps) and len(result.steps) == 5
    assert result.names == PROBES and len(PROBES) == 17
    for step in result.steps:
        assert len(result.errors("valid", step=step)) == 17
        assert lp.ProbeResult.load(out / f"step_{step}").steps == [step]
    assert set(result.meta["model_valid_error"]) == {str(s) for s in result.steps}  # JSON keys
    assert "**Paper:**" in (out / "summary.md").read_text() and summary.settings["moments (minibatches)"]


def test_the_same_subset_indices_at_every_moment(inception_run: tuple[Path, Summary]) -> None:
    out = inception_run[0]
    per_step = [{layer["name"]: layer["reduction"] for layer in json.loads((out / f"step_{s}" / "results.json")
                                                                         .read_text())["layers"]}
                for s in QUICK.steps]
    first = per_step[0]
    assert all(r == first for r in per_step[1:])
    for layer in json.loads((out / f"step_{QUICK.steps[0]}" / "results.json").read_text())["layers"]:
        reduction = first[layer["name"]]
        assert reduction["kind"] == "subset" and reduction["in_features"] == layer["features_in"]
        assert len(reduction["indices"]) == min(QUICK.subset, layer["features_in"]) == layer["features_out"]
    big = [r["indices"] for r in first.values() if r["in_features"] > QUICK.subset]
    assert len({tuple(i) for i in big}) == len(big) > 10  # each layer its own random subset


def test_final_moment_errors_below_chance(inception_run: tuple[Path, Summary]) -> None:
    result = lp.ProbeResult.load(inception_run[0])
    chance = result.layers[0].chance_error
    for split in ("valid", "test"):
        errors = result.errors(split, step=result.steps[-1])
        assert max(errors.values()) < chance - 0.3, (split, errors)


def test_one_coloured_diagram_per_moment(inception_run: tuple[Path, Summary]) -> None:
    out, summary = inception_run
    for step in QUICK.steps:
        assert (out / f"inception_step_{step}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"inception_step_{step}.png" in summary.figures
    assert (out / "inception_errors.png").stat().st_size > 0
    assert (out / "inception_trend.png").read_bytes()[:4] == b"\x89PNG" and "inception_trend.png" in summary.figures


def test_the_depth_trend_with_its_interval_at_every_moment(inception_run: tuple[Path, Summary]) -> None:
    out, summary = inception_run
    text = (out / "summary.md").read_text()
    table = next(t for t in summary.tables if t.startswith("| probe point"))
    trend_row = next(line for line in table.splitlines() if line.startswith("| Spearman (main path)"))
    assert trend_row.count("(95% ") == len(QUICK.steps)  # one interval per moment
    for step in QUICK.steps:
        finding = next(f for f in summary.findings if f.startswith(f"step {step}: main path Spearman "))
        rho, lo, hi = _trend_numbers(finding)
        assert -1.0 <= lo <= hi <= 1.0 and -1.0 <= rho <= 1.0
    assert "aux_head - logits" in table and "steps 5, 10" in text  # the early moments named in the check
    assert summary.settings["early moments (the auxiliary head's lead)"] == early_steps(QUICK.steps) == [5, 10]
    assert "auxiliary loss weight 0.4 (Inception v3's)" in str(summary.settings["optimiser"])


def _trend_numbers(finding: str) -> tuple[float, float, float]:
    """rho and its interval out of a finding's ``Spearman -0.97 (95% -0.99 to -0.93)``."""
    words = finding.split("Spearman ")[1].split(";")[0].replace("(95% ", "").replace(")", "").split()
    return float(words[0]), float(words[1]), float(words[3])


def test_rejects_negative_moments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps"):
        reproduce("inception", tmp_path, quick=True, progress=False, steps=[-5, 10])


def _moment(step: int, aux: float, main: float) -> lp.ProbeResult:
    result = lp.ProbeResult([])
    result.add(step, "aux_head", "valid", {"top1_error": aux})
    result.add(step, "logits", "valid", {"top1_error": main})
    return result


@pytest.mark.parametrize("aux, main, lead", [(0.15, 0.20, True), (0.25, 0.20, False), (0.201, 0.203, None)])
def test_aux_lead_at_the_first_trained_moment(aux: float, main: float, lead: bool | None) -> None:
    got, words = aux_lead([_moment(0, 0.9, 0.3), _moment(100, aux, main), _moment(400, 0.5, 0.1)], n_valid=6000)
    assert got is lead and "steps 100)" in words and "step 100 " in words
    assert aux_lead([_moment(0, 0.1, 0.5)], n_valid=6000)[0] is None  # untrained only: nothing leads


@pytest.mark.parametrize("early, lead", [
    ([(0.15, 0.20), (0.15, 0.20), (0.201, 0.203)], True),  # ahead at 2 of 3, behind at none
    ([(0.15, 0.20), (0.201, 0.203), (0.201, 0.203)], None),  # ahead at only 1 of 3: level
    ([(0.15, 0.20), (0.15, 0.20), (0.25, 0.20)], False),  # behind at one early moment: the claim fails
])
def test_aux_lead_over_the_early_moments(early: list[tuple[float, float]], lead: bool | None) -> None:
    steps = [25, 50, 100]
    results = [_moment(0, 0.3, 0.5), *(_moment(s, a, m) for s, (a, m) in zip(steps, early)), _moment(400, 0.5, 0.1)]
    got, words = aux_lead(results, n_valid=6000)
    assert got is lead and early_steps([0, *steps, 400]) == steps
    assert all(f"step {s} " in words for s in steps) and "step 400" not in words  # 400 is not early
    main = {f"p{k}": 0.4 - 0.02 * k for k in range(14)}
    judged = checks(main, got, words, 6000)
    assert judged[-1].passed is (lead is True) and verdict(judged) == ("reproduced" if lead else "partly")


def test_early_steps_are_the_first_quarter_or_the_first_trained_moment() -> None:
    assert early_steps([0, 25, 50, 100, 400, 1600]) == [25, 50, 100, 400]
    assert early_steps([0, 1600]) == [1600] and early_steps([1600, 0, 100]) == [100] and early_steps([0]) == []
