"""diagram: the diode notation (Appendix A) drawn for each of the paper's models, a probe behind a diode on every tap.

Probes read the features in the forward pass but send no gradient back, so 001 draws the wire to
each probe through a diode, the one-way valve of electronics (Fig. 7). Nothing is measured here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import linprobe as lp
from linprobe.experiments.report import Summary
from linprobe.models import (
    MNIST_CONVNET_PROBES,
    deep_mlp,
    inception_layout,
    inception_probe_points,
    mnist_convnet,
    resnet_probe_points,
    small_inception,
    small_resnet,
)
from linprobe.report.diagram import GAP, draw_model, elide, model_layers, split_layout

CLAIM = ("probes consume the features during the forward pass but do not contribute to backpropagation: a diode "
         "on the wire to each probe says that no gradient flows back (Appendix A, Fig. 7)")
EXAMPLE_SHAPE = (1, 28, 28)


def run(out: Path, *, quick: bool = False, data: str = "fashion-mnist", seed: int = 0,
        progress: bool = True) -> Summary:
    """Draw the MNIST convnet, the deep MLP with its skip (elided), the small ResNet and the small Inception."""
    layouts = paper_layouts(seed=seed)
    for name, layout in layouts.items():
        draw_model(**layout, path=out / f"{name}.png", title=f"{name}: probes behind diodes (001 Appendix A)")
    lp.ProbeResult([], meta={"diagrams": layouts}).save(out)
    findings = [f"{name}: {len(lay['shapes'])} layers drawn, {len(lay['probed'])} probes"
                + "".join(f", auxiliary branch {b} off {p}" for p, b in lay.get("branches", {}).items())
                + "".join(f", skip {s} -> {d}" for s, d in lay.get("skips", {}).items())
                for name, lay in layouts.items()]
    return Summary("diagram", CLAIM, findings, checks=[], figures=[f"{name}.png" for name in layouts],
                   notes=["a notation, not a measurement: results.csv is empty and results.json holds the drawn "
                          "layouts; the resnet and inception experiments colour the same diagrams by probe error",
                          f"the deep MLP's 128 layers are elided ('{GAP}') to the ends and the skip's neighbourhood"],
                   settings={"data": f"{data} (not used: a diagram needs only the model)", "seed": seed})


def paper_layouts(*, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``draw_model`` arguments (without path) for each of the paper's models, with output shapes."""
    convnet, resnet, inception = mnist_convnet(seed=seed), small_resnet(seed=seed), small_inception(seed=seed)
    mlp = deep_mlp(variant="skip", seed=seed)
    skip = f"layer{mlp.skip_to}"
    probe_mlp = ["input", *mlp.layer_names]
    keep = {"input", "flatten", "classifier", *mlp.layer_names[:2], *mlp.layer_names[-2:],
            *(f"layer{mlp.skip_to + d}" for d in (-1, 0, 1))}
    main, branches = split_layout(inception_layout(inception))
    models = {"mnist_convnet": convnet, "deep_mlp_skip": mlp, "small_resnet": resnet, "small_inception": inception}
    layouts: dict[str, dict[str, Any]] = {
        "mnist_convnet": dict(names=model_layers(convnet, _example()), probed=list(MNIST_CONVNET_PROBES)),
        "deep_mlp_skip": dict(names=elide(model_layers(mlp, _example()), keep),
                              probed=[n for n in probe_mlp if n in keep], skips={"input": skip}),
        "small_resnet": dict(names=model_layers(resnet, _example()), probed=resnet_probe_points(resnet)),
        "small_inception": dict(names=main, branches=branches, probed=inception_probe_points(inception)),
    }
    for name, layout in layouts.items():
        drawn = [*layout["names"], *(n for branch in layout.get("branches", {}).values() for n in branch)]
        layout["shapes"] = output_shapes(models[name], drawn)
    return layouts


def output_shapes(model: nn.Module, names: list[str]) -> dict[str, list[int]]:
    """Each named layer's output shape for one example (``GAP`` skipped), through a forward in eval mode."""
    names = [n for n in names if n != GAP]
    was = model.training
    model.eval()
    with torch.no_grad(), lp.Taps(model, names) as taps:
        features = taps.run(_example())
    model.train(was)
    return {n: list(h.shape[1:]) for n, h in features.items()}


def _example() -> torch.Tensor:
    return torch.zeros(2, *EXAMPLE_SHAPE)
