"""torchvision-structured CNNs (shared in-place ReLU called several times per block, ``out += identity``,
downsample branches): every capture equals the one of a twin model without in-place ops."""
from __future__ import annotations

import pytest
import torch

import linprobe as lp
from benchmarks.resnet import BasicBlock, Bottleneck, ResNet
from linprobe.capture.taps import Taps


def _twins(block: type[BasicBlock | Bottleneck], depth: tuple[int, ...] = (1, 1, 1, 1)) -> tuple[ResNet, ResNet]:
    """A narrow torchvision-style ResNet and the same weights with no in-place op (the reference)."""
    torch.manual_seed(0)
    model = ResNet(block, depth, num_classes=10, small_input=True, width=8).eval()
    reference = ResNet(block, depth, num_classes=10, small_input=True, width=8, inplace=False).eval()
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):  # non-trivial batch-norm statistics, so pre- and post-ReLU values differ
        for bn in (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.linspace(-0.5, 0.5, len(bn.running_mean)))
    return model, reference


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("stop_early", [False, True])
def test_every_capture_equals_a_model_without_in_place_ops(block, stop_early):
    model, reference = _twins(block)
    x = torch.randn(30, 3, 16, 16)
    with Taps(model, "all") as taps, Taps(reference, "all") as ref, torch.no_grad():
        taps.stop_early = ref.stop_early = stop_early
        for i in range(3):  # the first (discovering) forward, then planned ones
            got, want = taps.run(x[10 * i:10 * i + 10]), ref.run(x[10 * i:10 * i + 10])
            assert list(got) == list(want)
            assert all(torch.equal(got[n], want[n]) for n in got), [n for n in got if not torch.equal(got[n], want[n])]
    relus = [n for n in taps.order if ".relu#" in n]
    assert "layer1.0.relu#0" in relus and "layer1.0.relu#1" in relus  # the shared ReLU: one capture per call
    assert "layer1.0.bn1" in taps.plan.mutable and "layer1.0.bn1" in taps.order
    assert got["layer1.0.bn1"].min() < 0  # before the in-place ReLU, as it was at the hook
    assert taps.plan.skipped["layer1.0"] == f"the same tensor as layer1.0.relu#{2 if block is Bottleneck else 1}"


def test_one_tap_before_an_in_place_relu_is_the_same_in_every_batch():
    model, reference = _twins(BasicBlock)
    x = torch.randn(12, 3, 16, 16)
    with Taps(model, "bn1") as taps, torch.no_grad():
        taps.stop_early = True
        batches = [taps.run(x[i:i + 4])["bn1"] for i in (0, 4, 8)]
    want = reference.bn1(reference.conv1(x))
    torch.testing.assert_close(torch.cat(batches), want, rtol=0, atol=0)
    assert want.min() < 0


def test_probe_all_on_resnet18_gives_the_reference_models_numbers(tmp_path):
    model, reference = _twins(BasicBlock, (2, 2, 2, 2))  # ResNet-18's structure, narrow
    g = torch.Generator().manual_seed(1)
    x = torch.randn(240, 3, 16, 16, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    splits = (x[:160], y[:160]), (x[160:200], y[160:200]), (x[200:], y[200:])
    kw = dict(layers="all", l2_path=(1.0, 0.1), batch_size=32, progress=False, plot=False)
    got = lp.probe(model, *splits[:2], test=splits[2], cache_dir=tmp_path / "a", **kw)
    want = lp.probe(reference, *splits[:2], test=splits[2], cache_dir=tmp_path / "b", **kw)
    assert [i.name for i in got.layers] == [i.name for i in want.layers]
    assert got.table() == want.table()
    assert "layer1.0.relu#1" in got.errors("test") and "layer1.0" in got.meta["skipped"]
    assert len(got.layers) == 60  # input, conv1/bn1/relu, 8 blocks x 6 (relu twice), 3 downsamples x 2, avgpool, fc
    assert got.errors("test")["input"] < 0.7  # the labels are linear in the input (chance: 0.75)


def test_an_in_place_change_first_seen_in_a_later_batch_is_caught_and_the_batch_run_again():
    class Sometimes(torch.nn.Module):
        """Changes its layer's output in place only for some inputs."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            if bool(x[0, 0] > 0):
                h.relu_()
            return h * 2

    model, x = Sometimes(), torch.randn(8, 3)
    x[:4, 0], x[4:, 0] = -1.0, 1.0
    with Taps(model, "fc") as taps, torch.no_grad():
        taps.run(x[:4])  # the first forward changes nothing in place
        assert not taps.plan.mutable
        got = taps.run(x[4:])
        want = model.fc(x[4:])
    torch.testing.assert_close(got["fc"], want, rtol=0, atol=0)
    assert want.min() < 0 and taps.plan.mutable == {"fc"}


def test_a_sink_receives_each_capture_before_the_model_changes_it():
    model, reference = _twins(BasicBlock)
    x = torch.randn(8, 3, 16, 16)
    got: dict[str, torch.Tensor] = {}
    with Taps(model, "all") as taps, torch.no_grad():
        taps.run(x[:4])
        taps.sink = lambda name, h: got.__setitem__(name, h.clone())  # a copy: a sink may keep nothing it is given
        assert taps.run(x[4:]) == {}
    with Taps(reference, "all") as ref, torch.no_grad():
        ref.run(x[:4])
        want = ref.run(x[4:])
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
