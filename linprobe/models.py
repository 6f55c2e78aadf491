"""The paper's models, with submodule names equal to its probe points.

Every probe point other than ``"input"`` (the model's own input, which :mod:`linprobe.capture.taps` handles)
is a top-level submodule, so a forward hook on ``model.get_submodule(name)`` captures exactly that
point. Factories build the model on the meta device and initialise it from a local
``torch.Generator``, so construction never reads or advances the global RNG.

Models with auxiliary heads (``deep_mlp(variant="aux")``, ``small_inception``) keep ``model(x)``
returning the main logits and store the auxiliary logits of the last forward in
``model.aux_logits: dict[str, Tensor]`` (empty when there are none); a training loop adds
``sum(F.cross_entropy(a, y) for a in getattr(model, "aux_logits", {}).values())`` to its loss.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)
Seed = int | torch.Generator | None
InitFn = Callable[[nn.Module, torch.Generator], bool]

MNIST_CONVNET_PROBES = (
    "input",
    "conv1_preact",
    "conv1_postact",
    "conv1_postpool",
    "conv2_preact",
    "conv2_postact",
    "conv2_postpool",
    "fc1_preact",
    "fc1_postact",
    "logits",
)
DEEP_MLP_VARIANTS = ("plain", "aux", "skip")
_INCEPTION_AUX = ("aux_conv", "aux_head")


def _generator(seed: Seed) -> torch.Generator:
    """A generator from an int seed, an existing generator, or fresh OS entropy for ``None``."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _default_init(module: nn.Module, g: torch.Generator) -> bool:
    """Glorot normal for Linear, He normal (fan-out) for Conv2d, zero biases, unit BatchNorm."""
    if isinstance(module, nn.BatchNorm2d):
        module.reset_parameters()
        return True
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight, generator=g)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=g)
    else:
        return False
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return True


def _tf_tutorial_init(module: nn.Module, g: torch.Generator) -> bool:
    """TF MNIST tutorial: weights truncated normal (std 0.1, cut at 2 std), biases 0.1."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    nn.init.trunc_normal_(module.weight, std=0.1, a=-0.2, b=0.2, generator=g)
    nn.init.constant_(cast(torch.Tensor, module.bias), 0.1)  # the tutorial's layers all have biases
    return True


def _build(factory: Callable[[], M], seed: Seed, init: InitFn = _default_init) -> M:
    """Construct on the meta device (no global RNG draws), materialise on CPU, init from ``seed``.

    ``init`` returns whether it handled a module; an unhandled one that owns tensors is an error,
    so no parameter or buffer is ever left uninitialised.
    """
    with torch.device("meta"):
        model = factory()
    model.to_empty(device="cpu")
    g = _generator(seed)
    for module in model.modules():
        owns_tensors = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        )
        if not init(module, g) and owns_tensors:
            raise TypeError(f"no init rule for {type(module).__name__}")
    return model


class _WithAuxLogits(nn.Module):
    """Base for models that keep the auxiliary logits of their last forward in ``aux_logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.aux_logits: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict[str, object]:
        """Drop the stored logits (non-leaf tensors) so ``copy.deepcopy`` and pickling work."""
        # torch's nn.Module.__getstate__ has no annotations (through super(), untyped_calls_exclude misses it)
        return {**super().__getstate__(), "aux_logits": {}}  # type: ignore[no-untyped-call]


# ----------------------------------------------------------------------------------------- MLPs


