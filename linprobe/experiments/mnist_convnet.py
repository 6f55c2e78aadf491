"""mnist-convnet: the TF tutorial convnet probed at ten points before and after training (Fig. 5 / Fig. 3).

The paper reports, untrained, an error falling from about 8% at the input to about 2% after the
first ReLU, and after training an improvement at every layer except a small kink at fc1_preact.
A ``Monitor`` watches the training as well: online probes learning from the training forward and
exact snapshots on a fixed probe-training subset every few minibatches, side by side in one table
(``monitor/``), with a heatmap, an animation and diagnostics for each kind.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

import linprobe as lp
from linprobe.atomic import atomic_write_text
from linprobe.experiments.report import (
    Check,
    Headline,
    HeadRefit,
    Summary,
    compare,
    listed,
    significant_steps,
    standard_error,
    with_se,
)
from linprobe.experiments.seeds import setting
from linprobe.experiments.training import model_error, train_epochs
from linprobe.models import MNIST_CONVNET_PROBES, mnist_convnet, mnist_convnet_l2_params
from linprobe.report.diagram import model_layers
from linprobe.report.plots import plot_layer_curves
from linprobe.training.monitor import gap_table, online_metric

CLAIM = ("untrained, the probe error falls from about 8% at the input to about 2% after the first ReLU; "
         "trained, it improves at every layer except a small kink at fc1_preact")
PAPER_TRAIN, PAPER_TEST = 50_000, 10_000  # the paper's MNIST training set and its valid and test sets


def notes(*, n_train: int, n_test: int, epochs: int, steps: int) -> list[str]:
    """What a reader needs to weigh this run's numbers, computed from its sizes: the noise on its test set
    against the paper's, and its training set against the paper's."""
    return [(f"one standard error of a probe's test error near 3% is {100 * standard_error(0.03, n_test):.2f} points "
            f"on these {n_test:,} test images; the paper's valid and test sets of {PAPER_TEST:,} images make it "
            f"{math.sqrt(PAPER_TEST / n_test):.1f} times tighter, so a small kink seen there can be noise here"),
            (f"the model trained on {n_train:,} images for {epochs} epoch(s), {steps} minibatches (the paper: "
            f"{PAPER_TRAIN:,} images), hence the higher absolute errors; the paper's magnitudes are not compared")]


MONITOR = {"quick": {"every": 5, "probe_train": 300}, "full": {"every": 100, "probe_train": 1000}}
MONITOR_L2_PATH = (1e-1, 1e-2, 1e-3)  # a short path: an exact snapshot every ``every`` minibatches must stay cheap


def train_tutorial(model: torch.nn.Module, train: lp.ArrayDataset, *, epochs: int, seed: int,
                   monitor: lp.Monitor | None = None) -> int:
    """The tutorial's recipe: momentum 0.9, lr 0.01 decayed 0.95 per epoch, batch 32, L2 5e-4 on fc layers.

    A ``monitor`` steps after each backward, before the update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    l2_params = mnist_convnet_l2_params(model)

    def penalty() -> torch.Tensor:
        return cast(torch.Tensor, 5e-4 * sum(p.square().sum() for p in l2_params) / 2)

    def watch(step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if monitor is not None:
            monitor.step(y, step)

    return train_epochs(model, train, optimizer, epochs=epochs, batch_size=32, seed=seed,
                        scheduler=torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.95), penalty=penalty,
                        before_update=None if monitor is None else watch)


def monitor_settings(quick: bool) -> dict[str, int]:
    """How often the monitor measures and how many training images its exact probes use."""
    return MONITOR["quick" if quick else "full"]


