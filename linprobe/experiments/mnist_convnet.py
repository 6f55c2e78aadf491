"""MNIST convnet before and after training (paper Fig. 5 of the first version, Fig. 3 of the later one).

The TensorFlow tutorial convnet with probes at its ten points; the paper reports, untrained, an
error falling from about 8% at the input to about 2% after the first ReLU, and after training an
improvement at every layer except a small kink at fc1_preact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import linprobe as lp
from linprobe.experiments.training import model_error, train_epochs
from linprobe.models import MNIST_CONVNET_PROBES, mnist_convnet, mnist_convnet_l2_params
from linprobe.plots import plot_layer_curves


def run(out: str | Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Probe the ten points untrained, train as the tutorial does, probe again; returns headline numbers."""
    out = Path(out)
    splits = lp.standard_splits(data, seed=seed, limit=1000 if quick else None)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    model = mnist_convnet(seed=seed)
    common = dict(layers=list(MNIST_CONVNET_PROBES), cache_dir=out / "cache", reduce="none", progress=progress)
    before = lp.probe(model, train, valid, test, out_dir=out / "untrained", step=0, **common)
    epochs = 1 if quick else 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    l2_params = mnist_convnet_l2_params(model)
    steps = train_epochs(model, train, optimizer, epochs=epochs, batch_size=32, seed=seed,
                         scheduler=torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.95),
                         penalty=lambda: 5e-4 * sum(p.square().sum() for p in l2_params) / 2)
    after = lp.probe(model, train, valid, test, out_dir=out / "trained", step=steps, **common)
    curves = {"untrained": before.errors("test"), f"trained ({epochs} epochs)": after.errors("test")}
    plot_layer_curves(curves, out / "mnist_convnet.png", ylabel="probe test error",
                      title="MNIST convnet: linear probe test error per layer")
    return {"untrained": curves["untrained"], "trained": after.errors("test"), "steps": steps,
            "model_test_error": model_error(model, test), "tables": (before.table(), after.table())}
