"""resnet: probes on the input and after each of the 16 residual additions of a ResNet-50-layout net (Table 4a, Fig. 4b).

The paper probes a pretrained ResNet-50 on ImageNet, every feature map average-pooled to one number
per channel, and finds the probe's valid error falling almost perfectly monotonically with depth,
from 0.99 at the input to 0.31 after add_16.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from scipy.stats import spearmanr

import linprobe as lp
from linprobe.diagram import draw_model, model_layers
from linprobe.experiments.report import Summary
from linprobe.experiments.training import at_most, model_error, train_sgd
from linprobe.models import resnet_probe_points, small_resnet
from linprobe.plots import plot_errors_against_model

CLAIM = ("deeper features are better at predicting the classes: the probe valid error falls almost perfectly "
         "monotonically along the depth of ResNet-50 (0.99 at the input, 0.31 after add_16, Table 4a / Fig. 4b)")
QUICK_LIMIT = 800
FULL_EPOCHS, QUICK_EPOCHS = 6, 1
FULL_PROBE_LIMIT = 10_000
BATCH_SIZE = 128
RISE = 0.01  # a rise of the error along the depth larger than this counts against monotonicity


def run(out: Path, *, quick: bool = False, data: str = "fashion-mnist", seed: int = 0, progress: bool = True,
        epochs: int | None = None, probe_limit: int | None = None) -> Summary:
    """Train the small ResNet, probe its 17 points with per-channel pooling, tabulate and plot the errors."""
    splits = lp.standard_splits(data, seed=seed, limit=QUICK_LIMIT if quick else None)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    epochs = epochs or (QUICK_EPOCHS if quick else FULL_EPOCHS)
    probe_train = at_most(train, probe_limit or (None if quick else FULL_PROBE_LIMIT), seed=seed)
    model = small_resnet(seed=seed)
    steps = train_sgd(model, train, epochs=epochs, batch_size=BATCH_SIZE, seed=seed)
    result = lp.probe(model, probe_train, valid, test, layers=resnet_probe_points(model), reduce="pool",
                      cache_dir=out / "cache", out_dir=out, step=steps, seed=seed, progress=progress)
    own = model_error(model, valid)
    result.meta["model_valid_error"] = own
    result.save(out)
    errors = result.errors("valid")
    chance = max(info.chance_error for info in result.layers)
    plot_errors_against_model(errors, own, out / "resnet_errors.png", chance=chance,
                              title="small ResNet (ResNet-50 layout): probe valid error per layer (cf. Fig. 4b)")
    draw_model(model_layers(model), out / "resnet_diagram.png", errors=errors, probed=list(errors),
               shapes={info.name: info.shape for info in result.layers},
               title="small ResNet: probes behind diodes, coloured by probe valid error")
    table = table_4a(result)
    (out / "table_4a.md").write_text(table + "\n")
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
                   figures=["resnet_errors.png", "resnet_diagram.png"], tables=[table],
                   notes=["per-channel pooling leaves the input (one grey channel) a single feature, its mean "
                          "brightness, so its probe is near chance, like the paper's 0.99 from 3 colour means",
                          "the model is ResNet-50's stage layout (bottlenecks 3, 4, 6, 3) with widths 8-64 (block "
                          "outputs 32-256 channels) on 28x28 grey images, trained here from scratch; the paper used "
                          "a pretrained ResNet-50 on ImageNet (1000 classes, chance 0.999; here 10, chance 0.9)"],
                   settings={"data": data, "train/valid/test": f"{len(train)}/{len(valid)}/{len(test)}",
                             "probe training samples": len(probe_train), "epochs": epochs, "steps": steps,
                             "optimiser": f"SGD Nesterov 0.9, lr 0.05 cosine, wd 5e-4, batch {BATCH_SIZE}",
                             "reduction": "pool (one average per channel, as the paper)",
                             "torch threads": torch.get_num_threads(), "seed": seed})


def table_4a(result: lp.ProbeResult) -> str:
    """The paper's Table 4a as a markdown table: layer name, topology C x H x W, probe valid (and test) error."""
    return markdown_table(
        ["layer name", "topology (C x H x W)", "features", "probe valid error", "probe test error"],
        [[info.name, " x ".join(map(str, info.shape)), str(info.features_out),
          f"{result.value(info.name, 'valid'):.3f}", f"{result.value(info.name, 'test'):.3f}"] for info in result.layers])


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with its columns padded to line up in plain text too."""
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in (head, *rows)]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def depth_trend(errors: dict[str, float], *, rise: float = RISE) -> tuple[float, list[tuple[str, str, float]]]:
    """Spearman correlation of error with position (-1: strictly falling) and every rise larger than ``rise``."""
    names, values = list(errors), list(errors.values())
    rho = float(spearmanr(range(len(values)), values).statistic)
    rises = [(a, b, eb - ea) for a, b, ea, eb in zip(names, names[1:], values, values[1:]) if eb - ea > rise]
    return rho, rises