def monitored_training(model: torch.nn.Module, splits: dict[str, lp.ArrayDataset], out: Path, *, epochs: int,
                       quick: bool, seed: int) -> tuple[int, lp.ProbeResult, list[str]]:
    """Train under a Monitor (online probes + exact snapshots, measured on valid); write its table and timelines.

    Returns the steps done, the monitor's table and findings: overhead, online-vs-exact gap, diagnostics."""
    settings = monitor_settings(quick)
    train = splits["train"]
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:settings["probe_train"]]
    with lp.Monitor(model, list(MNIST_CONVNET_PROBES), num_classes=10, valid=splits["valid"], every=settings["every"],
                    exact=train.subset(subset), l2_path=MONITOR_L2_PATH, seed=seed) as monitor:
        began = time.perf_counter()
        steps = train_tutorial(model, train, epochs=epochs, seed=seed, monitor=monitor)
        monitor.measure(steps)  # the trained model itself
        seconds = time.perf_counter() - began
    result = monitor.result
    folder = out / "monitor"
    result.save(folder)
    names = model_layers(model)
    for kind, metric in (("exact", "top1_error"), ("online", online_metric("top1_error"))):
        lp.save_timeline(result, folder / kind, metric=metric, model_names=names)
    gaps = lp.online_exact_gap(result)
    plot_layer_curves({"exact": result.errors("valid", step=steps),
                       "online": result.errors("valid", online_metric("top1_error"), steps)},
                      folder / "online_vs_exact.png", ylabel="probe valid error",
                      title=f"online and exact probes after {steps} minibatches")
    used = monitor.seconds
    train_only = seconds - sum(used.values())
    findings = [
        (f"live monitor (measured every {settings['every']} minibatches): online probes learning "
        f"{used['learn']:.1f} s + evaluating {used['online']:.1f} s beside {train_only:.1f} s of training "
        f"({(used['learn'] + used['online']) / train_only:.0%} overhead); exact snapshots {used['exact']:.1f} s"),
        (f"online minus exact valid error, mean over layers: {gaps[0].online_minus_exact:+.1%} at step 0, "
        f"{gaps[len(gaps) // 2].online_minus_exact:+.1%} at step {gaps[len(gaps) // 2].step}, "
        f"{gaps[-1].online_minus_exact:+.1%} at step {gaps[-1].step} (worst layer {gaps[-1].worst_layer}, "
        f"{gaps[-1].worst:.1%})"),
        *[f"diagnostics (exact snapshots): {f.describe()}" for f in lp.diagnose(result)]]
    atomic_write_text(folder / "gap.md", gap_table(gaps) + "\n")
    return steps, result, findings


HEAD_INPUT = "fc1_postact"  # what the head (logits) sees: dropout is the identity in eval mode
KINK = ("conv2_postpool", "fc1_preact")  # the paper's small rise after training
TRAINED_AT_MOST = 0.05  # the tutorial's model reaches about 1% on full MNIST; above 5% it is not trained


def checks(untrained: dict[str, float], trained: dict[str, float], model_error: float, n: int) -> list[Check]:
    """The paper's claims tested on the probes' test errors before and after training and the model's own test
    error, each a rate on ``n`` test images; a difference counts beyond two standard errors.

    Core: the model is trained (its own error at most 5%) and training improves every layer but the input.
    Also: untrained, conv1_postact is below the input (paper: about 8% -> 2%); trained, the kink
    conv2_postpool -> fc1_preact is a significant rise; elsewhere the trained error never rises significantly."""
    missing = set(MNIST_CONVNET_PROBES) - set(untrained) | set(MNIST_CONVNET_PROBES) - set(trained)
    if missing:
        raise ValueError(f"the convnet's checks need every probe point before and after training; missing {missing}")
    layers = [n_ for n_ in MNIST_CONVNET_PROBES if n_ != "input"]
    not_improved = [f"{k} {with_se(untrained[k], n)} -> {with_se(trained[k], n)}"
                    for k in layers if compare(untrained[k], trained[k], n) >= 0]
    a, b = (trained[k] for k in KINK)
    rises = [r for r in significant_steps({k: trained[k] for k in MNIST_CONVNET_PROBES}, n) if r[:2] != KINK]
    return [Check(f"the model is trained (its own test error at most {TRAINED_AT_MOST:.0%})",
                  model_error <= TRAINED_AT_MOST, f"model {with_se(model_error, n)}", core=True),
            Check("training improves every layer but the input", not not_improved,
                  f"{len(layers) - len(not_improved)} of {len(layers)} improved beyond 2 SE"
                  + (f"; not: {'; '.join(not_improved)}" if not_improved else ""), core=True),
            Check("untrained, conv1_postact is below the input (paper: about 8% -> 2%)",
                  compare(untrained["input"], untrained["conv1_postact"], n) < 0,
                  f"input {with_se(untrained['input'], n)}, conv1_postact {with_se(untrained['conv1_postact'], n)}"),
            Check("trained, a small kink: fc1_preact above conv2_postpool", compare(a, b, n) > 0,
                  f"conv2_postpool {with_se(a, n)} -> fc1_preact {with_se(b, n)}"),
            Check("trained, no other rise along the depth", not rises, f"significant rises: {listed(rises)}")]


@dataclass(frozen=True)
class Settings:
    """Training samples (None: all), epochs, whether a Monitor watches the training."""

    limit: int | None
    epochs: int
    monitor: bool


QUICK = Settings(limit=1000, epochs=1, monitor=True)
FULL = Settings(limit=None, epochs=10, monitor=True)
# Several seeds of the full run (``multi_seed``): the same data, model, training and probes without the Monitor,
# whose exact snapshots and online probes are about half of a full run's time; no check rests on them.
SEEDS = replace(FULL, monitor=False)


def head_refit(trained: dict[str, float], model_error: float, n: int, n_train: int) -> HeadRefit:
    """Fig. 4b on the trained convnet: fc1_postact is exactly what the head (``logits``) sees, dropout being the
    identity in eval mode; its probe and the head were trained on the same images."""
    return HeadRefit(HEAD_INPUT, "test", trained[HEAD_INPUT], model_error, n, probe_train=n_train, model_train=n_train)


