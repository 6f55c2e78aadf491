"""Monitor: measured steps, online beside exact probes, the model untouched, hooks removed, one table."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from linprobe.data.datasets import ArrayDataset
from linprobe.report.results import ProbeResult
from linprobe.training.monitor import Monitor, gap_table, metrics_at, online_exact_gap, online_metric


def blobs(n: int, seed: int) -> ArrayDataset:
    """Three well separated Gaussian classes in 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = 4 * torch.eye(3, 8)
    return ArrayDataset(centres[y] + torch.randn(n, 8, generator=g), y)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def train(model: nn.Module, data: ArrayDataset, steps: int, monitor: Monitor | None = None) -> None:
    """SGD on random minibatches drawn from the global generator (so any use of it by the monitor shows)."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data), (32,))
        x, y = data.x[idx], data.y[idx]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if monitor is not None:
            monitor.step(y)
        opt.step()


@pytest.fixture(scope="module")
def monitored() -> tuple[nn.Module, Monitor]:
    model = mlp()
    with Monitor(model, ["input", "1", "4", "5"], num_classes=3, valid=blobs(300, 1), every=10, exact=blobs(300, 2),
                 lr=0.05, l2_path=(1e-3,), max_iter=50) as monitor:
        train(model, blobs(600, 0), 25, monitor)
    return model, monitor


def test_measures_at_step_zero_and_every_k_steps(monitored: tuple[nn.Module, Monitor]) -> None:
    _, monitor = monitored
    assert monitor.result.steps == [0, 10, 20]
    assert monitor.result.names == ["input", "1", "4", "5"]
    kinds = {r.metric for r in monitor.result.rows if r.split == "valid"}
    assert {"top1_error", online_metric("top1_error"), online_metric("cross_entropy")} <= kinds
    assert set(monitor.seconds) == {"learn", "online", "exact"} and monitor.seconds["exact"] > 0


def test_online_probes_end_close_to_the_exact_snapshots(monitored: tuple[nn.Module, Monitor]) -> None:
    _, monitor = monitored
    gaps = online_exact_gap(monitor.result)
    assert [g.step for g in gaps] == [0, 10, 20]
    assert gaps[-1].mean < 0.05 and gaps[-1].worst < 0.1
    assert gaps[0].online_minus_exact > 0.1  # after one minibatch the online probes trail the optimum
    assert max(monitor.result.errors("valid", "top1_error", 20).values()) < 0.05  # separable: exact probes solve it
    assert "| 20 |" in gap_table(gaps)


def test_monitor_leaves_the_model_bit_identical(monitored: tuple[nn.Module, Monitor]) -> None:
    model, _ = monitored
    alone = mlp()
    train(alone, blobs(600, 0), 25)
    for (name, a), b in zip(model.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(a, b), name


def test_hooks_are_removed_on_close(monitored: tuple[nn.Module, Monitor]) -> None:
    model, _ = monitored
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_explicit_steps_measure_once_per_period_and_table_round_trips(tmp_path: Path) -> None:
    model, data = mlp(), blobs(64, 0)
    seen = []
    with Monitor(model, ["4"], num_classes=3, valid=blobs(30, 1), every=4,
                 on_measure=lambda result, step: seen.append(step)) as monitor:
        for step in [0, 0, 1, 3, 5, 6, 9]:  # repeated and skipped numbers (gradient accumulation, resumes)
            model(data.x[:16])
            monitor.step(data.y[:16], step=step)
    assert seen == [0, 5, 9] and monitor.result.steps == [0, 5, 9]
    assert "probe/4/valid/online_top1_error" in metrics_at(monitor.result, 5)
    back = ProbeResult.load(monitor.result.save(tmp_path))
    assert back.rows == monitor.result.rows and back.to_csv() == monitor.result.to_csv()
    with pytest.raises(ValueError, match="exact="):
        online_exact_gap(monitor.result)
    with pytest.raises(ValueError, match="step 9 is already measured"):
        monitor.measure(9)


def test_learn_every_skips_learning_but_not_measuring() -> None:
    model, data = mlp(), blobs(64, 0)
    with Monitor(model, ["4"], num_classes=3, valid=blobs(30, 1), every=3, learn_every=2) as monitor:
        logs = []
        for _ in range(7):
            model(data.x[:16])
            logs.append(monitor.step(data.y[:16]))
    assert [bool(log) for log in logs] == [True, False, True, False, True, False, True]
    assert monitor.result.steps == [0, 3, 6]
    group = monitor.online.groups[0]
    assert monitor.online.optimizer.state[group.weight]["step"] == 4  # learned at steps 0, 2, 4, 6


def test_bad_periods_are_refused() -> None:
    with pytest.raises(ValueError, match="every=0"):
        Monitor(mlp(), num_classes=3, valid=blobs(10, 0), every=0)
    with pytest.raises(ValueError, match="learn_every=0"):
        Monitor(mlp(), num_classes=3, valid=blobs(10, 0), learn_every=0)
