"""Plain training loops for the paper's models: seeded shuffling, optional per-step callback."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from linprobe.data import ArrayDataset

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def classification_loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the main head plus that of every auxiliary head the model exposes."""
    loss = F.cross_entropy(logits, y)
    for aux in getattr(model, "aux_logits", {}).values():
        loss = loss + F.cross_entropy(aux, y)
    return loss


def train_epochs(model: nn.Module, train: ArrayDataset, optimizer: torch.optim.Optimizer, *, epochs: int,
                 batch_size: int, seed: int = 0, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 penalty: Callable[[], torch.Tensor] | None = None, on_step: StepCallback | None = None) -> int:
    """Train for ``epochs`` passes over shuffled minibatches (scheduler stepped per epoch); returns steps done."""
    g = torch.Generator().manual_seed(seed)
    step = 0
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            x, y = train.x[idx], train.y[idx]
            loss = classification_loss(model, model(x), y)
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
