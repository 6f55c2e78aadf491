"""Online probes: they learn inside the user's training loop from the features of the model's own forward.

::

    probes = lp.OnlineProbes(model, layers="all", num_classes=10)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        probes.step(y)                      # learns from the forward that just ran; no second forward

Probes of equal width are stacked and trained with one batched matmul: the group's weights are one
(L, C, D) parameter, class-major like ``nn.Linear``'s (``group.weights[i]`` is probe i's (D, C) view), so a
step computes one gradient and the optimiser makes one update per width group, not one per probe. Nothing here
touches the model's parameters, gradients, modes, buffers or the global random generator.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam

from linprobe import distributed
from linprobe.capture.extract import prepared
from linprobe.capture.reduce import DEFAULT_FEATURE_BUDGET, ReduceSpec, Reduction, resolve_reductions
from linprobe.capture.taps import CaptureChanged, LayerSpec, RepeatPolicy, Selector, Taps, TokenReduction, frozen
from linprobe.data.datasets import as_labels
from linprobe.data.inputs import InputSpec, Split
from linprobe.fit.metrics import chance_error
from linprobe.report.results import LayerInfo, ProbeResult

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class ProbeGroup(nn.Module):
    """Probes on layers of the same width D, evaluated together as one (L, C, D) x (L, D, B) batched matmul.

    Features are normalised per layer like a BatchNorm without affine parameters: batch statistics
    while learning, running statistics when evaluated. The normalisation is folded into the weights,
    so the only passes over the (L, B, D) features are the stack, the statistics and two matmuls.
    """

    running_mean: torch.Tensor  # buffers (register_buffer), declared for the type checker
    running_var: torch.Tensor
    seen: torch.Tensor

    def __init__(self, names: list[str], width: int, num_classes: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.names, self.momentum = names, momentum
        self.weight = nn.Parameter(torch.zeros(len(names), num_classes, width))  # one parameter for the group:
        self.bias = nn.Parameter(torch.zeros(len(names), num_classes))  # one gradient, one optimiser update
        self.register_buffer("running_mean", torch.zeros(len(names), width))
        self.register_buffer("running_var", torch.ones(len(names), width))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self._scratch: dict[str, torch.Tensor] = {}  # (L, B, D) work buffers: a fresh one each step costs page faults

    @property
    def weights(self) -> tuple[torch.Tensor, ...]:
        """Each probe's (D, C) weights: transposed views into the group's (L, C, D) parameter."""
        return self.weight.mT.unbind(0)

    @property
    def biases(self) -> tuple[torch.Tensor, ...]:
        """Each probe's (C,) bias: views into the group's parameter."""
        return self.bias.unbind(0)

    def stack(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The group's (L, B, D) features, in a work buffer that the next call overwrites."""
        parts = [features[n] for n in self.names]
        return torch.stack(parts, out=self._buffer("stacked", (len(parts), *parts[0].shape), parts[0]))

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._scratch[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    @torch.no_grad()
    def forward(self, features: Mapping[str, torch.Tensor], *, learn: bool) -> torch.Tensor:
        """(L, B, C) logits of every probe in the group (``learn``: batch statistics, which update the running ones)."""
        h = self.stack(features)
        return self._logits(h, h.mean(1) if learn else None)[0].mT

    @torch.no_grad()
    def learn(self, h: torch.Tensor, y: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (L, B, C) and summed mean cross-entropy of the probes on stacked features ``h`` (batch means
        ``mean``, (L, D)); sets their gradients.

        The gradient is written out (softmax minus one-hot, then ``G.T @ h``), not taken by autograd, whose
        ``h.T @ G`` on row-major features is several times slower on CPU.
        """
        z, centred, scale = self._logits(h, mean)
        n = h.shape[1]
        # class-major (L, C, B): the softmax reduces over the short class dimension with the batch contiguous
        # (for 10 classes 14x faster than over the last dimension of (L, B, C))
        logp = z.log_softmax(1)
        target = y.view(1, 1, -1).expand(len(z), 1, -1)
        loss = -logp.gather(1, target).sum() / n
        grad = logp.exp_().scatter_add_(1, target, torch.full_like(target, -1, dtype=z.dtype)).div_(n)
        grad_w = torch.bmm(grad, centred).mul_(scale[:, None])  # (L, C, D), the parameter's layout
        grad_b = grad.sum(2)
        self.weight.grad, self.bias.grad = grad_w, grad_b
        return z.mT.contiguous(), loss  # row-major for the callers' argmax over classes (3x faster than strided)

    def _logits(self, h: torch.Tensor, mean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class-major logits (L, C, B), the centred features (``h``, centred in place) and the per-feature scale
        1/sqrt(var + eps): with the batch's ``mean`` by batch statistics (which update the running ones), without by
        the running ones. The product is (L, C, D) x (L, D, B), the features read as a transposed view: for 10
        classes 3x faster on CPU than (L, B, D) x (L, D, C), whose output rows are 10 wide."""
        if mean is not None:
            centred = h.sub_(mean[:, None])
            var = torch.mul(centred, centred, out=self._buffer("squares", h.shape, h)).mean(1)
            self._update(mean, var)
        else:
            centred, var = h.sub_(self.running_mean[:, None]), self.running_var
        scale = torch.rsqrt(var + 1e-5)
        w = self.weight * scale[:, None]  # (L, C, D)
        return torch.baddbmm(self.bias[..., None], w, centred.mT), centred, scale

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
    ``optimizer(groups)`` builds your own optimiser from one parameter group per width group,
    ``{"params": [weight (L, C, D), bias (L, C)], "names": [layer, ...]}`` (default: Adam with ``lr``).
    """

    def __init__(self, model: nn.Module, layers: LayerSpec = "all", *, num_classes: int, lr: float = 1e-3,
                 weight_decay: float = 0.0, optimizer: OptimizerFactory | None = None, reduce: ReduceSpec = "auto",
                 feature_budget: int = DEFAULT_FEATURE_BUDGET, seed: int = 0,
                 select: Selector | Mapping[str, Selector] | None = None, tokens: TokenReduction = "auto",
                 repeat: RepeatPolicy = "each", inputs: InputSpec | None = None) -> None:
        super().__init__()
        self.taps = Taps(model, layers, select=select, tokens=tokens, repeat=repeat)
        self.inputs = inputs or InputSpec()
        self.taps.attach()
        self.num_classes = num_classes
        self._make_optimizer = optimizer or (lambda groups: _adam(groups, lr=lr, weight_decay=weight_decay))
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

    def _probe_groups(self) -> Iterator[ProbeGroup]:
        """``self.groups``, typed: the ModuleList holds only ProbeGroups."""
        return cast(Iterator[ProbeGroup], iter(self.groups))

    def _build(self, raw: Mapping[str, torch.Tensor]) -> None:
        """Choose reductions and create the probes on the first batch, when layer shapes are known."""
        self.shapes = {n: tuple(h.shape[1:]) for n, h in raw.items()}
        self.reductions = resolve_reductions(self._reduce, self.shapes, budget=self._budget, seed=self._seed,
                                             layouts=self.taps.plan.layouts if self.taps.plan else None)
        self.taps.reductions = self.reductions
        by_width: dict[int, list[str]] = {}
        for name, shape in self.shapes.items():
            by_width.setdefault(self.reductions[name].out_features(shape), []).append(name)
        device = next(iter(raw.values())).device
        self.groups = nn.ModuleList(ProbeGroup(names, width, self.num_classes) for width, names in by_width.items())
        self.groups.to(device)
        self.optimizer = self._make_optimizer(
            [{"params": [g.weight, g.bias], "names": list(g.names)} for g in self._probe_groups()])

    def step(self, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimiser step of every probe on the features of the model's latest forward.

        Returns the summed probe loss (detached) and per-layer batch metrics named
        ``probe/<layer>/train_top1_error`` for the caller to log.
        """
        try:
            feats = self.taps.collect()
        except CaptureChanged as e:  # this forward's copy of that layer is wrong: learn nothing from it
            warnings.warn(f"training step {self.steps} skipped: {e}", stacklevel=2)
            return torch.zeros(()), {}
        if self.optimizer is None:  # the first forward: captures found, reductions chosen, then applied in the hooks
            self._build(feats)
            feats = {n: self.reductions[n](h) for n, h in feats.items()}
        y = self._labels(y, feats)
        stacked, means = self._stacked(feats)
        if not _all_finite(means):  # a NaN or Inf reaches its feature's batch mean; the per-layer screen only then
            stacked, means = self._stacked(self._screen(feats, f"training step {self.steps}"))
        logits, losses = zip(*(g.learn(h, y, mean) for g, h, mean in zip(self._probe_groups(), stacked, means)))
        loss = sum(losses)
        distributed.average_replicas_(self.groups)  # DDP: every rank's probes take the same step
        assert self.optimizer is not None  # built by _build on the first step
        self.optimizer.step()
        self.steps += 1
        logs = {}
        for g, z in zip(self._probe_groups(), logits):
            errors = (z.detach().argmax(-1) != y).float().mean(1).tolist()
            logs.update({f"probe/{n}/train_top1_error": e for n, e in zip(g.names, errors)})
        return loss.detach(), logs

    def _stacked(self, feats: Mapping[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each group's (L, B, D) stack of ``feats`` and its batch means (L, D)."""
        stacked = [g.stack(feats) for g in self._probe_groups()]
        return stacked, [h.mean(1) for h in stacked]

    @torch.no_grad()
    def evaluate(self, data: Any, *, split: str = "valid", batch_size: int = 256, step: int | None = None) -> ProbeResult:
        """Every probe's top-1 (and top-5) error and cross-entropy on ``data``, the model frozen meanwhile."""
        if self.optimizer is None:
            raise RuntimeError("the probes have not learned yet: call step(y) after a forward of the model first")
        sums: dict[str, torch.Tensor] = {}
        labels: list[torch.Tensor] = []
        with frozen(self.taps.model):
            self.taps.stop_early = True
            try:
                for batch in Split.of(data, self.inputs, split).batches(batch_size):
                    if batch.token_level:
                        raise ValueError("online probes take one label per sample; for per-token labels probe "
                                         "checkpoints with linprobe.probe")
                    feats = self.taps.run(prepared(batch, self.taps.model))
                    y = batch.labels
                    if not _all_finite(feats.values()):
                        feats = self._screen(feats, f"the {split} data, batch {len(labels)}")
                    y = self._labels(y, feats)
                    labels.append(y)
                    for g in self._probe_groups():
                        _accumulate(sums, g.names, g(feats, learn=False), y)
            finally:
                self.taps.stop_early = False
        distributed.sum_(sums.values())  # DDP: the counts of every rank's data
        return self._result(sums, distributed.all_gather_rows(torch.cat(labels)), split,
                            self.steps if step is None else step)

    def _labels(self, y: Any, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The batch's labels as class indices on the features' device, checked against the batch and classes."""
        labels = as_labels(y)
        first = next(iter(feats.values()))
        if len(labels) != len(first):
            raise ValueError(f"got {len(labels)} labels for a batch of {len(first)} samples: pass the labels of the "
                             "batch the model has just run on")
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} is out of range for num_classes={self.num_classes}: labels "
                             f"must be 0..{self.num_classes - 1}; raise num_classes or remap the labels")
        return labels.to(first.device)

    def _screen(self, feats: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """Zero the features of layers holding NaN/Inf and mark those layers invalid (first occurrence kept).

        Zeroed features leave a probe's weights finite, so the other probes of its group are unaffected.
        """
        finite = torch.stack([torch.isfinite(h).flatten(1).all(1) for h in feats.values()])  # (L, B)
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


class GroupedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` that updates all parameter groups with equal settings in one (fused) call.

    Probes are many tiny parameter groups, and torch's Adam pays its Python overhead once per group;
    the state and the updates are the same as ``torch.optim.Adam``'s.
    """

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # torch.optim.Optimizer's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple[Any, ...], tuple[dict[str, Any], list[list[torch.Tensor]]]] = {}
        for group in self.param_groups:
            key = tuple((k, v) for k, v in group.items() if k not in ("params", "names"))
            lists = buckets.setdefault(key, (group, [[] for _ in range(6)]))[1]
            # torch's Adam._init_group has no annotations (reached through self, so untyped_calls_exclude misses it)
            self._init_group(group, *lists)  # type: ignore[no-untyped-call]
        for group, lists in buckets.values():
            extra = {k: group[k] for k in ("decoupled_weight_decay",) if k in group}  # newer torch only
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = lists
            adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, foreach=group["foreach"],
                 fused=group["fused"], amsgrad=group["amsgrad"], beta1=group["betas"][0], beta2=group["betas"][1],
                 lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                 **extra)
        return loss


def _adam(groups: list[dict[str, Any]], *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam over the probes' groups, fused into one kernel where this torch has it (CPU since 2.4)."""
    try:
        return GroupedAdam(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:
        return GroupedAdam(groups, lr=lr, weight_decay=weight_decay)


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether no tensor holds a NaN or Inf, by one sum each (a NaN or Inf reaches the sum; one sync in all)."""
    return bool(torch.stack([h.sum() for h in tensors]).isfinite().all())


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
