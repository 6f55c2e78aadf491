"""resnet: a ResNet-50-layout net probed at its input and after each of its 16 additions (Table 4a, Fig. 4b).

The paper probes a pretrained ResNet-50 on ImageNet, every feature map average-pooled to one number
per channel, and finds the probe's valid error falling almost perfectly monotonically with depth,
from 0.99 at the input to 0.31 after add_16.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

import linprobe as lp
from linprobe.diagram import draw_model, model_layers
from linprobe.experiments.report import RISE, Summary, depth_trend
from linprobe.experiments.training import at_most, model_error, train_sgd
from linprobe.models import resnet_probe_points, small_resnet
from linprobe.plots import plot_errors_against_model
from linprobe.results import markdown_table
from linprobe.solvers import DEFAULT_L2_PATH

CLAIM = ("deeper features are better at predicting the classes: the probe valid error falls almost perfectly "
         "monotonically along the depth of ResNet-50 (0.99 at the input, 0.31 after add_16, Table 4a / Fig. 4b)")


@dataclass(frozen=True)
class Settings:
    """Training samples (None: all), epochs and batch size; the probes' training samples and L2 path."""

    limit: int | None
    epochs: int
    batch_size: int
    probe_train: int | None
    l2_path: tuple[float, ...]


# Quick probes see a few hundred samples: one strong L2 (the weak end of the library's path only
# overfits there and costs most of the L-BFGS iterations).
QUICK = Settings(limit=800, epochs=2, batch_size=64, probe_train=None, l2_path=(1e0,))
FULL = Settings(limit=None, epochs=5, batch_size=128, probe_train=10_000, l2_path=DEFAULT_L2_PATH)


def run(out: Path, *, quick: bool = False, data: str = "fashion-mnist", seed: int = 0, progress: bool = True,
        epochs: int | None = None) -> Summary:
    """Train the small ResNet, probe its 17 points with per-channel pooling, tabulate and plot the errors."""
    settings = QUICK if quick else FULL
    if epochs is not None:
        settings = replace(settings, epochs=epochs)
    splits = lp.standard_splits(data, seed=seed, limit=settings.limit)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    probes_on = at_most(train, settings.probe_train, seed=seed)
    model = small_resnet(seed=seed)
    steps = train_sgd(model, train, epochs=settings.epochs, batch_size=settings.batch_size, seed=seed)
    result = lp.probe(model, probes_on, valid, test, layers=resnet_probe_points(model), reduce="pool",
                      cache_dir=out / "cache", out_dir=out, step=steps, seed=seed, l2_path=settings.l2_path,
                      progress=progress)
    own = model_error(model, valid)
    result.meta["model_valid_error"] = own
    result.save(out)
    figures = draw_figures(model, result, out)
    table = table_4a(result)
    (out / "table_4a.md").write_text(table + "\n")
    return _summary(result, table, figures=figures,
                    settings={"data": data, "train/valid/test": f"{len(train)}/{len(valid)}/{len(test)}",
                              "probe training samples": len(probes_on), "epochs": settings.epochs, "steps": steps,
                              "optimiser": "SGD Nesterov 0.9, lr 0.05 cosine per epoch, wd 5e-4, "
                                           f"batch {settings.batch_size}",
                              "reduction": "pool (one average per channel, as the paper)",
                              "probe L2 path": list(settings.l2_path), "torch threads": torch.get_num_threads(),
                              "seed": seed})


def draw_figures(model: torch.nn.Module, result: lp.ProbeResult, out: Path) -> list[str]:
    """Fig. 4b (probe valid error per layer beside the model's own) and the diode diagram coloured by error."""
    errors = result.errors("valid")
    plot_errors_against_model(errors, result.meta["model_valid_error"], out / "resnet_errors.png",
                              chance=result.chance_error,
                              title="small ResNet (ResNet-50 layout): probe valid error per layer (cf. Fig. 4b)")
    draw_model(model_layers(model), out / "resnet_diagram.png", errors=errors, probed=list(errors),
               shapes={info.name: info.shape for info in result.layers},
               title="small ResNet: probes behind diodes, coloured by probe valid error")
    return ["resnet_errors.png", "resnet_diagram.png"]


def _summary(result: lp.ProbeResult, table: str, *, figures: list[str], settings: dict[str, object]) -> Summary:
    """Our Table 4a beside the paper's: the trend along the depth and the model's own error."""
    errors, own = result.errors("valid"), result.meta["model_valid_error"]
    rho, rises = depth_trend(errors)
    last = list(errors)[-1]
    findings = [f"probe valid error: input {errors['input']:.3f}, add_1 {errors['add_1']:.3f}, "
                f"add_7 {errors['add_7']:.3f}, add_13 {errors['add_13']:.3f}, {last} {errors[last]:.3f} "
                "(paper: 0.99, 0.94, 0.76, 0.51, 0.31)",
                f"Spearman rank correlation of probe valid error with depth: {rho:.2f} (-1 is perfectly monotone)",
                f"rises of more than {RISE:.0%} from one probe to the next: "
                + (", ".join(f"{a}->{b} (+{d:.3f})" for a, b, d in rises) or "none"),
                f"the model's own valid error: {own:.3f}; probe after {last}: {errors[last]:.3f}"]
    return Summary("resnet", CLAIM, findings, agrees=rho <= -0.8 and errors[last] < errors["input"],
                   figures=figures, tables=[table], settings=settings,
                   notes=["per-channel pooling leaves the input (one grey channel) a single feature, its mean "
                          "brightness, so its probe is near chance, like the paper's 0.99 from 3 colour means",
                          "the model is ResNet-50's stage layout (bottlenecks 3, 4, 6, 3) with widths 8-64 (block "
                          "outputs 32-256 channels) on 28x28 grey images, trained here from scratch; the paper used "
                          "a pretrained ResNet-50 on ImageNet (1000 classes, chance 0.999; here 10, chance 0.9)"])


def table_4a(result: lp.ProbeResult) -> str:
    """The paper's Table 4a as a markdown table: layer name, topology C x H x W, probe valid (and test) error."""
    return markdown_table(
        ["layer name", "topology (C x H x W)", "features", "probe valid error", "probe test error"],
        [[info.name, " x ".join(map(str, info.shape)), str(info.features_out),
          f"{result.value(info.name, 'valid'):.3f}", f"{result.value(info.name, 'test'):.3f}"]
         for info in result.layers])
