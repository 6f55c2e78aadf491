"""One probe evaluated on one split: its metrics, a confidence interval for each, and its per-sample predictions.

Classification: ``top1_error`` and ``top5_error`` (more than five classes) with Wilson intervals,
``balanced_error`` and ``macro_f1`` (and ``auroc`` for two classes) with a seeded percentile bootstrap over the
evaluated samples (for the first two, a Poisson bootstrap over their (prediction, label) pairs: the same resampling
distribution to first order, at a cost in classes^2, not samples), and ``cross_entropy``. Regression: ``mse`` and ``r2`` (uniform over outputs), bootstrapped. The
bootstrap draws the same resamples for every layer (seed 0), so intervals of two layers are comparable and a run
is reproducible bit for bit; the predictions let :func:`linprobe.fit.uncertainty.paired_difference` compare two
layers, checkpoints or models on the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from linprobe.fit.tasks import Targets
from linprobe.fit.uncertainty import (
    bootstrap_intervals,
    classification_stats,
    regression_stats,
    weighted_auroc,
    wilson_interval,
)

BOOTSTRAP_SAMPLES = 1000
LEVEL = 0.95


@dataclass
class Evaluation:
    """A probe's metrics on one split, their ``(lo, hi)`` intervals at ``LEVEL``, and its predictions (class codes
    or values, on the CPU)."""

    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    predictions: Tensor


@torch.no_grad()
def evaluate(task: Targets, out: Tensor, y: Tensor, *, bootstrap: bool = True) -> Evaluation:
    """Score a probe's outputs ``out`` (logits, or predicted values) against the task's targets ``y``; without
    ``bootstrap`` only the closed-form (Wilson) intervals are computed, which cost nothing."""
    out, y = out.detach().float().cpu(), y.cpu()
    if task.kind == "values":
        pred = out if y.dim() == 2 else out[:, 0]
        stats = regression_stats(pred, y)
        metrics = {"mse": _point(stats["mse"], len(y)), "r2": _point(stats["r2"], len(y))}
        return Evaluation(metrics, bootstrap_intervals(stats, len(y), LEVEL, BOOTSTRAP_SAMPLES) if bootstrap else {},
                          pred)
    classes = out.shape[1]
    pred = out.argmax(1)
    metrics = {"top1_error": (pred != y).double().mean().item(), "cross_entropy": F.cross_entropy(out, y).item()}
    intervals = {"top1_error": _wilson((pred != y).sum(), len(y))}
    if classes > 5:
        missed = ~(out.topk(5, dim=1).indices == y[:, None]).any(1)
        metrics["top5_error"] = missed.double().mean().item()
        intervals["top5_error"] = _wilson(missed.sum(), len(y))
    # balanced error and macro-F1 depend only on the (prediction, label) pairs: bootstrapped over those cells
    cells, counts = (pred * classes + y).unique(return_counts=True)
    stats = classification_stats(cells // classes, cells % classes, classes)
    del stats["error"]
    metrics.update({name: float(stat(counts[None].double())[0]) for name, stat in stats.items()})
    if bootstrap:
        intervals.update(bootstrap_intervals(stats, len(cells), LEVEL, BOOTSTRAP_SAMPLES, counts=counts))
    if classes == 2 and len(y.unique()) == 2:  # AUROC needs both classes among the evaluated samples
        auroc = {"auroc": weighted_auroc(out[:, 1] - out[:, 0], y)}
        metrics["auroc"] = _point(auroc["auroc"], len(y))
        if bootstrap:
            intervals.update(bootstrap_intervals(auroc, len(y), LEVEL, BOOTSTRAP_SAMPLES))
    return Evaluation(metrics, intervals, pred)


def _wilson(errors: Tensor, n: int) -> tuple[float, float]:
    lo, hi = wilson_interval(int(errors), n, LEVEL)
    return float(lo), float(hi)


def _point(stat: object, n: int) -> float:
    """A weighted statistic at unit weights: the plain metric."""
    return float(stat(torch.ones(1, n, dtype=torch.float64))[0])  # type: ignore[operator]
