from __future__ import annotations

import pytest
import torch
from torch import nn

import linprobe as lp
from linprobe.capture.taps import LayerSelectionError, Taps, default_select, frozen, reduce_tokens, resolve_layers


def test_layer_names_registration_and_execution_order(small_net):
    assert lp.layer_names(small_net)[:3] == ["input", "head", "conv"]
    executed = lp.layer_names(small_net, torch.zeros(2, 1, 8, 8))
    assert executed[:4] == ["input", "conv", "act", "flatten"]
    assert executed[-1] == "head"
    assert executed.index("layer1.relu") < executed.index("layer1") < executed.index("layer2.fc")


def test_resolve_by_name_glob_type_and_all(small_net):
    assert resolve_layers(small_net, "layer1.fc") == ["layer1.fc"]
    assert resolve_layers(small_net, "layer*.relu") == ["layer1.relu", "layer2.relu"]
    assert resolve_layers(small_net, "layer*") == ["layer1", "layer2"]  # '*' does not cross dots
    assert resolve_layers(small_net, "**.relu") == ["layer1.relu", "layer2.relu"]
    assert resolve_layers(small_net, nn.ReLU) == ["act", "layer1.relu", "layer2.relu"]
    all_ = resolve_layers(small_net, "all")
    assert all_[0] == "input" and "layer1" in all_ and "layer1.fc" in all_  # every module, until the model runs
    with Taps(small_net, "all") as taps:
        taps.run(torch.zeros(3, 1, 8, 8))
    assert "layer1" not in taps.order and "layer1.relu" in taps.order and "head" in taps.order
    assert taps.plan.skipped == {"flatten": "the same tensor as act",  # a reshaping view: the same features
                                 "layer1": "the same tensor as layer1.relu", "layer2": "the same tensor as layer2.relu"}
    assert resolve_layers(small_net, ["input", "conv", "conv"]) == ["input", "conv"]


def test_unknown_name_lists_close_matches(small_net):
    with pytest.raises(LayerSelectionError, match=r"unknown layer 'layer1.rleu'.*closest: layer1.relu"):
        resolve_layers(small_net, "layer1.rleu")
    with pytest.raises(LayerSelectionError, match="pattern 'block\\*' matches no layer"):
        resolve_layers(small_net, "block*")
    with pytest.raises(LayerSelectionError, match="no module of type LSTM"):
        resolve_layers(small_net, nn.LSTM)


def test_taps_capture_detached_outputs_in_execution_order(small_net):
    x = torch.randn(5, 1, 8, 8, requires_grad=True)
    with Taps(small_net, ["head", "input", "layer1"]) as taps:
        feats = taps.run(x)
        assert list(feats) == ["input", "layer1", "head"]
        assert not any(f.requires_grad for f in feats.values())
        torch.testing.assert_close(feats["head"], small_net(x).detach())
        torch.testing.assert_close(feats["input"], x.detach())
    assert not small_net._forward_hooks and not small_net._forward_pre_hooks
    assert not any(m._forward_hooks for m in small_net.modules())


def test_stop_early_skips_the_rest_of_the_forward(small_net):
    calls = []
    small_net.head.register_forward_hook(lambda *a: calls.append(1))
    with Taps(small_net, ["layer1"]) as taps:
        taps.stop_early = True
        taps.run(torch.randn(3, 1, 8, 8))  # the first forward runs whole: it finds what runs, and how often
        assert calls == [1]
        feats = taps.run(torch.randn(3, 1, 8, 8))
    assert feats["layer1"].shape == (3, 32) and calls == [1]


def test_layer_that_never_runs_is_named():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    with Taps(Unused(), ["used", "spare"]) as taps:
        with pytest.raises(LayerSelectionError, match="spare.*did not run"):
            taps.run(torch.randn(2, 4))


def test_shared_module_gives_a_probe_per_call_or_follows_the_policy():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    model, x = Shared(), torch.randn(2, 3)
    with Taps(model, "fc") as taps:
        feats = taps.run(x)
    assert list(feats) == ["fc#0", "fc#1"]
    torch.testing.assert_close(feats["fc#0"], model.fc(x))
    torch.testing.assert_close(feats["fc#1"], model(x))
    with Taps(model, "fc#1") as taps:
        torch.testing.assert_close(taps.run(x)["fc#1"], model(x))
    with Taps(model, "fc", repeat="error") as taps, pytest.raises(LayerSelectionError, match="ran 2 times"):
        taps.run(x)
    with Taps(model, "fc", repeat="first") as taps:
        torch.testing.assert_close(taps.run(x)["fc"], model.fc(x))
    with Taps(model, "fc", repeat="last") as taps:
        torch.testing.assert_close(taps.run(x)["fc"], model(x))


def test_hooks_removed_when_forward_raises():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("boom")

    model = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        with Taps(model, "fc") as taps:
            taps.run(torch.randn(1, 2))
    assert not model.fc._forward_hooks and not model._forward_pre_hooks


def test_lstm_tuple_output_and_token_reduction():
    lstm = nn.LSTM(4, 6, batch_first=True)
    model = nn.Sequential()
    model.add_module("lstm", lstm)
    x = torch.randn(3, 5, 4)
    out, _ = lstm(x)
    for how, expected in (("mean", out.mean(1)), ("last", out[:, -1]), ("first", out[:, 0])):
        with Taps(model, "lstm", tokens=how) as taps:
            torch.testing.assert_close(taps.run(x)["lstm"], expected.detach())
    h_last = lstm(x)[1][0][-1].detach()
    with Taps(model, "lstm", select={"lstm": lambda o: o[1][0][-1]}) as taps:
        torch.testing.assert_close(taps.run(x)["lstm"], h_last)


def test_default_select_documented_cases():
    t = torch.ones(2)
    assert default_select(t) is t
    assert default_select((None, t)) is t
    assert default_select({"logits": t * 2, "last_hidden_state": t}) is t
    assert default_select({"a": 3, "b": t}) is t
    assert default_select("text") is None
    with pytest.raises(ValueError, match="tokens must be"):
        reduce_tokens(torch.ones(2, 3, 4), "max")  # type: ignore[arg-type]


def test_non_tensor_output_is_a_clear_error():
    class Text(nn.Module):
        def forward(self, x):
            return "not a tensor"

    model = nn.Sequential()
    model.add_module("text", Text())
    with Taps(model, "text") as taps, pytest.raises(LayerSelectionError, match="select="):
        taps.run(torch.ones(1))


def test_frozen_restores_each_module_mode(small_net):
    small_net.train()
    small_net.layer1.eval()
    with frozen(small_net):
        assert not any(m.training for m in small_net.modules())
        assert not torch.is_grad_enabled()
    assert small_net.training and small_net.layer2.training and not small_net.layer1.training


def test_collect_without_attach_says_to_attach():
    model = nn.Sequential(nn.Linear(3, 2))
    taps = Taps(model, ["0"])
    with pytest.raises(RuntimeError, match="not attached"):
        taps.run(torch.zeros(1, 3))
