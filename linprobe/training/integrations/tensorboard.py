"""TensorBoard logging of probe measurements: one scalar per layer, split and metric, and the heatmap as an image.

::

    monitor = lp.Monitor(model, layers, num_classes=10, valid=valid, on_measure=TensorBoardLogger("runs/tb"))

Needs the ``tensorboard`` package (``pip install tensorboard``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from linprobe.report.plots import plot_heatmap
from linprobe.report.results import ProbeResult
from linprobe.training.monitor import metrics_at


def summary_writer(log_dir: str | Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter``, or an ImportError that says what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises this when the tensorboard package is missing
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'linprobe[tensorboard]')") from e
    return SummaryWriter(str(log_dir))


class TensorBoardLogger:
    """Call with ``(result, step)`` after a measurement (a ``Monitor``'s ``on_measure``): writes every number
    measured at ``step`` as the scalar ``probe/<layer>/<split>/<metric>``, and a heatmap per error metric in
    ``heatmaps`` (those the result has) as the image ``probe/heatmap/<split>/<metric>``."""

    def __init__(self, log_dir: str | Path, *, split: str = "valid",
                 heatmaps: tuple[str, ...] = ("top1_error", "online_top1_error")) -> None:
        self.writer = summary_writer(log_dir)
        self.split, self.heatmaps = split, heatmaps

    def __call__(self, result: ProbeResult, step: int) -> None:
        for tag, value in metrics_at(result, step).items():
            self.writer.add_scalar(tag, value, step)
        have = {r.metric for r in result.rows if r.split == self.split}
        for metric in (m for m in self.heatmaps if m in have):
            self.writer.add_figure(f"probe/heatmap/{self.split}/{metric}",
                                   plot_heatmap(result, split=self.split, metric=metric), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
