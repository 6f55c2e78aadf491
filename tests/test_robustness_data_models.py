"""Robustness, data and models: empty splits, devices, models in training mode, forwards that raise half-way."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import linprobe as lp
from linprobe.capture.cache import FeatureCache
from linprobe.capture.extract import model_float_dtype, prepared
from linprobe.data.inputs import Batch

FAST = {"l2_path": (1.0,), "progress": False}


def _data(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % 2
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += 3 * y
    return x, y


def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_an_empty_split_is_refused_before_any_forward() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    calls = _count_forwards(model)
    x, y = _data(8)
    with pytest.raises(ValueError, match="the test split is empty"):
        lp.probe(model, (x, y), (x, y), TensorDataset(x[:0], y[:0]), layers="0", **FAST)
    assert calls == []


def test_an_empty_pair_split_is_refused_before_any_forward() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    calls = _count_forwards(model)
    x, y = _data(8)
    with pytest.raises(ValueError, match="the test split is empty"):
        lp.probe(model, (x, y), (x, y), (x[:0], y[:0]), layers="0", **FAST)
    assert calls == []


def test_a_loader_that_yields_no_batch_is_refused() -> None:
    x, y = _data(8)
    empty = DataLoader(TensorDataset(x[:3], y[:3]), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="the valid data yielded no batch .a DataLoader with drop_last"):
        lp.probe(nn.Identity(), (x, y), empty, layers="input", **FAST)
    with pytest.raises(ValueError, match="yielded no batch.*drop_last"):  # the first split: found by discovery
        lp.probe(nn.Identity(), empty, (x, y), layers="input", **FAST)


def test_a_loader_that_yields_no_batch_is_named() -> None:
    x, y = _data(8)
    empty = DataLoader(TensorDataset(x[:3], y[:3]), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="the valid data yielded no batch.*drop_last"):
        lp.probe(nn.Identity(), (x, y), empty, layers="input", **FAST)
    with pytest.raises(ValueError, match="the train data yielded no batch.*drop_last"):
        lp.probe(nn.Identity(), empty, (x, y), layers="input", **FAST)


def test_a_layer_whose_shape_changes_between_splits_is_named() -> None:
    x, y = _data(8)
    wider = (torch.cat([x, x[:, :1]], 1), y)
    with pytest.raises(ValueError, match=r"layer 'input' gave 5 features in batch 0 of the valid split but 4 in the "
                                         r"first batch"):
        lp.probe(nn.Identity(), (x, y), wider, layers="input", **FAST)


def test_data_is_moved_to_the_model_device_on_cpu() -> None:
    inputs = {"x": torch.ones(2, dtype=torch.float64), "pair": (torch.zeros(1), [torch.ones(1)]), "n": 3,
              "ids": torch.arange(2)}
    model = nn.Linear(2, 2)
    assert model_float_dtype(model) == torch.float32 and model_float_dtype(nn.ReLU()) is None
    moved = prepared(Batch(inputs, torch.tensor([0, 1]), torch.ones(2, 1, dtype=torch.bool)), model)
    x = moved.inputs
    assert x["n"] == 3 and isinstance(x["pair"], tuple) and isinstance(x["pair"][1], list)
    assert all(t.device.type == "cpu" for t in (x["x"], x["pair"][0], x["pair"][1][0], x["ids"], moved.mask))
    assert x["x"].dtype == torch.float32 and x["ids"].dtype == torch.int64  # floats in the model's dtype, ids kept
    assert moved.labels.tolist() == [0, 1] and moved.mask.tolist() == [[True], [True]]
    half = prepared(Batch(torch.ones(2, 2), torch.tensor([0, 1])), model.to(torch.float64))
    assert half.inputs.dtype == torch.float64
    assert prepared(Batch(torch.ones(2, 2), torch.tensor([0, 1])), nn.ReLU()).inputs.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_with_cpu_data_matches_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    train, valid = _data(16), _data(8, seed=1)
    on_cpu = lp.probe(model, train, valid, layers="all", **FAST)
    on_gpu = lp.probe(model.cuda(), train, valid, layers="all", **FAST)
    assert [r.value for r in on_gpu.rows] == pytest.approx([r.value for r in on_cpu.rows], abs=1e-3)


def test_training_mode_model_is_probed_in_eval_mode_and_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    train, valid = _data(16), _data(8, seed=1)
    first = lp.probe(model, train, valid, layers="2", **FAST)
    second = lp.probe(model, train, valid, layers="2", **FAST)  # a fresh extraction: dropout would differ
    assert first.rows == second.rows
    assert first.meta["extracted_in_eval_mode"] and first.meta["model_was_training"]
    assert model.training and model[2].training and not model[1].training
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())  # BN statistics untouched


class FailsOnSecondBatch(nn.Module):
    """Raises between its two layers on the second forward."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.fc = nn.Linear(4, 4), nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.first(x)
        if self.calls == 2:
            raise RuntimeError("boom in the middle of the forward")
        return self.fc(h)


def test_a_forward_that_raises_leaves_no_hook_partial_file_or_lock(tmp_path) -> None:
    model = FailsOnSecondBatch()
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        lp.probe(model, _data(8), _data(8, seed=1), layers=["first", "fc"], cache_dir=tmp_path, batch_size=4, **FAST)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model.modules())
    (folder,) = (tmp_path / "features").iterdir()
    assert not list(folder.glob("*/*.partial-*")) and not list(folder.glob("*/rank*"))
    with FeatureCache(folder, folder.name).locked() as cache:  # the lock was released
        assert not cache.manifest["splits"]
