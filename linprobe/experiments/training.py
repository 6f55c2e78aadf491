"""Plain training loops for the paper's models: seeded shuffling, optional per-step callback."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from linprobe.data.datasets import ArrayDataset

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def classification_loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor, *,
                        aux_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the main head plus ``aux_weight`` times that of every auxiliary head the model exposes
    (the deep MLP's heads count fully, as in 002; Inception v3 weighs its one auxiliary head 0.4)."""
    loss = F.cross_entropy(logits, y)
    for aux in getattr(model, "aux_logits", {}).values():
        loss = loss + aux_weight * F.cross_entropy(aux, y)
    return loss


def train_epochs(model: nn.Module, train: ArrayDataset, optimizer: torch.optim.Optimizer, *, epochs: int,
                 batch_size: int, seed: int = 0, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 penalty: Callable[[], torch.Tensor] | None = None, on_step: StepCallback | None = None,
                 before_update: StepCallback | None = None, aux_weight: float = 1.0) -> int:
    """Train for ``epochs`` passes over shuffled minibatches (scheduler stepped per epoch); returns steps done.

    ``on_step(steps_done, x, y)`` runs after each update; ``before_update(steps_done, x, y)`` after the
    backward, before the update (where a ``linprobe.Monitor`` steps: it sees the parameters of ``steps_done``).
    ``aux_weight`` weighs the auxiliary heads' losses (:func:`classification_loss`).
    """
    if not (isinstance(aux_weight, (int, float)) and aux_weight >= 0 and math.isfinite(aux_weight)):
        raise ValueError(f"aux_weight must be a finite number >= 0, got {aux_weight!r}")
    g = torch.Generator().manual_seed(seed)
    step = 0
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            x, y = train.x[idx], train.y[idx]
            loss = classification_loss(model, model(x), y, aux_weight=aux_weight)
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if before_update is not None:
                before_update(step, x, y)
            optimizer.step()
            step += 1
            if on_step is not None:
                on_step(step, x, y)
        if scheduler is not None:
            scheduler.step()
    return step


@torch.no_grad()
def model_error(model: nn.Module, data: ArrayDataset, batch_size: int = 1024) -> float:
    """The model's own top-1 error on ``data`` in eval mode (mode restored)."""
    was = model.training
    model.eval()
    wrong = sum((model(data.x[i:i + batch_size]).argmax(1) != data.y[i:i + batch_size]).sum().item()
                for i in range(0, len(data), batch_size))
    model.train(was)
    return wrong / len(data)


def train_sgd(model: nn.Module, train: ArrayDataset, *, epochs: int, batch_size: int = 128, lr: float = 0.05,
              seed: int = 0, on_step: StepCallback | None = None, aux_weight: float = 1.0) -> int:
    """SGD with Nesterov momentum 0.9 and weight decay 5e-4, learning rate cosine-annealed per epoch: the
    recipe of the BatchNorm nets (ResNet, Inception), auxiliary heads weighed ``aux_weight``; returns steps done."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return train_epochs(model, train, optimizer, epochs=epochs, batch_size=batch_size, seed=seed,
                        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs),
                        on_step=on_step, aux_weight=aux_weight)


def at_most(data: ArrayDataset, n: int | None, *, seed: int = 0) -> ArrayDataset:
    """A stratified, seeded subset of ``n`` samples of ``data`` (all of it when ``n`` is None or not smaller)."""
    from linprobe.data.datasets import stratified_split

    return data if n is None or n >= len(data) else stratified_split(data, [n], seed=seed)[0]
