"""Robustness, layers: modules called several times per forward, and the policy that says which calls to probe.

Unknown names, patterns matching nothing, layers that never run and outputs without a tensor are
covered in test_taps.py (see docs/robustness.md).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import linprobe as lp
from linprobe.capture.taps import Taps


class Unrolled(nn.Module):
    """One cell applied three times per forward, like an RNN step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cell = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.tanh(self.cell(x))
        return self.head(x)


def test_repeat_all_concatenates_every_call_in_call_order() -> None:
    model, x = Unrolled(), torch.randn(4, 3)
    h1 = model.cell(x)
    h2 = model.cell(torch.tanh(h1))
    h3 = model.cell(torch.tanh(h2))
    with Taps(model, ["cell", "head"], repeat="all") as taps:
        got = taps.run(x)
        torch.testing.assert_close(got["cell"], torch.cat([h1, h2, h3], 1).detach())
        torch.testing.assert_close(got["head"], model(x).detach())  # called once: kept as is
        taps.stop_early = True  # extraction's later batches: the loop must not be cut after the first call
        torch.testing.assert_close(taps.run(x)["cell"], torch.cat([h1, h2, h3], 1).detach())


def test_repeat_all_in_probe_gives_calls_times_features() -> None:
    x, y = torch.randn(12, 3), torch.arange(12) % 2
    result = lp.probe(Unrolled(), (x, y), (x, y), layers="cell", repeat="all", l2_path=(1.0,), progress=False)
    assert result.layers[0].features_in == 9 and result.layers[0].shape == (9,)


def test_unknown_repeat_policy_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="'each', 'error', 'first', 'last' or 'all'"):
        Taps(Unrolled(), "cell", repeat="mean")  # type: ignore[arg-type]
    with Taps(Unrolled(), "cell", repeat="error") as taps, pytest.raises(lp.LayerSelectionError,
                                                                         match="ran 3 times.*'all'"):
        taps.run(torch.randn(1, 3))
