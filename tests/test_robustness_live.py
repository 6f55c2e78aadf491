"""OnlineProbes.step: labels checked against the batch and classes; a NaN layer is invalid, the others unaffected."""
import pytest
import torch
from torch import nn

import linprobe as lp


class Poison(nn.Linear):
    """A linear layer that can put one NaN into its output (sample 3, unit 1)."""
    poison = False

    def forward(self, x):
        g = super().forward(x)
        if self.poison:
            g = g.clone(); g[3, 1] = float("nan")
        return g


class NaNAt(nn.Module):
    def __init__(self):
        super().__init__(); self.a = nn.Linear(4, 8); self.b = Poison(8, 8)

    def forward(self, x):
        return self.b(self.a(x))

def test_step_rejects_bad_labels():
    m = NaNAt(); p = lp.OnlineProbes(m, layers=["a", "b"], num_classes=3)
    m(torch.randn(6, 4))
    with pytest.raises(ValueError, match="5 labels for a batch of 6"):
        p.step(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range for num_classes=3"):
        p.step(torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match="one-hot"):
        p.step(torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])])

def test_step_nan_layer_invalid_others_unaffected():
    torch.manual_seed(0)
    xs = [torch.randn(6, 4) for _ in range(5)]; ys = [torch.randint(0, 3, (6,)) for _ in range(5)]
    runs = []
    for poison in (False, True):
        torch.manual_seed(1); m = NaNAt()
        p = lp.OnlineProbes(m, layers=["a", "b"], num_classes=3)
        for i, (x, y) in enumerate(zip(xs, ys)):
            m.b.poison = poison and i == 2
            m(x); p.step(y)
        m.b.poison = False
        runs.append(p)
    clean, bad = runs
    assert bad.invalid == {"b": "nan at sample 3 of training step 2"}
    ga, gb = clean.groups[0], bad.groups[0]
    i = ga.names.index("a")
    assert torch.equal(ga.weights[i], gb.weights[i])
    j = gb.names.index("b")
    assert torch.isfinite(gb.weights[j]).all()
    res = bad.evaluate((torch.randn(12, 4), torch.randint(0, 3, (12,))))
    assert res.meta["invalid"]["b"].startswith("nan at sample 3")
    assert "a" in res.errors("valid") and "b" not in res.errors("valid")
