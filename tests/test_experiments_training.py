"""The experiments' training loops: the auxiliary heads' loss weight (Inception v3's 0.4, the deep MLP's 1)."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import linprobe as lp
from linprobe.experiments.inception import V3_AUX_WEIGHT, run
from linprobe.experiments.training import classification_loss, train_epochs


class WithAux(nn.Module):
    """A linear model exposing one auxiliary head's logits, as SmallInception does."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.aux = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux_logits = {"aux_head": self.aux(x)}
        return self.main(x)


def test_aux_loss_weighed() -> None:
    torch.manual_seed(0)
    model, x, y = WithAux(), torch.randn(8, 4), torch.arange(8) % 3
    logits = model(x)
    main, aux = F.cross_entropy(logits, y), F.cross_entropy(model.aux_logits["aux_head"], y)
    torch.testing.assert_close(classification_loss(model, logits, y, aux_weight=0.4), main + 0.4 * aux)
    assert torch.equal(classification_loss(model, logits, y), main + aux)  # 1 by default: bit for bit as before
    assert V3_AUX_WEIGHT == 0.4 and inspect.signature(run).parameters["aux_weight"].default == V3_AUX_WEIGHT


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.4"])
def test_bad_aux_weight_is_refused(bad: object) -> None:
    data = lp.ArrayDataset(torch.randn(6, 4), torch.arange(6) % 3)
    model = WithAux()
    with pytest.raises(ValueError, match="aux_weight"):
        train_epochs(model, data, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=3,
                     aux_weight=bad)  # type: ignore[arg-type]
