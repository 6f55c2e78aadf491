"""deep-mlp: a 128-layer MLP on MNIST, plain, with auxiliary heads, or with a skip to layer 64 (002 Figs. 6-8).

Exact probes on the input and the layers are fitted on the frozen model at chosen minibatches
(0, 500 and 5000 by default), one table over all moments. The paper: the plain model cannot be
trained; a linear head every 16 layers makes it trainable (Fig. 7); feeding the input to layer 64
as well leaves layers 1-63 useless while layers 64-128 learn (Fig. 8).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

import linprobe as lp
from linprobe.experiments.report import Summary
from linprobe.experiments.training import model_error, train_epochs
from linprobe.models import MLP, deep_mlp
from linprobe.plots import plot_heatmap, plot_layer_errors

CLAIMS = {
    "plain": "the 128-layer MLP cannot be trained by gradient descent: its deep layers stay useless",
    "aux": "a linear head every 16 layers, its loss added to the model's, makes it trainable: by 5000 minibatches "
           "the deep layers are useful too (Fig. 7)",
    "skip": "with the input also fed to layer 64, layers 1-63 stay useless even after long training while "
            "layers 64-128 learn; untrained, the error has two bumps, low at the input and again at layer 64 (Fig. 8)",
}
BATCH_SIZE = 120  # 003: 60,000 images x 10 epochs / 5,000 minibatches


@dataclass(frozen=True)
class Settings:
    """The minibatches at which to probe, which layers, the probe's training samples and L2 path, the learning rate."""

    steps: tuple[int, ...]
    probe_every: int
    probe_train: int
    l2_path: tuple[float, ...]
    lr: float


QUICK = Settings(steps=(0, 200), probe_every=8, probe_train=1000, l2_path=(1e-1, 1e-3), lr=1e-4)
FULL = Settings(steps=(0, 500, 5000), probe_every=1, probe_train=3500, l2_path=(1e-1, 1e-2, 1e-3), lr=1e-5)


def rmsprop(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """003's optimiser: centred RMSProp, decay 0.9, momentum 0.9.

    TensorFlow adds its epsilon (1e-10) inside the square root, torch outside; 1e-5 = sqrt(1e-10) keeps
    TF's floor under the step size, which decides how far the vanishing gradients of deep layers move them.
    """
    return torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.9, momentum=0.9, centered=True, eps=1e-5)


def train_minibatches(model: torch.nn.Module, train: lp.ArrayDataset, optimizer: torch.optim.Optimizer, *,
                      count: int, seed: int) -> None:
    """Exactly ``count`` minibatches: whole shuffled epochs, then a seeded random part of one more."""
    epochs, rest = divmod(count, math.ceil(len(train) / BATCH_SIZE))
    train_epochs(model, train, optimizer, epochs=epochs, batch_size=BATCH_SIZE, seed=seed)
    if rest:
        part = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:rest * BATCH_SIZE]
        train_epochs(model, train.subset(part), optimizer, epochs=1, batch_size=BATCH_SIZE, seed=seed)


def probed_layers(model: MLP, every: int) -> list[str]:
    """The input, then every ``every``-th layer up to the last."""
    return ["input", *model.layer_names[every - 1::every]]


def block_means(errors: dict[str, float], *, block: int = 16) -> dict[str, float]:
    """Mean error over layers 1-16, 17-32, ... (those probed), keyed ``"1-16"``."""
    depth = max(int(n.removeprefix("layer")) for n in errors if n != "input")
    out = {}
    for start in range(1, depth + 1, block):
        inside = [e for n, e in errors.items() if n != "input" and start <= int(n.removeprefix("layer")) < start + block]
        if inside:
            out[f"{start}-{start + block - 1}"] = statistics.fmean(inside)
    return out


def layer_range_mean(errors: dict[str, float], first: int, last: int) -> float:
    """Mean error over the probed layers ``first`` to ``last``, inclusive."""
    return statistics.fmean(e for n, e in errors.items() if n != "input" and first <= int(n.removeprefix("layer")) <= last)


