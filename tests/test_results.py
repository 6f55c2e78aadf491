"""ProbeResult: the tidy table, its per-step views and combining runs."""
from __future__ import annotations

import pytest

from linprobe.report.results import LayerInfo, ProbeResult, markdown_table


def _run(step: int, bad: str | None = None) -> ProbeResult:
    r = ProbeResult([LayerInfo(n, (4,), 4, 4, {"kind": "none"}, 0.5) for n in ("a", "b")])
    for n, e in (("a", 0.1 * (step + 1)), ("b", 0.2)):
        if n == bad:
            r.add(step, n, "valid", {"invalid": 3})
            r.meta["invalid"] = {n: "nan at sample 3"}
        else:
            r.add(step, n, "valid", {"top1_error": e})
    return r


def test_concat_keeps_invalid_layers_out_of_their_step_only():
    both = ProbeResult.concat([_run(0), _run(1, bad="b"), _run(2)])
    assert both.steps == [0, 1, 2]
    assert both.meta["invalid"] == {"b": "nan at sample 3"}
    assert both.errors("valid", step=1) == {"a": 0.2}
    assert both.errors("valid", step=2) == pytest.approx({"a": 0.3, "b": 0.2})
    assert both.errors("valid") == both.errors("valid", step=2)


def test_markdown_table_pads_columns():
    assert markdown_table(["a", "bb"], [["xyz", "1"]]).splitlines() == ["| a   | bb |", "| --- | -- |", "| xyz | 1  |"]


def test_csv_values_carry_no_float32_noise():
    import numpy as np

    from linprobe.report.results import format_value
    assert format_value(float(np.float32(0.08))) == "0.08"  # not 0.07999999821186066
    assert np.float32(format_value(float(np.float32(1 / 3)))) == np.float32(1 / 3)
    assert format_value(1 / 3) == repr(1 / 3) and format_value(0.0) == "0"  # a float64 value keeps its repr


def test_table_can_show_only_some_metrics():
    from linprobe.report.results import LayerInfo, ProbeResult
    r = ProbeResult([LayerInfo("a", (3,), 3, 3, {"kind": "none"}, 0.5, 1.0)])
    r.add(0, "a", "valid", {"top1_error": 0.25, "cross_entropy": 0.7})
    head = r.table(metrics=("top1_error",)).splitlines()[0]
    assert "valid top1" in head and "valid ce" not in head
    assert "valid ce" in r.table().splitlines()[0]
