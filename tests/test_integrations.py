"""TensorBoard logging and the Lightning callback, each tested when its package is installed."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linprobe.training.monitor import Monitor
from tests.test_monitor import blobs, mlp


def test_tensorboard_logger_writes_a_scalar_per_number_and_the_heatmaps(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install tensorboard to test it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from linprobe.training.integrations.tensorboard import TensorBoardLogger

    model, data = mlp(), blobs(64, 0)
    logger = TensorBoardLogger(tmp_path)
    with Monitor(model, ["1", "5"], num_classes=3, valid=blobs(30, 1), every=2, exact=blobs(60, 2),
                 l2_path=(1e-3,), max_iter=10, on_measure=logger) as monitor:
        for _ in range(4):
            model(data.x[:16])
            monitor.step(data.y[:16])
    logger.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0}).Reload()
    tag = "probe/5/valid/online_top1_error"
    assert tag in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars(tag)] == [0, 2]
    assert events.Scalars(tag)[-1].value == pytest.approx(monitor.result.value("5", "valid", "online_top1_error"))
    assert len(events.Tags()["scalars"]) == len({(r.layer, r.split, r.metric) for r in monitor.result.rows})
    assert {"probe/heatmap/valid/top1_error", "probe/heatmap/valid/online_top1_error"} <= set(events.Tags()["images"])


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # lightning's own use of a deprecated torch API
def test_lightning_callback_measures_every_k_optimiser_steps(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed: pip install lightning to test "
                                                         "the callback")
    from linprobe.training.integrations.lightning import ProbeCallback

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = blobs(160, 0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=16)
    callback = ProbeCallback(["net.1", "net.5"], num_classes=3, valid=blobs(30, 1), every=4)
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback], default_root_dir=tmp_path,
                         logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                         accelerator="cpu")
    module = Classifier()
    trainer.fit(module, loader)
    assert trainer.global_step == 10
    assert callback.result.steps == [0, 4, 8]
    assert callback.result.names == ["net.1", "net.5"]
    assert not any(m._forward_hooks for m in module.modules())
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "probe/net.5/valid/online_top1_error" in logged


def test_a_missing_package_is_named_with_the_command_that_installs_it(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    from linprobe.training.integrations.tensorboard import summary_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an absent package looks like
    with pytest.raises(ImportError, match="pip install tensorboard"):
        summary_writer(tmp_path)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "linprobe.training.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match="pip install lightning"):
        importlib.import_module("linprobe.training.integrations.lightning")
