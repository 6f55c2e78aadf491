"""The models and data the workloads share: seeded splits, and models trained briefly (off the clock)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

import linprobe as lp
from linprobe.data.datasets import stratified_split
from linprobe.models import MNIST_CONVNET_PROBES, deep_mlp, mnist_convnet


@dataclass
class Case:
    """A model, the taps to probe, its training recipe and data."""

    name: str
    model: nn.Module
    layers: list[str]
    batch_size: int
    splits: dict[str, lp.ArrayDataset]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The TF tutorial's momentum SGD (the convnet)."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _rmsprop(model: nn.Module) -> torch.optim.Optimizer:
    """The paper's centred RMSProp (the deep MLP)."""
    return torch.optim.RMSprop(model.parameters(), lr=1e-5, alpha=0.9, momentum=0.9, centered=True, eps=1e-5)


@cache
def fashion(train: int, valid: int, test: int) -> dict[str, lp.ArrayDataset]:
    """Seeded, stratified Fashion-MNIST splits: train from the shipped 60,000, valid and test from its 10,000."""
    parts = lp.load_dataset("fashion-mnist")
    va, te = stratified_split(parts["test"], [valid, test], seed=0)
    return {"train": stratified_split(parts["train"], [train], seed=0)[0], "valid": va, "test": te}


def convnet(splits: dict[str, lp.ArrayDataset], *, train_steps: int) -> Case:
    """The MNIST convnet (10 taps), trained ``train_steps`` batches of 32 on ``splits['train']``."""
    case = Case("convnet", mnist_convnet(seed=0), list(MNIST_CONVNET_PROBES), 32, splits, _sgd)
    return train(case, train_steps)


def mlp(*, depth: int = 128, limit: int | None = None, train_steps: int) -> Case:
    """The deep MLP (``depth`` layers of 128, ``depth + 1`` taps) on the real MNIST subset (train capped at
    ``limit``), trained briefly."""
    model = deep_mlp(depth=depth, seed=0)
    case = Case(f"mlp{depth}", model, ["input", *model.layer_names], 120, lp.standard_splits("mnist", limit=limit),
                _rmsprop)
    return train(case, train_steps)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One plain training step."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def batch(data: lp.ArrayDataset, size: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``i``-th minibatch of ``size`` (wrapping around)."""
    start = (i * size) % max(len(data) - size, 1)
    return data.x[start:start + size], data.y[start:start + size]


def train(case: Case, steps: int) -> Case:
    """Train the case's model ``steps`` more batches (a fresh optimiser), then put it in eval mode."""
    optimizer = case.optimizer(case.model)
    case.model.train()
    for i in range(steps):
        train_step(case.model, optimizer, *batch(case.splits["train"], case.batch_size, i))
    case.model.eval()
    return case
