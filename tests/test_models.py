"""The paper's models: shapes at every named probe point, seeded init, variants and heads."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import linprobe as lp
from linprobe.models import (
    MNIST_CONVNET_PROBES,
    Bottleneck,
    deep_mlp,
    inception_layout,
    inception_probe_points,
    mnist_convnet,
    mnist_convnet_l2_params,
    resnet_probe_points,
    small_inception,
    small_resnet,
    toy_mlp,
)

BATCH = 3
IMAGES = torch.randn(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(1))
FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "toy_mlp": toy_mlp,
    "deep_mlp_plain": lambda **kw: deep_mlp(variant="plain", **kw),
    "deep_mlp_aux": lambda **kw: deep_mlp(variant="aux", **kw),
    "deep_mlp_skip": lambda **kw: deep_mlp(variant="skip", **kw),
    "mnist_convnet": mnist_convnet,
    "small_resnet": small_resnet,
    "small_inception": small_inception,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Batches of three are too small to gain from threads, and a busy second core makes them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def output_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Run ``model`` once in eval mode with a forward hook on each named submodule; their output shapes."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:  # None: output unchanged
            shapes[name] = tuple(out.shape)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def hidden(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Output of ``layer{k}`` of an MLP, computed by chaining its blocks by hand."""
    h = x
    for i in range(1, k + 1):
        h = model.get_submodule(f"layer{i}")(h)
    return h


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------ seeding