class MLP(_WithAuxLogits):
    """Stack of ``Linear + LeakyReLU(0.5)`` blocks ``layer1..layerN`` with optional heads and skip.

    ``skip_to=k`` feeds layer k the concatenation of layer k-1's output and the flattened input.
    ``aux_layers`` get trained linear heads (not probes) in ``aux_heads``, keyed by layer name;
    without ``num_classes`` the output is the last hidden layer. Build it with :func:`toy_mlp` or
    :func:`deep_mlp`, which seed the init.
    """

    def __init__(
        self,
        *,
        depth: int,
        width: int,
        in_features: int,
        num_classes: int | None,
        aux_layers: Sequence[int] = (),
        skip_to: int | None = None,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.layer_names = tuple(f"layer{k}" for k in range(1, depth + 1))
        self.skip_to = skip_to
        for k, name in enumerate(self.layer_names, 1):
            fan_in = in_features if k == 1 else width + (in_features if k == skip_to else 0)
            self.add_module(name, nn.Sequential(nn.Linear(fan_in, width), nn.LeakyReLU(0.5)))
        # aux heads need num_classes (with None, nn.Linear raises as before)
        self.aux_heads = nn.ModuleDict({f"layer{k}": nn.Linear(width, cast(int, num_classes)) for k in aux_layers})
        self.classifier = nn.Linear(width, num_classes) if num_classes is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        h = x
        aux: dict[str, torch.Tensor] = {}
        for k, name in enumerate(self.layer_names, 1):
            if k == self.skip_to:
                h = torch.cat([h, x], dim=1)
            h = self.get_submodule(name)(h)
            if name in self.aux_heads:
                aux[name] = self.aux_heads[name](h)
        self.aux_logits = aux
        return h if self.classifier is None else self.classifier(h)


def toy_mlp(*, depth: int = 32, width: int = 128, in_features: int = 128, seed: Seed = 0) -> MLP:
    """Untrained MLP of the toy experiment (002, Fig. 3); returns the last hidden layer."""
    return _build(lambda: MLP(depth=depth, width=width, in_features=in_features, num_classes=None), seed)


def deep_mlp(
    *,
    variant: str = "plain",
    depth: int = 128,
    width: int = 128,
    in_features: int = 784,
    num_classes: int = 10,
    aux_every: int = 16,
    skip_to: int = 64,
    seed: Seed = 0,
) -> MLP:
    """The pathologically deep MLP of 002 Sec. 3.4: ``plain``, ``aux`` (Fig. 7) or ``skip`` (Fig. 8).

    ``aux`` puts a head after layers ``aux_every, 2*aux_every, ...`` below ``depth``; with the main
    ``classifier`` after layer ``depth`` that is one loss every ``aux_every`` layers, as 002 describes
    (003's code, 0-based ``i % 16 == 0``, is off by one: heads after layers 1, 17, ..., 113 and 128).
    ``skip`` concatenates the flattened input to layer ``skip_to``'s input (002; 003 adds instead).
    """
    if variant not in DEEP_MLP_VARIANTS:
        raise ValueError(f"variant must be one of {DEEP_MLP_VARIANTS}, got {variant!r}")
    if variant == "aux" and not 1 <= aux_every <= depth:
        raise ValueError(f"aux_every must be in [1, {depth}], got {aux_every}")
    if variant == "skip" and not 2 <= skip_to <= depth:
        raise ValueError(f"skip_to must be in [2, {depth}], got {skip_to}")
    aux_layers = range(aux_every, depth, aux_every) if variant == "aux" else ()
    return _build(
        lambda: MLP(
            depth=depth,
            width=width,
            in_features=in_features,
            num_classes=num_classes,
            aux_layers=aux_layers,
            skip_to=skip_to if variant == "skip" else None,
        ),
        seed,
    )


# ---------------------------------------------------------------------------------- MNIST convnet


def mnist_convnet(*, seed: Seed = 0) -> nn.Sequential:
    """The TensorFlow MNIST tutorial convnet (001 Fig. 2, 003 Fig5.py), one submodule per probe point.

    Initialised like the tutorial (conv1 bias 0, the other biases 0.1); dropout is its own module
    after ``fc1_postact``, so that probe sees the activations without dropout, as in eval mode.
    """

    def factory() -> nn.Sequential:
        return nn.Sequential(
            OrderedDict(
                conv1_preact=nn.Conv2d(1, 32, 5, padding="same"),
                conv1_postact=nn.ReLU(),
                conv1_postpool=nn.MaxPool2d(2),
                conv2_preact=nn.Conv2d(32, 64, 5, padding="same"),
                conv2_postact=nn.ReLU(),
                conv2_postpool=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                fc1_preact=nn.Linear(7 * 7 * 64, 512),
                fc1_postact=nn.ReLU(),
                dropout=nn.Dropout(0.5),
                logits=nn.Linear(512, 10),
            )
        )

    model = _build(factory, seed, _tf_tutorial_init)
    nn.init.zeros_(model.get_parameter("conv1_preact.bias"))
    return model


def mnist_convnet_l2_params(model: nn.Module) -> list[nn.Parameter]:
    """The fully connected weights and biases the tutorial penalises: ``loss += 5e-4 * sum(p^2) / 2``."""
    return [p for name in ("fc1_preact", "logits") for p in model.get_submodule(name).parameters()]


# ------------------------------------------------------------------------- ResNet and Inception


def _conv_bn(c_in: int, c_out: int, kernel: int, *, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """Bias-free conv with 'same'-style padding, BatchNorm and optionally ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 reduce, 3x3, 1x1 expand x4); outputs relu(shortcut(x) + r(x)).

    The stride sits on the 3x3 conv (torchvision's "v1.5"; Keras' ResNet-50 strides the first 1x1).
    """

    expansion = 4

    def __init__(self, c_in: int, width: int, *, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.residual = nn.Sequential(
            _conv_bn(c_in, width, 1),
            _conv_bn(width, width, 3, stride=stride),
            _conv_bn(width, c_out, 1, relu=False),
        )
        needs_projection = stride != 1 or c_in != c_out
        self.shortcut = (
            _conv_bn(c_in, c_out, 1, stride=stride, relu=False) if needs_projection else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.shortcut(x) + self.residual(x))
        return out


def small_resnet(
    *,
    blocks: Sequence[int] = (3, 4, 6, 3),
    widths: Sequence[int] = (8, 16, 32, 64),
    in_channels: int = 1,
    num_classes: int = 10,
    stem_stride: int = 2,
    seed: Seed = 0,
) -> nn.Sequential:
    """ResNet-50's stage layout scaled to 28x28 grayscale: one 3x3 stem conv, no max-pool.

    Blocks ``add_1..add_16`` are named like the rows of 001 Table 4a and output the post-addition
    ReLU; block output channels are ``4 * widths``. The stride-2 stem plays the role of ResNet-50's
    4x stem reduction (grids 14, 7, 4, 2) and keeps an epoch on CPU near the MNIST convnet's cost;
    ``stem_stride=1`` keeps 28x28 for stage 1 (grids 28, 14, 7, 4) at about three times the cost.
    """
    if len(blocks) != len(widths):
        raise ValueError(f"blocks and widths differ in length: {len(blocks)} vs {len(widths)}")

    def factory() -> nn.Sequential:
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=_conv_bn(in_channels, widths[0], 3, stride=stem_stride))
        plan = [(w, 2 if stage and i == 0 else 1) for stage, (n, w) in enumerate(zip(blocks, widths)) for i in range(n)]
        c_in = widths[0]
        for k, (width, stride) in enumerate(plan, 1):
            layers[f"add_{k}"] = Bottleneck(c_in, width, stride=stride)
            c_in = width * Bottleneck.expansion
        layers["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        layers["fc"] = nn.Linear(c_in, num_classes)
        return nn.Sequential(layers)

    return _build(factory, seed)


def resnet_probe_points(model: nn.Module, *, before_relu: bool = False) -> list[str]:
    """``input`` followed by a tap on each residual block in order: the block's output (after its ReLU), or with
    ``before_relu`` the sum itself, the input of the block's ReLU (``add_k.relu:input``), where 001's Keras
    ResNet-50 has its ``add_k`` layers."""
    blocks = [name for name, m in model.named_children() if isinstance(m, Bottleneck)]
    return ["input", *(f"{name}.relu:input" if before_relu else name for name in blocks)]


class Mixed(nn.Module):
    """Inception module: 1x1, 1x1->3x3, 1x1->3x3->3x3 (a factorised 5x5) and pool->1x1, concatenated."""

    def __init__(self, c_in: int, c1: int, c3: tuple[int, int], c5: tuple[int, int], c_pool: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn(c_in, c1, 1)
        self.branch3 = nn.Sequential(_conv_bn(c_in, c3[0], 1), _conv_bn(c3[0], c3[1], 3))
        self.branch5 = nn.Sequential(
            _conv_bn(c_in, c5[0], 1), _conv_bn(c5[0], c5[1], 3), _conv_bn(c5[1], c5[1], 3)
        )
        # 1x1 conv then 3x3 average pool: equal to pool-then-project (both linear), but pools fewer channels.
        proj = _conv_bn(c_in, c_pool, 1)
        self.branch_pool = nn.Sequential(proj[0], nn.AvgPool2d(3, stride=1, padding=1), *cast(nn.Sequential, proj[1:]))
        self.out_channels = c1 + c3[1] + c5[1] + c_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1, self.branch3, self.branch5, self.branch_pool)
        return torch.cat([b(x) for b in branches], dim=1)


class SmallInception(_WithAuxLogits):
    """An Inception-v3-style net for 28x28 grayscale: grids 14 -> 7 -> 4, auxiliary head off ``mixed_4d``.

    Like v3 (001 Fig. 8) the stem starts with a stride-2 conv and the auxiliary branch leaves at the
    end of the middle grid. Main-path names in execution order are ``main_path``; the branch
    ``aux_conv -> aux_head`` runs right after ``branch_point`` and its logits land in
    ``aux_logits["aux_head"]``. Build it with :func:`small_inception`, which seeds the init.
    """

    branch_point = "mixed_4d"

    def __init__(self, *, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv_bn(1, 24, 3, stride=2)  # 14x14
        self.conv2 = _conv_bn(24, 32, 3)
        self.mixed_3a = Mixed(32, 16, (16, 16), (4, 8), 8)
        self.mixed_3b = Mixed(self.mixed_3a.out_channels, 16, (16, 24), (8, 12), 12)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)  # 7x7
        self.mixed_4a = Mixed(self.mixed_3b.out_channels, 32, (24, 48), (8, 16), 16)
        self.mixed_4b = Mixed(self.mixed_4a.out_channels, 32, (24, 48), (8, 16), 16)
        self.mixed_4c = Mixed(self.mixed_4b.out_channels, 32, (24, 48), (8, 16), 16)
        self.mixed_4d = Mixed(self.mixed_4c.out_channels, 32, (24, 48), (8, 16), 16)
        self.aux_conv = nn.Sequential(nn.AvgPool2d(3, stride=2), _conv_bn(self.mixed_4d.out_channels, 32, 1))  # 3x3
        self.aux_head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 3 * 3, num_classes))
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)  # 4x4
        self.mixed_5a = Mixed(self.mixed_4d.out_channels, 48, (32, 64), (12, 24), 24)
        self.mixed_5b = Mixed(self.mixed_5a.out_channels, 64, (32, 64), (12, 24), 24)
        self.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.logits = nn.Linear(self.mixed_5b.out_channels, num_classes)
        self.main_path = tuple(name for name, _ in self.named_children() if name not in _INCEPTION_AUX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.main_path:
            x = self.get_submodule(name)(x)
            if name == self.branch_point:
                self.aux_logits = {"aux_head": self.aux_head(self.aux_conv(x))}
        return x


def small_inception(*, num_classes: int = 10, seed: Seed = 0) -> SmallInception:
    """A small Inception-style network (001 Fig. 5/8/9) for 28x28 grayscale, 17 probe points."""
    return _build(lambda: SmallInception(num_classes=num_classes), seed)


def inception_layout(model: SmallInception) -> list[tuple[str, str]]:
    """Each probe point in execution order with ``"main"`` or ``"aux"``; aux follows its branch point."""
    layout = [("input", "main")]
    for name in model.main_path:
        layout.append((name, "main"))
        if name == model.branch_point:
            layout.extend((aux, "aux") for aux in _INCEPTION_AUX)
    return layout


def inception_probe_points(model: SmallInception) -> list[str]:
    """Probe point names of :func:`small_inception` in execution order."""
    return [name for name, _ in inception_layout(model)]
