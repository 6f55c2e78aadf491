"""Classification metrics shared by every probe: top-k error, cross-entropy, chance level."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def topk_error(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose true class is not among the k highest logits."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return 1.0 - (top == y[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy in nats."""
    return F.cross_entropy(logits.float(), y).item()


def chance_error(y: torch.Tensor, num_classes: int) -> float:
    """Error of always predicting the most frequent class of ``y`` (the dotted line in the paper)."""
    counts = torch.bincount(y, minlength=num_classes)
    return 1.0 - counts.max().item() / max(len(y), 1)


@torch.no_grad()
def classification_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """top1_error, cross_entropy and, with more than five classes, top5_error."""
    out = {"top1_error": topk_error(logits, y, 1), "cross_entropy": cross_entropy(logits, y)}
    if logits.shape[1] > 5:
        out["top5_error"] = topk_error(logits, y, 5)
    return out


@torch.no_grad()
def balanced_error(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 error averaged over the classes present in ``y``, each class weighing the same however rare."""
    wrong = (logits.argmax(1) != y).double()
    counts = torch.bincount(y, minlength=logits.shape[1]).double()
    per_class = torch.bincount(y, weights=wrong, minlength=logits.shape[1]) / counts.clamp_min(1)
    return per_class[counts > 0].mean().item()
