"""mnist-convnet: the TF tutorial convnet probed at ten points before and after training (Fig. 5 / Fig. 3).

The paper reports, untrained, an error falling from about 8% at the input to about 2% after the
first ReLU, and after training an improvement at every layer except a small kink at fc1_preact.
"""
from __future__ import annotations

from pathlib import Path

import torch

import linprobe as lp
from linprobe.experiments.report import Summary
from linprobe.experiments.training import model_error, train_epochs
from linprobe.models import MNIST_CONVNET_PROBES, mnist_convnet, mnist_convnet_l2_params
from linprobe.plots import plot_layer_curves

CLAIM = ("untrained, the probe error falls from about 8% at the input to about 2% after the first ReLU; "
         "trained, it improves at every layer except a small kink at fc1_preact")


def train_tutorial(model: torch.nn.Module, train: lp.ArrayDataset, *, epochs: int, seed: int) -> int:
    """The tutorial's recipe: momentum 0.9, lr 0.01 decayed 0.95 per epoch, batch 32, L2 5e-4 on fc layers."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    l2_params = mnist_convnet_l2_params(model)
    return train_epochs(model, train, optimizer, epochs=epochs, batch_size=32, seed=seed,
                        scheduler=torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.95),
                        penalty=lambda: 5e-4 * sum(p.square().sum() for p in l2_params) / 2)


def run(out: Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True,
        epochs: int | None = None) -> Summary:
    """Probe the ten points untrained, train as the tutorial does, probe again."""
    splits = lp.standard_splits(data, seed=seed, limit=1000 if quick else None)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    model = mnist_convnet(seed=seed)
    common = dict(layers=list(MNIST_CONVNET_PROBES), cache_dir=out / "cache", reduce="none", progress=progress)
    before = lp.probe(model, train, valid, test, out_dir=out / "untrained", **common)
    epochs = epochs or (1 if quick else 10)
    steps = train_tutorial(model, train, epochs=epochs, seed=seed)
    after = lp.probe(model, train, valid, test, out_dir=out / "trained", step=steps, **common)
    lp.ProbeResult.concat([before, after]).save(out)
    untrained, trained = before.errors("test"), after.errors("test")
    plot_layer_curves({"untrained": untrained, f"trained ({epochs} epochs)": trained}, out / "mnist_convnet.png",
                      ylabel="probe test error", title="MNIST convnet: linear probe test error per layer")
    improved = [n for n in MNIST_CONVNET_PROBES if trained[n] < untrained[n]]
    findings = [f"untrained: input {untrained['input']:.1%}, conv1_postact {untrained['conv1_postact']:.1%}, "
                f"logits {untrained['logits']:.1%}",
                f"trained ({steps} steps): input {trained['input']:.1%}, fc1_preact {trained['fc1_preact']:.1%}, "
                f"fc1_postact {trained['fc1_postact']:.1%}, logits {trained['logits']:.1%}",
                f"layers improved by training: {len(improved) - 1} of 9 (the input cannot change)",
                f"the model's own test error: {model_error(model, test):.1%}"]
    agrees = untrained["conv1_postact"] < untrained["input"] and len(improved) >= 7
    return Summary("mnist-convnet", CLAIM, findings, agrees, figures=["mnist_convnet.png"],
                   tables=[before.table(markdown=True), after.table(markdown=True)],
                   settings={"data": data, "train/valid/test": f"{len(train)}/{len(valid)}/{len(test)}",
                             "epochs": epochs, "reduction": "none (every feature, as the paper)", "seed": seed})
