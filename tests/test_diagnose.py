"""Diagnostics: planted patterns in synthetic tables are named with their layers and steps; clean ones are not."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import rippling_result

from linprobe.report.diagnose import (
    DeadSegment,
    GarbageForward,
    Kink,
    Lag,
    describe,
    diagnose,
    halfway_steps,
    rank_correlation,
    ripple,
)
from linprobe.report.results import LayerInfo, ProbeResult

CHANCE = 0.9


def table(grid: dict[int, list[float]], split: str = "valid") -> ProbeResult:
    """A result with layers input, l1, l2, ... and the given error per layer at each step."""
    names = ["input"] + [f"l{i}" for i in range(1, len(next(iter(grid.values()))))]
    result = ProbeResult([LayerInfo(n, (4,), 4, 4, {"kind": "none"}, CHANCE) for n in names])
    for step, errors in grid.items():
        for name, e in zip(names, errors):
            result.add(step, name, split, {"top1_error": e})
    return result


def test_planted_dead_segment_is_found_with_its_layers_and_steps() -> None:
    # l1-l4 stay useless, l5 gets the input again and it and the layers after it learn
    result = table({0: [0.1, 0.5, 0.6, 0.7, 0.8, 0.3, 0.5, 0.6],
                    100: [0.1, 0.5, 0.65, 0.75, 0.85, 0.2, 0.3, 0.4],
                    200: [0.1, 0.5, 0.65, 0.8, 0.88, 0.1, 0.1, 0.1]})
    dead = [f for f in diagnose(result) if isinstance(f, DeadSegment)]
    assert dead == [DeadSegment("l1", "l4", 4, 0, (100, 200), "l5", pytest.approx(0.78))]
    assert "dead segment: l1-l4 (4 layers)" in describe(dead)


def test_a_dead_segment_can_start_at_the_first_layer_when_the_input_is_not_probed() -> None:
    result = table({0: [0.5, 0.6, 0.7, 0.3, 0.5], 100: [0.5, 0.65, 0.8, 0.1, 0.1]})
    result.rows = [r for r in result.rows if r.layer != "input"]
    result.layers = result.layers[1:]
    [dead] = [f for f in diagnose(result) if isinstance(f, DeadSegment)]
    assert (dead.first, dead.last, dead.recovery) == ("l1", "l2", "l3")


def test_a_clean_trained_stack_has_no_dead_segment_lag_or_kink() -> None:
    result = table({0: [0.1, 0.15, 0.2, 0.3, 0.4, 0.5], 100: [0.1, 0.08, 0.07, 0.06, 0.05, 0.05]})
    assert not [f for f in diagnose(result) if not isinstance(f, GarbageForward)]


def test_no_learning_anywhere_is_not_a_dead_segment() -> None:
    result = table({0: [0.1, 0.5, 0.9, 0.3], 100: [0.1, 0.5, 0.9, 0.3]})
    assert not [f for f in diagnose(result) if isinstance(f, DeadSegment)]


def test_garbage_forward_prop_names_each_climb_at_the_first_step() -> None:
    result = table({0: [0.1, 0.3, 0.5, 0.7, 0.12, 0.4, 0.6], 10: [0.1] * 7})
    climbs = [f for f in diagnose(result) if isinstance(f, GarbageForward)]
    assert [(c.first, c.last, c.step, c.low, c.high) for c in climbs] == [("input", "l3", 0, 0.1, 0.7),
                                                                            ("l4", "l6", 0, 0.12, 0.6)]
    assert "at initialisation (step 0)" in climbs[0].describe()


def test_lag_names_layers_behind_their_parents_that_catch_up_later() -> None:
    result = table({0: [0.1] * 6, 10: [0.1, 0.1, 0.1, 0.4, 0.6, 0.7], 20: [0.1, 0.09, 0.08, 0.08, 0.08, 0.08]})
    lags = [f for f in diagnose(result) if isinstance(f, Lag)]
    assert [(f.first, f.last, f.step, f.by) for f in lags] == [("l3", "l5", 10, 20)]
    assert lags[0].behind == pytest.approx(0.6)


def test_kink_is_a_layer_worse_than_both_neighbours() -> None:
    result = table({0: [0.1, 0.1, 0.2, 0.1, 0.1]})
    assert diagnose(result) == [Kink("l2", 0, pytest.approx(0.1))]
    assert diagnose(result, kink=0.2) == []  # 0.2 x chance = 0.18 > the rise of 0.1


def test_thresholds_scale_with_chance_and_non_error_metrics_are_refused() -> None:
    result = table({0: [0.1, 0.1, 0.2, 0.1, 0.1]})
    with pytest.raises(ValueError, match="error metric"):
        diagnose(result, metric="cross_entropy")
    assert describe([]).startswith("- nothing to report")


def test_a_difference_of_one_valid_sample_is_never_a_finding() -> None:
    result = ProbeResult([LayerInfo(n, (4,), 4, 4, {"kind": "none"}, 0.9) for n in "abc"],
                         meta={"samples": {"valid": 20}})
    for layer, err in zip("abc", (0.10, 0.15, 0.10)):  # b is worse than both neighbours by one of 20 samples
        result.add(0, layer, "valid", {"top1_error": err})
    assert diagnose(result, kink=0.01) == []
    result.meta["samples"]["valid"] = 20_000  # the same rates on 20,000 samples: far beyond noise
    assert [type(f).__name__ for f in diagnose(result, kink=0.01)] == ["Kink"]


def test_halfway_steps_interpolate_on_log_steps() -> None:
    steps = [0, 9, 99, 999]
    errors = torch.tensor([[0.8, 0.9], [0.6, 0.9], [0.4, 0.9], [0.2, 0.3]], dtype=torch.float64)
    times = halfway_steps(errors, steps)
    # the first column's target 0.5 lies halfway from step 9 (0.6) to 99 (0.4): halfway in log(1 + step), 10^1.5 - 1;
    # the second's, 0.6, halfway from step 99 (0.9) to 999 (0.3)
    assert times.tolist() == pytest.approx([10 ** 1.5 - 1, 10 ** 2.5 - 1])
    # a quarter of the way: 0.65, three quarters from step 0 (0.8) to 9 (0.6); 0.75, a quarter from 99 to 999
    assert halfway_steps(errors, steps, 0.25).tolist() == pytest.approx([10 ** 0.75 - 1, 10 ** 2.25 - 1])
    batch = halfway_steps(errors.expand(3, 4, 2), steps)
    assert batch.shape == (3, 2) and torch.equal(batch[1], times)


def test_rank_correlation_is_spearman_with_ties_averaged() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 5, (20, 9), generator=g).double(), torch.randint(0, 4, (20, 9), generator=g).double()
    expected = [stats.spearmanr(a, b).statistic for a, b in zip(x.tolist(), y.tolist())]
    assert rank_correlation(x, y).tolist() == pytest.approx(expected, nan_ok=True)
    assert math.isnan(float(rank_correlation(torch.ones(5), torch.arange(5.0))))  # no order on one side


STEPS = [0, 1, 3, 10, 30, 100, 300, 1000]


def test_ripple_measures_the_order_and_its_uncertainty() -> None:
    centres = {"input": 0.0, **{f"layer{k}": 5.0 * 1.2 ** k for k in range(1, 17)}}
    measured = ripple(rippling_result(centres, STEPS), resamples=200)
    assert measured.layers == tuple(f"layer{k}" for k in range(1, 17)) and measured.left_out == ("input",)
    assert measured.rho == pytest.approx(1.0) and measured.interval is not None and measured.interval[0] > 0.9
    # the logistic curve is halfway at its centre: interpolation on log steps finds it between the moments
    assert measured.times == pytest.approx([centres[n] for n in measured.layers], rel=0.25)
    lag, interval = measured.lag({f"layer{k}": k for k in range(1, 17)}, 4)
    assert interval is not None and 0 < interval[0] <= lag <= interval[1]
    assert "Spearman 1.00" in measured.describe() and "1 left out" in measured.describe()
    reversed_ = ripple(rippling_result({f"layer{k}": 5.0 * 1.2 ** (17 - k) for k in range(1, 17)}, STEPS),
                       resamples=200)
    assert reversed_.rho == pytest.approx(-1.0) and reversed_.interval is not None and reversed_.interval[1] < 0


def test_ripple_without_predictions_has_no_interval_and_needs_three_steps() -> None:
    result = rippling_result({f"layer{k}": 10.0 * k for k in range(1, 5)}, STEPS)
    result.predictions = {}
    measured = ripple(result)
    assert measured.interval is None and measured.replicates is None and "no interval" in measured.describe()
    assert measured.lag({f"layer{k}": k for k in range(1, 5)}, 1)[1] is None
    with pytest.raises(ValueError, match="three"):
        ripple(rippling_result({"layer1": 1.0}, [0, 10]))
    with pytest.raises(ValueError, match="fraction"):
        ripple(result, fraction=1.0)