@pytest.mark.parametrize("name", FACTORIES)
def test_seeded_init_is_reproducible_and_leaves_global_rng_alone(name: str) -> None:
    factory = FACTORIES[name]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = factory(seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(456)  # a different global state must not matter
    b = factory(seed=7)
    c = factory(seed=torch.Generator().manual_seed(7))
    d = factory(seed=8)
    assert same_state(a, b) and same_state(a, c)
    assert not same_state(a, d)
    assert all(torch.isfinite(v.float()).all() for v in a.state_dict().values())


def test_seed_none_draws_fresh_entropy_without_touching_global_rng() -> None:
    before = torch.random.get_rng_state()
    a, b = toy_mlp(depth=2, seed=None), toy_mlp(depth=2, seed=None)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not same_state(a, b)


# ------------------------------------------------------------------------------------ MLPs


def test_toy_mlp_layers_are_post_activation_and_output_last_hidden() -> None:
    model = toy_mlp(seed=0)
    x = torch.randn(BATCH, 128)
    names = [f"layer{k}" for k in range(1, 33)]
    assert output_shapes(model, names, x) == {n: (BATCH, 128) for n in names}
    block = model.layer1
    assert isinstance(block[0], nn.Linear) and isinstance(block[1], nn.LeakyReLU)
    assert block[1].negative_slope == 0.5
    assert torch.equal(model(x), hidden(model, x, 32))
    assert not hasattr(model, "layer33") and model.classifier is None


def test_mlp_init_is_glorot_normal_with_zero_bias() -> None:
    model = deep_mlp(seed=0)
    weights = torch.cat([model.get_submodule(f"layer{k}")[0].weight.flatten() for k in range(2, 129)])
    assert weights.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.02)
    assert weights.mean().abs().item() < 1e-3
    assert all(not m.bias.any() for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("variant", ["plain", "aux", "skip"])
def test_deep_mlp_shapes_and_taps(variant: str) -> None:
    model = deep_mlp(variant=variant, seed=0)
    names = [f"layer{k}" for k in range(1, 129)] + ["classifier"]
    expected = {n: (BATCH, 128) for n in names} | {"classifier": (BATCH, 10)}
    assert output_shapes(model, names, IMAGES) == expected
    assert torch.equal(model(IMAGES), model(IMAGES.flatten(1)))  # images and flat vectors alike


def test_deep_mlp_skip_feeds_the_input_to_layer64() -> None:
    skip, plain = deep_mlp(variant="skip", seed=0), deep_mlp(variant="plain", seed=0)
    assert skip.layer64[0].in_features == 128 + 784
    assert {skip.get_submodule(f"layer{k}")[0].in_features for k in range(2, 129) if k != 64} == {128}
    assert skip.layer1[0].in_features == 784

    def layer64_with_layer63_fixed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        fixed = torch.ones(len(x), 128)
        captured: list[torch.Tensor] = []
        h63 = model.layer63.register_forward_hook(lambda *_: fixed)  # a hook's return value replaces the output
        h64 = model.layer64.register_forward_hook(lambda _m, _i, out: captured.append(out))
        with torch.no_grad():
            model(x)
        h63.remove()
        h64.remove()
        return captured[0]

    x1, x2 = IMAGES, IMAGES.flip(0)
    assert not torch.allclose(layer64_with_layer63_fixed(skip, x1), layer64_with_layer63_fixed(skip, x2))
    assert torch.equal(layer64_with_layer63_fixed(plain, x1), layer64_with_layer63_fixed(plain, x2))


def test_deep_mlp_aux_heads_every_16_layers_and_their_logits() -> None:
    model = deep_mlp(variant="aux", seed=0)
    expected = [f"layer{k}" for k in (16, 32, 48, 64, 80, 96, 112)]
    assert list(model.aux_heads) == expected
    logits = model(IMAGES)
    assert logits.shape == (BATCH, 10)
    assert list(model.aux_logits) == expected
    assert all(a.shape == (BATCH, 10) for a in model.aux_logits.values())
    assert torch.equal(model.aux_logits["layer16"], model.aux_heads["layer16"](hidden(model, IMAGES.flatten(1), 16)))
    y = torch.arange(BATCH)
    loss = F.cross_entropy(logits, y) + sum(F.cross_entropy(a, y) for a in model.aux_logits.values())
    loss.backward()
    assert model.aux_heads["layer16"].weight.grad is not None
    clone = copy.deepcopy(model)  # stored non-leaf logits must not break checkpoint copies
    assert clone.aux_logits == {} and same_state(clone, model)


@pytest.mark.parametrize("variant", ["plain", "skip"])
def test_deep_mlp_without_aux_has_no_aux_logits(variant: str) -> None:
    model = deep_mlp(variant=variant, seed=0)
    model(IMAGES)
    assert model.aux_logits == {} and len(model.aux_heads) == 0


def test_deep_mlp_invalid_variant_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'plain', 'aux', 'skip'.*'resnet'"):
        deep_mlp(variant="resnet")


# ------------------------------------------------------------------------------- MNIST convnet


def test_mnist_convnet_probe_points_and_shapes() -> None:
    model = mnist_convnet(seed=0)
    assert MNIST_CONVNET_PROBES[0] == "input" and len(MNIST_CONVNET_PROBES) == 10
    expected = {
        "conv1_preact": (32, 28, 28),
        "conv1_postact": (32, 28, 28),
        "conv1_postpool": (32, 14, 14),
        "conv2_preact": (64, 14, 14),
        "conv2_postact": (64, 14, 14),
        "conv2_postpool": (64, 7, 7),
        "flatten": (3136,),
        "fc1_preact": (512,),
        "fc1_postact": (512,),
        "dropout": (512,),
        "logits": (10,),
    }
    assert [n for n, _ in model.named_children()] == list(expected)
    assert set(MNIST_CONVNET_PROBES[1:]) <= set(expected)
    assert output_shapes(model, list(expected), IMAGES) == {n: (BATCH, *s) for n, s in expected.items()}
    for name, kind in [("conv1_preact", nn.Conv2d), ("conv1_postact", nn.ReLU), ("conv1_postpool", nn.MaxPool2d),
                       ("fc1_preact", nn.Linear), ("dropout", nn.Dropout), ("logits", nn.Linear)]:
        assert isinstance(model.get_submodule(name), kind)


def test_mnist_convnet_parameter_counts_match_the_tf_tutorial() -> None:
    model = mnist_convnet(seed=0)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    counts = {n: c for n, c in counts.items() if c}
    assert counts == {
        "conv1_preact": 5 * 5 * 1 * 32 + 32,
        "conv2_preact": 5 * 5 * 32 * 64 + 64,
        "fc1_preact": 3136 * 512 + 512,
        "logits": 512 * 10 + 10,
    }


def test_mnist_convnet_tf_tutorial_init_and_l2_params() -> None:
    model = mnist_convnet(seed=0)
    weights = torch.cat([model.get_submodule(n).weight.flatten() for n in ("conv2_preact", "fc1_preact")])
    assert weights.abs().max().item() <= 0.2  # truncated at two standard deviations
    assert weights.std().item() == pytest.approx(0.1 * 0.8796, rel=0.02)  # std of a 2-sigma truncated normal
    assert not model.conv1_preact.bias.any()
    for name in ("conv2_preact", "fc1_preact", "logits"):
        assert torch.all(model.get_submodule(name).bias == 0.1)
    l2 = mnist_convnet_l2_params(model)
    expected = [model.fc1_preact.weight, model.fc1_preact.bias, model.logits.weight, model.logits.bias]
    assert len(l2) == 4 and all(a is b for a, b in zip(l2, expected))


# ------------------------------------------------------------------------------------ ResNet


@pytest.mark.parametrize(("stem_stride", "grids"), [(2, (14, 7, 4, 2)), (1, (28, 14, 7, 4))])
def test_small_resnet_has_16_blocks_with_resnet50_stage_layout(stem_stride: int, grids: tuple[int, ...]) -> None:
    model = small_resnet(stem_stride=stem_stride, seed=0)
    points = resnet_probe_points(model)
    assert points == ["input"] + [f"add_{k}" for k in range(1, 17)]
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 16
    stage_of_block = [0] * 3 + [1] * 4 + [2] * 6 + [3] * 3
    expected = {f"add_{k}": (BATCH, 4 * (8 << s), grids[s], grids[s]) for k, s in enumerate(stage_of_block, 1)}
    assert output_shapes(model, points[1:] + ["fc"], IMAGES) == expected | {"fc": (BATCH, 10)}
    projected = [n for n in points[1:] if isinstance(model.get_submodule(n).shortcut, nn.Sequential)]
    assert projected == ["add_1", "add_4", "add_8", "add_14"]


def test_resnet_probe_points_before_relu_tap_the_sum_of_each_block() -> None:
    model = small_resnet(seed=0).eval()
    sums = resnet_probe_points(model, before_relu=True)
    assert sums == ["input"] + [f"add_{k}.relu:input" for k in range(1, 17)]
    with torch.no_grad(), lp.Taps(model, [*sums[1:3], "add_1", "add_2"]) as taps:
        features = taps.run(IMAGES)
    block = model.get_submodule("add_2")
    with torch.no_grad():
        expected = block.shortcut(features["add_1"]) + block.residual(features["add_1"])
    torch.testing.assert_close(features["add_2.relu:input"], expected)  # Keras' add_2: the sum, before the ReLU
    assert (features["add_2.relu:input"] < 0).any()  # values the ReLU removes
    torch.testing.assert_close(torch.relu(features["add_1.relu:input"]), features["add_1"])


def test_small_resnet_trains() -> None:
    model = small_resnet(seed=0)
    model.train()
    F.cross_entropy(model(IMAGES), torch.arange(BATCH)).backward()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------------- Inception


def test_small_inception_probe_points_layout_and_shapes() -> None:
    model = small_inception(seed=0)
    points = inception_probe_points(model)
    layout = inception_layout(model)
    assert len(points) == 17 and points[0] == "input" and points[-1] == "logits"
    assert [n for n, _ in layout] == points
    assert [n for n, where in layout if where == "aux"] == ["aux_conv", "aux_head"]
    branch = points.index("aux_conv") - 1
    assert layout[branch] == (model.branch_point, "main")
    shapes = output_shapes(model, points[1:], IMAGES)
    assert shapes["aux_head"] == shapes["logits"] == (BATCH, 10)
    assert shapes["conv1"][2:] == shapes["mixed_3b"][2:] == (14, 14)
    assert shapes[model.branch_point][2:] == (7, 7) and shapes["mixed_5b"][2:] == (4, 4)


def test_small_inception_hooks_fire_in_layout_order_and_aux_logits_are_exposed() -> None:
    model = small_inception(seed=0)
    points = inception_probe_points(model)[1:]
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_hook(lambda *_, n=n: order.append(n)) for n in points]
    model.train()
    logits = model(IMAGES)
    for h in handles:
        h.remove()
    assert order == points
    assert list(model.aux_logits) == ["aux_head"]
    assert model.aux_logits["aux_head"].shape == logits.shape == (BATCH, 10)
    y = torch.arange(BATCH)
    (F.cross_entropy(logits, y) + F.cross_entropy(model.aux_logits["aux_head"], y)).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert copy.deepcopy(model).aux_logits == {}
