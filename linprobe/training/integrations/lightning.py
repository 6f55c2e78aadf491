"""A PyTorch Lightning callback that runs a ``linprobe.Monitor`` on the LightningModule being fitted.

::

    callback = ProbeCallback(["model.conv1", "model.fc1"], num_classes=10, valid=valid, every=100)
    Trainer(callbacks=[callback]).fit(module, loader)
    callback.result                       # the Monitor's table; every measurement also goes to trainer.loggers

Layer names are those of the LightningModule (``lp.layer_names(module)``). Needs the ``lightning``
package (``pip install lightning``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as e:
    raise ImportError("linprobe.training.integrations.lightning needs PyTorch Lightning: pip install lightning "
                      "(or pip install 'linprobe[lightning]')") from e

from linprobe.capture.taps import LayerSpec
from linprobe.report.results import ProbeResult
from linprobe.training.monitor import Monitor, metrics_at


def second_item(batch: Any) -> torch.Tensor:
    """The labels of an ``(x, y)`` batch."""
    return batch[1]


class ProbeCallback(Callback):
    """Online probes (and exact snapshots with ``exact=``) on the module's layers, measured every ``every``
    optimiser steps; ``labels(batch)`` picks a training batch's labels. Other keywords go to ``Monitor``."""

    def __init__(self, layers: LayerSpec = "all", *, num_classes: int, valid: Any, every: int = 100,
                 labels: Callable[[Any], torch.Tensor] = second_item, **monitor_options: Any) -> None:
        self.layers, self.labels = layers, labels
        self.options = dict(num_classes=num_classes, valid=valid, every=every, **monitor_options)
        self.monitor: Monitor | None = None
        self._trainer: Trainer | None = None
        self._y: torch.Tensor | None = None

    @property
    def result(self) -> ProbeResult:
        if self.monitor is None:
            raise RuntimeError("nothing measured yet: pass this callback to a Trainer and call fit first")
        return self.monitor.result

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.monitor is None:
            self._trainer = trainer
            self.monitor = Monitor(pl_module, self.layers, on_measure=self._log, **self.options)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._y = self.labels(batch)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        # after the forward and backward, before the update: global_step updates are done so far
        assert self.monitor is not None and self._y is not None
        self.monitor.step(self._y, step=trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def _log(self, result: ProbeResult, step: int) -> None:
        assert self._trainer is not None
        for logger in self._trainer.loggers:
            logger.log_metrics(dict(metrics_at(result, step)), step=step)
