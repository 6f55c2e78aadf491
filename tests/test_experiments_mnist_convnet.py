"""The convnet experiment's monitored training, on a small slice: the table, the timelines and the findings."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import linprobe as lp
from linprobe.experiments.mnist_convnet import monitored_training
from linprobe.models import MNIST_CONVNET_PROBES, mnist_convnet

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m "not slow"` leaves it out


def test_monitored_training_writes_both_timelines_and_states_overhead_and_gap(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = lp.standard_splits("mnist", seed=0, limit=200)
        steps, result, findings = monitored_training(mnist_convnet(seed=0), splits, tmp_path, epochs=1, quick=True,
                                                     seed=0)
    finally:
        torch.set_num_threads(threads)
    assert steps == 7 and result.steps == [0, 5, 7]  # every 5 minibatches and the trained model
    assert result.names == list(MNIST_CONVNET_PROBES)
    assert lp.ProbeResult.load(tmp_path / "monitor").rows == result.rows
    for kind in ("exact", "online"):
        with Image.open(tmp_path / "monitor" / kind / "animation.gif") as gif:
            assert gif.n_frames == 3
        assert (tmp_path / "monitor" / kind / "diagram.png").stat().st_size > 0
    assert findings[0].startswith("live monitor") and "overhead" in findings[0]
    assert findings[1].startswith("online minus exact")
