"""Online probes: they learn inside the user's training loop from the features of the model's own forward.

::

    probes = lp.OnlineProbes(model, layers="all", num_classes=10)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        probes.step(y)                      # learns from the forward that just ran; no second forward

Probes of equal width are stacked and trained with one batched matmul; each probe is its own
parameter group of one optimiser. Nothing here touches the model's parameters, gradients, modes,
buffers or the global random generator.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from linprobe.data import as_labels, iter_batches
from linprobe.extract import model_device, reduce_features, to_device
from linprobe.metrics import chance_error
from linprobe.reduce import DEFAULT_FEATURE_BUDGET, ReduceSpec, Reduction, resolve_reductions
from linprobe.results import LayerInfo, ProbeResult
from linprobe.taps import LayerSpec, Selector, Taps, TokenReduction, frozen

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class ProbeGroup(nn.Module):
    """Probes on layers of the same width D, evaluated together as one (L, B, D) x (L, D, C) batched matmul.

    Features are normalised per layer like a BatchNorm without affine parameters: batch statistics
    while learning, running statistics when evaluated.
    """

    def __init__(self, names: list[str], width: int, num_classes: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.names, self.momentum = names, momentum
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(width, num_classes)) for _ in names)
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_classes)) for _ in names)
        self.register_buffer("running_mean", torch.zeros(len(names), width))
        self.register_buffer("running_var", torch.ones(len(names), width))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, features: Mapping[str, torch.Tensor], *, learn: bool) -> torch.Tensor:
        """(L, B, C) logits of every probe in the group."""
        h = torch.stack([features[n] for n in self.names])
        if learn:
            mean, var = h.mean(1), h.var(1, unbiased=False)
            self._update(mean, var)
        else:
            mean, var = self.running_mean, self.running_var
        h = (h - mean[:, None]) * torch.rsqrt(var[:, None] + 1e-5)
        return torch.baddbmm(torch.stack(list(self.biases))[:, None], h, torch.stack(list(self.weights)))

    @torch.no_grad()
    def _update(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        m = 1.0 if self.seen == 0 else self.momentum
        self.running_mean.lerp_(mean, m)
        self.running_var.lerp_(var, m)
        self.seen += 1


class OnlineProbes(nn.Module):
    """A probe on each chosen layer, learning from the model's training forward passes.

    Call ``step(y)`` after each forward of the model (it reads the features that forward left in
    the taps) and ``evaluate(data)`` to measure every probe on held-out data. Probes start at zero
    and use no randomness; reductions that need randomness use their own seeded generators.
    """

    def __init__(self, model: nn.Module, layers: LayerSpec = "all", *, num_classes: int, lr: float = 1e-3,
                 weight_decay: float = 0.0, optimizer: OptimizerFactory | None = None, reduce: ReduceSpec = "auto",
                 feature_budget: int = DEFAULT_FEATURE_BUDGET, seed: int = 0,
                 select: Selector | Mapping[str, Selector] | None = None, tokens: TokenReduction = None,
                 repeat: str = "error") -> None:
        super().__init__()
        self.taps = Taps(model, layers, select=select, tokens=tokens, repeat=repeat)  # type: ignore[arg-type]
        self.taps.attach()
        self.num_classes = num_classes
        self._make_optimizer = optimizer or (lambda groups: torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay))
        self._reduce, self._budget, self._seed = reduce, feature_budget, seed
        self.reductions: dict[str, Reduction] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.groups = nn.ModuleList()
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.invalid: dict[str, str] = {}  # layer -> where its first NaN/Inf was seen
        self._invalid_sample: dict[str, int] = {}

    def close(self) -> None:
        """Remove the hooks from the model."""
        self.taps.remove()

    def __enter__(self) -> OnlineProbes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self, raw: Mapping[str, torch.Tensor]) -> None:
        """Choose reductions and create the probes on the first batch, when layer shapes are known."""
        self.shapes = {n: tuple(h.shape[1:]) for n, h in raw.items()}
        self.reductions = resolve_reductions(self._reduce, self.shapes, budget=self._budget, seed=self._seed)
        by_width: dict[int, list[str]] = {}
        for name, shape in self.shapes.items():
            by_width.setdefault(self.reductions[name].out_features(shape), []).append(name)
        device = next(iter(raw.values())).device
        self.groups = nn.ModuleList(ProbeGroup(names, width, self.num_classes) for width, names in by_width.items())
        self.groups.to(device)
        self.optimizer = self._make_optimizer(
            [{"params": [g.weights[i], g.biases[i]], "name": n} for g in self.groups for i, n in enumerate(g.names)])

    def step(self, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimiser step of every probe on the features of the model's latest forward.

        Returns the summed probe loss (detached) and per-layer batch metrics named
        ``probe/<layer>/train_top1_error`` for the caller to log.
        """
        raw = self.taps.collect()
        if self.optimizer is None:
            self._build(raw)
        feats = self._screen(reduce_features(raw, self.reductions), f"training step {self.steps}")
        y = self._labels(y, feats)
        with torch.enable_grad():
            logits = [g(feats, learn=True) for g in self.groups]
            loss = sum(F.cross_entropy(z.flatten(0, 1), y.repeat(z.shape[0])) * z.shape[0] for z in logits)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.steps += 1
        logs = {}
        for g, z in zip(self.groups, logits):
            errors = (z.detach().argmax(-1) != y).float().mean(1).tolist()
            logs.update({f"probe/{n}/train_top1_error": e for n, e in zip(g.names, errors)})
        return loss.detach(), logs

    @torch.no_grad()
    def evaluate(self, data: Any, *, split: str = "valid", batch_size: int = 256, step: int | None = None) -> ProbeResult:
        """Every probe's top-1 (and top-5) error and cross-entropy on ``data``, the model frozen meanwhile."""
        if self.optimizer is None:
            raise RuntimeError("the probes have not learned yet: call step(y) after a forward of the model first")
        sums: dict[str, torch.Tensor] = {}
        labels = []
        device = model_device(self.taps.model)
        with frozen(self.taps.model):
            self.taps.stop_early = True
            try:
                for x, y in iter_batches(data, batch_size):
                    feats = reduce_features(self.taps.run(to_device(x, device)), self.reductions)
                    feats = self._screen(feats, f"the {split} data, batch {len(labels)}")
                    y = self._labels(y, feats)
                    labels.append(y)
                    for g in self.groups:
                        _accumulate(sums, g.names, g(feats, learn=False), y)
            finally:
                self.taps.stop_early = False
        return self._result(sums, torch.cat(labels), split, self.steps if step is None else step)

    def _labels(self, y: Any, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The batch's labels as class indices on the features' device, checked against the batch and classes."""
        y = as_labels(y)
        first = next(iter(feats.values()))
        if len(y) != len(first):
            raise ValueError(f"got {len(y)} labels for a batch of {len(first)} samples: pass the labels of the batch "
                             "the model has just run on")
        if len(y) and int(y.max()) >= self.num_classes:
            raise ValueError(f"label {int(y.max())} is out of range for num_classes={self.num_classes}: labels must be "
                             f"0..{self.num_classes - 1}; raise num_classes or remap the labels")
        return y.to(first.device)

    def _screen(self, feats: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """Zero the features of layers holding NaN/Inf and mark those layers invalid (first occurrence kept).

        Zeroed features leave a probe's weights finite, so the other probes of its group are unaffected.
        """
        finite = torch.stack([torch.isfinite(h).flatten(1).all(1) for h in feats.values()])  # (L, B)
        if bool(finite.all()):
            return feats
        for (name, h), ok in zip(list(feats.items()), finite):
            if not bool(ok.all()):
                sample = int((~ok).nonzero()[0])
                value = h[sample][~torch.isfinite(h[sample])][0].item()
                self.invalid.setdefault(name, f"{value} at sample {sample} of {where}")
                self._invalid_sample.setdefault(name, sample)
                feats[name] = torch.where(ok.view(-1, *[1] * (h.ndim - 1)), h, torch.zeros((), dtype=h.dtype,
                                                                                             device=h.device))
        return feats

    def _result(self, sums: Mapping[str, torch.Tensor], y: torch.Tensor, split: str, step: int) -> ProbeResult:
        """Turn summed counts into a result table (layers in execution order)."""
        chance = chance_error(y, self.num_classes)
        metric_names = ["top1_error", "top5_error", "cross_entropy"] if self.num_classes > 5 else ["top1_error", "cross_entropy"]
        result = ProbeResult([])
        for name in self.taps.order:
            r, shape = self.reductions[name], self.shapes[name]
            result.layers.append(LayerInfo(name, shape, int(torch.tensor(shape).prod()), r.out_features(shape),
                                           r.to_dict(), chance))
            if name in self.invalid:
                result.add(step, name, split, {"invalid": self._invalid_sample[name]})
                continue
            values = (sums[name] / len(y)).tolist()
            result.add(step, name, split, dict(zip(metric_names, values)))
        result.meta.update(kind="online", **({"invalid": dict(self.invalid)} if self.invalid else {}))
        return result


def _accumulate(sums: dict[str, torch.Tensor], names: list[str], logits: torch.Tensor, y: torch.Tensor) -> None:
    """Add per-layer counts of top-1 and top-5 mistakes and summed cross-entropy for a (L, B, C) batch."""
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = top == y[None, :, None]
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]), reduction="none").view(logits.shape[:2])
    stats = [(~hit[..., 0]).sum(1).float()]
    if logits.shape[-1] > 5:
        stats.append((~hit.any(-1)).sum(1).float())
    stats.append(ce.sum(1))
    batch = torch.stack(stats, dim=1)
    for i, name in enumerate(names):
        sums[name] = sums.get(name, 0) + batch[i]
