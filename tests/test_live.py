from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import linprobe as lp
from linprobe.data.inputs import Split


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))


def _train(train, steps: int, probes: bool) -> tuple[nn.Module, lp.OnlineProbes | None]:
    """A plain training loop; with ``probes`` it gains exactly two lines."""
    model = _net()
    torch.manual_seed(1)  # the model's own dropout draws from the global RNG
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = lp.OnlineProbes(model, "all", num_classes=10) if probes else None
    done = 0
    while done < steps:
        for batch in Split.of(train).batches(32):
            loss = F.cross_entropy(model(batch.inputs), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if monitor is not None:
                monitor.step(batch.labels)
            done += 1
            if done == steps:
                break
    return model, monitor


def test_diode_training_is_bit_identical_with_probes(digits_splits):
    plain, _ = _train(digits_splits[0], 300, probes=False)
    probed, monitor = _train(digits_splits[0], 300, probes=True)
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm buffers, bit for bit
    monitor.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in probed.modules())


def test_online_probes_learn_and_evaluate(digits_splits):
    model, monitor = _train(digits_splits[0], 400, probes=True)
    model.train()
    result = monitor.evaluate(digits_splits[1])
    assert model.training  # evaluation ran in eval mode and restored the mode
    errors = result.errors("valid")
    assert list(errors) == ["input", "1", "2", "3", "4", "5", "6", "7"]  # dropout trains: its own tensor
    assert monitor.taps.plan.skipped == {"0": "the same tensor as input"}  # nn.Flatten: a view of the input
    assert errors["input"] < 0.12 and errors["7"] < 0.12
    assert all(e < result.layers[0].chance_error - 0.5 for e in errors.values())
    assert result.steps == [400]
    assert {r.metric for r in result.rows} == {"top1_error", "top5_error", "cross_entropy"}


def test_probe_step_leaves_model_gradients_alone():
    model = _net()
    monitor = lp.OnlineProbes(model, ["1", "5"], num_classes=10)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.random.get_rng_state()
    loss, logs = monitor.step(y)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert loss.item() == pytest.approx(2 * torch.log(torch.tensor(10.0)).item(), rel=1e-5)  # zero-init probes
    assert set(logs) == {"probe/1/train_top1_error", "probe/5/train_top1_error"}


def test_equal_widths_share_one_batched_group_and_one_parameter():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6)])
    monitor = lp.OnlineProbes(model, "*", num_classes=3)
    model(torch.randn(8, 16))
    monitor.step(torch.randint(0, 3, (8,)))
    assert len(monitor.groups) == 1 and len(monitor.groups[0].names) == 7  # "*" also matches "input"
    assert [g["names"] for g in monitor.optimizer.param_groups] == [["input"] + [str(i) for i in range(6)]]
    assert monitor.groups[0].weight.shape == (7, 3, 16) and monitor.groups[0].weights[2].shape == (16, 3)


def test_batched_group_equals_separate_probes():
    """The stacked (L, B, D) computation must give each layer exactly its own probe's logits."""
    group = lp.training.live.ProbeGroup(["a", "b"], 5, 3)
    with torch.no_grad():
        for w in group.weights:
            w.normal_()
    feats = {"a": torch.randn(7, 5), "b": torch.randn(7, 5) * 3 + 1}
    z = group(feats, learn=True)
    for i, n in enumerate("ab"):
        h = feats[n]
        hn = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
        torch.testing.assert_close(z[i], hn @ group.weights[i] + group.biases[i])


def test_evaluate_before_learning_is_an_error(digits_splits):
    with pytest.raises(RuntimeError, match="call step"):
        lp.OnlineProbes(_net(), "1", num_classes=10).evaluate(digits_splits[1])


class _Twice(nn.Module):
    """One linear layer called twice in a forward (a shared module)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


def test_a_module_called_twice_gets_a_probe_per_call_by_default():
    model, x, y = _Twice(), torch.randn(8, 6), torch.arange(8) % 3
    with lp.OnlineProbes(model, "fc", num_classes=3) as probes:
        model(x)
        _, logs = probes.step(y)
        assert probes.taps.order == ["fc#0", "fc#1"]
        assert set(logs) == {"probe/fc#0/train_top1_error", "probe/fc#1/train_top1_error"}
        assert list(probes.evaluate((x, y)).errors("valid")) == ["fc#0", "fc#1"]
    with lp.OnlineProbes(model, "fc", num_classes=3, repeat="error") as probes:
        model(x)
        with pytest.raises(lp.LayerSelectionError, match="ran 2 times"):
            probes.step(y)