def run(out: Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True,
        epochs: int | None = None, multi_seed: bool = False) -> Summary:
    """Probe the ten points untrained, train as the tutorial does (under a Monitor unless ``multi_seed``), probe
    again; ``multi_seed`` is the lighter full setting that several seeds run (:data:`SEEDS`)."""
    settings = setting(quick=QUICK, full=FULL, seeds=SEEDS, quick_run=quick, multi_seed=multi_seed, epochs=epochs)
    splits = lp.standard_splits(data, seed=seed, limit=settings.limit)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    model = mnist_convnet(seed=seed)
    common: dict[str, Any] = {"layers": list(MNIST_CONVNET_PROBES), "cache_dir": out / "cache", "reduce": "none",
                              "progress": progress}
    before = lp.probe(model, train, valid, test, out_dir=out / "untrained", **common)
    if settings.monitor:
        steps, _, monitored = monitored_training(model, splits, out, epochs=settings.epochs, quick=quick, seed=seed)
    else:
        steps, monitored = train_tutorial(model, train, epochs=settings.epochs, seed=seed), []
    after = lp.probe(model, train, valid, test, out_dir=out / "trained", step=steps, **common)
    lp.ProbeResult.concat([before, after]).save(out)
    untrained, trained = before.errors("test"), after.errors("test")
    plot_layer_curves({"untrained": untrained, f"trained ({settings.epochs} epochs)": trained},
                      out / "mnist_convnet.png", ylabel="probe test error",
                      title="MNIST convnet: linear probe test error per layer")
    improved = [k for k in MNIST_CONVNET_PROBES if trained[k] < untrained[k]]
    n, own = len(test), model_error(model, test)
    refit = head_refit(trained, own, n, len(train))
    findings = [(f"untrained: input {with_se(untrained['input'], n)}, conv1_postact "
                f"{with_se(untrained['conv1_postact'], n)}, logits {with_se(untrained['logits'], n)}"),
                (f"trained ({steps} steps): input {with_se(trained['input'], n)}, fc1_preact "
                f"{with_se(trained['fc1_preact'], n)}, fc1_postact {with_se(trained['fc1_postact'], n)}, logits "
                f"{with_se(trained['logits'], n)}"),
                (f"layers improved by training: {len([k for k in improved if k != 'input'])} of "
                f"{len(MNIST_CONVNET_PROBES) - 1} (the input cannot change)"),
                (f"kink (paper: a small rise after conv2_postpool): conv2_postpool {with_se(trained[KINK[0]], n)} "
                f"-> fc1_preact {with_se(trained[KINK[1]], n)}"),
                f"the model's own test error: {with_se(own, n)}", refit.discussion(),
                (f"the last probe, on logits (the head's output, 10 scores), is a linear refit of the model's own "
                 f"scores: {with_se(trained['logits'], n)} (it can reweigh the scores, not see more than the head)"),
                *monitored]
    figures = ["mnist_convnet.png"] + (MONITOR_FIGURES if settings.monitor else [])
    return Summary("mnist-convnet", CLAIM, findings, checks(untrained, trained, own, n), figures=figures,
                   notes=notes(n_train=len(train), n_test=n, epochs=settings.epochs, steps=steps)
                   + ([] if settings.monitor else [SEEDS_NOTE]),
                   tables=[before.table(markdown=True), after.table(markdown=True)],
                   settings={"data": data, "train/valid/test": f"{len(train)}/{len(valid)}/{len(test)}",
                             "epochs": settings.epochs, "reduction": "none (every feature, as the paper)",
                             "monitor": monitor_text(quick, settings),
                             "torch threads": torch.get_num_threads(), "seed": seed},
                   headline=Headline("test", n, before.chance_error, {"untrained": untrained, "trained": trained},
                                     model_error=own, head=refit))


MONITOR_FIGURES = ["monitor/exact/heatmap.png", "monitor/online/heatmap.png", "monitor/online_vs_exact.png",
                   "monitor/exact/animation.gif", "monitor/exact/diagram.png"]
SEEDS_NOTE = ("the multi-seed setting: no Monitor (no monitor/ folder, heatmaps, animation or its findings), so three "
              "seeds take about the time of one full run; the data, model, training and probes are the full run's")


def monitor_text(quick: bool, settings: Settings) -> str:
    """The monitor's setting as the summary states it."""
    if not settings.monitor:
        return "none (the multi-seed setting)"
    monitor = monitor_settings(quick)
    return (f"every {monitor['every']} minibatches, online (Adam lr 1e-3) and exact (L2 path {MONITOR_L2_PATH}, "
            f"{monitor['probe_train']} probe-train samples), automatic reduction, measured on valid")
