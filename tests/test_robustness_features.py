"""Robustness, features: NaN and Inf, constant features, layers of millions of features, integer and half outputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import linprobe as lp
from linprobe.capture.reduce import parse_reduction

FAST = {"l2_path": (1.0,), "progress": False}


class Fn(nn.Module):
    """A layer that applies a function, so tests can build odd outputs."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Branches(nn.Module):
    """Parallel layers on the same input; the model's output is all of them."""

    def __init__(self, **layers: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer in self.children())


def _data(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable classes; columns 0 and 1 are positive and non-zero, so log and 1/x are finite."""
    y = torch.arange(n) % 2
    x = torch.rand(n, 4, generator=torch.Generator().manual_seed(seed)) + 0.5
    x[:, 2] += 2 * y
    return x, y


def test_nan_and_inf_layers_are_invalid_and_the_others_unaffected(tmp_path) -> None:
    train, valid = _data(12), _data(8, seed=1)
    train[0][5, 0] = -1.0  # log -> NaN at sample 5 (batch 1 of 4 samples)
    valid[0][2, 1] = 0.0  # 1/x -> Inf at sample 2 of valid
    model = Branches(fc=nn.Linear(4, 3), log=Fn(lambda x: x[:, :1].log()), inv=Fn(lambda x: 1 / x[:, 1:2]))
    result = lp.probe(model, train, valid, _data(8, seed=2), layers=["fc", "log", "inv"], batch_size=4,
                      out_dir=tmp_path, **FAST)
    assert result.meta["invalid"] == {"log": "NaN at sample 5 of the train split (batch 1)",
                                      "inv": "Inf at sample 2 of the valid split (batch 0)"}
    assert result.value("log", "train", "invalid") == 5 and result.value("inv", "valid", "invalid") == 2
    assert result.probes.layers == ["fc"] and [i.l2 for i in result.layers] == [1.0, None, None]
    assert "log" in result.table() and (tmp_path / "errors.png").exists()
    alone = lp.probe(model, train, valid, _data(8, seed=2), layers="fc", batch_size=4, **FAST)
    assert [r for r in result.rows if r.layer == "fc"] == alone.rows


def test_float16_overflow_is_invalid_not_silently_infinite() -> None:
    model = Branches(fc=nn.Linear(4, 3), big=Fn(lambda x: x * 1e5))
    result = lp.probe(model, _data(8), _data(8, seed=1), layers=["fc", "big"], dtype="float16", **FAST)
    assert "beyond the range of torch.float16" in result.meta["invalid"]["big"]
    assert result.probes.layers == ["fc"]


def test_constant_features_give_finite_chance_level_results() -> None:
    model = Branches(zeros=Fn(lambda x: x * 0), sevens=Fn(lambda x: x * 0 + 7))
    result = lp.probe(model, _data(8), _data(8, seed=1), layers=["zeros", "sevens"], **FAST)
    for layer in ("zeros", "sevens"):
        assert result.value(layer, "valid") == pytest.approx(0.5)
        assert result.value(layer, "valid", "cross_entropy") == pytest.approx(math.log(2), abs=1e-3)


def test_a_layer_of_millions_of_features_is_reduced_by_the_budget(tmp_path) -> None:
    x = torch.rand(6, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    x[y == 1] += 0.5
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Flatten())  # 32 x 256 x 256 = 2,097,152 features
    result = lp.probe(model, (x[:4], y[:4]), (x[4:], y[4:]), layers=["0", "1"], cache_dir=tmp_path, **FAST)
    conv, flat = result.layers
    assert conv.features_in == flat.features_in == 2_097_152
    assert conv.features_out == flat.features_out == 8192
    assert "2097152->8192  pool 16x16" in result.table() and "subset 8192/2097152" in result.table()
    stored = [p.stat().st_size for p in tmp_path.glob("features/*/*/*/layer-*.npy")]
    assert stored and max(stored) < 4 * 8192 * 4 + 1024  # the cache holds reduced features only


def test_integer_bool_and_half_outputs_are_probed_as_float32() -> None:
    model = Branches(ints=Fn(lambda x: (x * 4).long()), bools=Fn(lambda x: x > 1.5), halves=Fn(lambda x: x.half()),
                     floats=Fn(lambda x: x.half().float()))
    result = lp.probe(model, _data(8), _data(8, seed=1), layers=["ints", "bools", "halves", "floats"], **FAST)
    assert [i.features_out for i in result.layers] == [4, 4, 4, 4]
    assert all(np.isfinite(r.value) for r in result.rows)
    values = {layer: [r.value for r in result.rows if r.layer == layer] for layer in ("halves", "floats")}
    assert values["halves"] == values["floats"]


def test_reductions_that_cannot_fit_in_memory_or_are_empty_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match=r"project 2097152->8192 needs a 64.0 GiB random matrix.*'subset:K'"):
        parse_reduction("project:8192", (32, 256, 256))
    with pytest.raises(ValueError, match="positive number of features, got 0"):
        parse_reduction("auto", (32, 256, 256), budget=0)
    for spec in ("subset:0", "pool:0", "pool:x", "project:-3"):
        with pytest.raises(ValueError, match="K a positive integer"):
            parse_reduction(spec, (3, 8, 8))
