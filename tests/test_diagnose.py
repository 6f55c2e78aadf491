"""Diagnostics: planted patterns in synthetic tables are named with their layers and steps; clean ones are not."""
from __future__ import annotations

import pytest

from linprobe.report.diagnose import DeadSegment, GarbageForward, Kink, Lag, describe, diagnose
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