def verdict(variant: str, errors: dict[str, float], chance: float) -> bool:
    """The paper's qualitative claim for ``variant`` on the last moment's probe errors."""
    deep = layer_range_mean(errors, 113, 128)
    if variant == "plain":
        return deep > 0.7 * chance
    if variant == "aux":
        return deep < 0.5 * chance
    return layer_range_mean(errors, 1, 63) - layer_range_mean(errors, 64, 128) > 0.25 * chance


def run(out: Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True,
        variant: str = "plain", steps: list[int] | None = None) -> Summary:
    """Train the deep MLP with RMSProp, probing every layer on the frozen model at each of ``steps``."""
    settings = QUICK if quick else FULL
    moments = sorted(set(steps if steps is not None else settings.steps))
    splits = lp.standard_splits(data, seed=seed)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    probe_train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
                               [:settings.probe_train])
    model = deep_mlp(variant=variant, in_features=train.x[0].numel(), num_classes=train.num_classes, seed=seed)
    optimizer = rmsprop(model, settings.lr)
    layers = probed_layers(model, settings.probe_every)
    results, model_errors, done = [], {}, 0
    for step in moments:
        train_minibatches(model, train, optimizer, count=step - done, seed=seed + step)
        done = step
        results.append(lp.probe(model, probe_train, valid, test, layers=layers, cache_dir=out / "cache", reduce="none",
                                l2_path=settings.l2_path, step=step, progress=progress, plot=False))
        model_errors[step] = model_error(model, test)
    result = lp.ProbeResult.concat(results)
    result.save(out)
    figures = [plot_layer_errors(result, out / f"errors_step{step}.png", step=step,
                                 title=f"deep-mlp ({variant}): probe test error after {step} minibatches").name
               for step in moments]
    figures.append(plot_heatmap(result, out / "heatmap.png",
                                title=f"deep-mlp ({variant}): probe test error per layer and minibatch").name)
    chance = max(info.chance_error for info in result.layers)
    findings = []
    for step in moments:
        errors = result.errors("test", step=step)
        blocks = ", ".join(f"{k}: {v:.0%}" for k, v in block_means(errors).items())
        findings.append(f"after {step} minibatches: input {errors['input']:.1%}; layers {blocks}; "
                        f"the model's own test error {model_errors[step]:.1%}")
    last = result.errors("test", step=moments[-1])
    findings.append(f"after {moments[-1]} minibatches: layers 1-63 {layer_range_mean(last, 1, 63):.1%}, "
                    f"layers 64-128 {layer_range_mean(last, 64, 128):.1%}, layers 113-128 "
                    f"{layer_range_mean(last, 113, 128):.1%} (chance {chance:.1%})")
    return Summary(f"deep-mlp ({variant})", CLAIMS[variant], findings, verdict(variant, last, chance),
                   figures=figures, tables=[r.table() for r in results],
                   settings={"data": data, "variant": variant, "model": "128 x Linear(128) + LeakyReLU(0.5), Glorot "
                             "normal" + {"plain": "", "aux": ", linear heads after layers 16, 32, ..., 112 (loss added)",
                                         "skip": ", input concatenated into layer 64"}[variant],
                             "train/valid/test": f"{len(train)}/{len(valid)}/{len(test)}",
                             "optimiser": f"centred RMSProp lr {settings.lr:g}, decay 0.9, momentum 0.9, eps 1e-5; "
                                          f"batch {BATCH_SIZE}",
                             "probed at minibatches": moments, "probed layers": f"input and every {settings.probe_every}"
                             f" layer(s) ({len(layers)} probes)", "probe train/valid/test samples":
                             f"{len(probe_train)}/{len(valid)}/{len(test)}", "l2 path": settings.l2_path,
                             "reported error": "test split", "torch threads": torch.get_num_threads(), "seed": seed})
