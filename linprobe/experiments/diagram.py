"""diagram: the diode notation (Appendix A) for each of the paper's models; the deep MLPs coloured by probe error.

Probes read the features in the forward pass but send no gradient back, so 001 draws the wire to
each probe through a diode, the one-way valve of electronics (Fig. 7). The plain diagrams measure
nothing. The coloured ones are the diagnoses the notation is for: the 128-layer MLP with a skip into
layer 64 (001 Fig. 6) and the one guided by an auxiliary head every 16 layers (002 Fig. 6a, 7), each
probe coloured by its test error on the one scale 0..chance, from the deep-mlp experiment's committed
full runs (docs/results/deep-mlp-skip, deep-mlp-aux): the paper's own models at the paper's moments,
read in milliseconds, where retraining even the quick 64-layer stand-in would cost minutes.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import linprobe as lp
from linprobe.experiments import deep_mlp as mlp_experiment
from linprobe.experiments.report import Check, Summary, summary_settings, with_se
from linprobe.models import (
    MLP,
    MNIST_CONVNET_PROBES,
    deep_mlp,
    inception_layout,
    inception_probe_points,
    mnist_convnet,
    resnet_probe_points,
    small_inception,
    small_resnet,
)
from linprobe.report.diagram import GAP, draw_model, elide, model_figure, model_layers, probe_colours, split_layout
from linprobe.report.plots import save_figure

CLAIM = ("probes consume the features during the forward pass but do not contribute to backpropagation: a diode "
         "on the wire to each probe says that no gradient flows back (Appendix A, Fig. 7); coloured by probe error, "
         "the diagram of the 128-layer MLP with a skip into layer 64 shows layers 1-63 left useless while the layers "
         "from 64 on learn (001 Fig. 6, 002 Fig. 8), and that of the MLP guided by a head every 16 layers shows its "
         "deep layers made useful (002 Fig. 6a, 7)")
EXAMPLE_SHAPE = (1, 28, 28)
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"  # where the committed full runs live
SOURCES = {"skip": "deep-mlp-skip", "aux": "deep-mlp-aux"}  # variant -> the deep-mlp run its colours come from
SPLIT = "test"  # the split the deep-mlp experiment reports
BOXES = 16  # a coloured deep MLP shows every (depth / BOXES)-th layer besides the ends and its skip's neighbours


def run(out: Path, *, quick: bool = False, data: str = "fashion-mnist", seed: int = 0, progress: bool = True,
        results_from: str | Path | None = None) -> Summary:
    """Draw the MNIST convnet, the deep MLP with its skip (elided), the small ResNet and the small Inception; then
    the skip and the guided deep MLPs coloured by probe error at each moment of their deep-mlp runs, read from
    ``results_from`` (a folder holding deep-mlp-skip/ and deep-mlp-aux/; default: the committed docs/results)."""
    layouts = paper_layouts(seed=seed)
    for name, layout in layouts.items():
        draw_model(**layout, path=out / f"{name}.png", title=f"{name}: probes behind diodes (001 Appendix A)")
    sources = {variant: load_source(Path(results_from or RESULTS) / folder) for variant, folder in SOURCES.items()}
    coloured = {name: record for variant, (result, about) in sources.items()
                for name, record in draw_coloured(variant, result, out, seed=seed).items()}
    lp.ProbeResult([], meta={"diagrams": layouts, "coloured": coloured}).save(out)
    findings = [f"{name}: {len(lay['shapes'])} layers drawn, {len(lay['probed'])} probes"
                + "".join(f", auxiliary branch {b} off {p}" for p, b in lay.get("branches", {}).items())
                + "".join(f", skip {s} -> {d}" for s, d in lay.get("skips", {}).items())
                for name, lay in layouts.items()]
    findings += [coloured_finding(name, record, sources[record["variant"]]) for name, record in coloured.items()]
    judged = [check for variant, (result, about) in sources.items()
              for check in diagnosis_checks(variant, result, n=test_images(about))]
    return Summary("diagram", CLAIM, findings, judged, figures=[*(f"{name}.png" for name in layouts), *coloured],
                   notes=[("results.csv is empty: results.json holds the drawn layouts and, for each coloured diagram, "
                           "its source, the errors fed and the colours read back from the drawn figure"),
                          (f"the deep MLPs' 128 layers are elided ('{GAP}'): the plain diagram to the ends and the "
                           f"skip's neighbourhood, the coloured ones to the ends, every (depth / {BOXES})-th layer "
                           "and the skip's neighbourhood; every layer's probe is in the numbers and checks"),
                          ("the colours are the deep-mlp experiment's committed full runs, not a new training: the "
                           "checks re-judge those runs' numbers as the diagrams show them (the deep-mlp summaries "
                           "judge them the same way); a fresh run there, then this one, redraws them"),
                          "the guides (orange, under the path) are trained heads, not probes: no diode, no colour"],
                   settings={"data": f"{data} (not used by the plain diagrams: a diagram needs only the model)",
                             **{f"{variant} colours from": source_text(result, about)
                                for variant, (result, about) in sources.items()},
                             "coloured by": f"probe {SPLIT} top-1 error, on the scale 0 (blue) to chance (red)",
                             "seed": seed})


def paper_layouts(*, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``draw_model`` arguments (without path) for each of the paper's models, with output shapes."""
    convnet, resnet, inception = mnist_convnet(seed=seed), small_resnet(seed=seed), small_inception(seed=seed)
    skip_to = 64  # 002's skip from the input into layer 64 of 128
    mlp = deep_mlp(variant="skip", skip_to=skip_to, seed=seed)
    skip = f"layer{skip_to}"
    probe_mlp = ["input", *mlp.layer_names]
    keep = {"input", "flatten", "classifier", *mlp.layer_names[:2], *mlp.layer_names[-2:],
            *(f"layer{skip_to + d}" for d in (-1, 0, 1))}
    main, branches = split_layout(inception_layout(inception))
    models = {"mnist_convnet": convnet, "deep_mlp_skip": mlp, "small_resnet": resnet, "small_inception": inception}
    layouts: dict[str, dict[str, Any]] = {
        "mnist_convnet": {"names": model_layers(convnet, _example()), "probed": list(MNIST_CONVNET_PROBES)},
        "deep_mlp_skip": {"names": elide(model_layers(mlp, _example()), keep),
                          "probed": [n for n in probe_mlp if n in keep], "skips": {"input": skip}},
        "small_resnet": {"names": model_layers(resnet, _example()), "probed": resnet_probe_points(resnet)},
        "small_inception": {"names": main, "branches": branches, "probed": inception_probe_points(inception)},
    }
    for name, layout in layouts.items():
        layout["shapes"] = output_shapes(models[name], _drawn(layout))
    return layouts


def load_source(folder: Path) -> tuple[lp.ProbeResult, dict[str, str]]:
    """A deep-mlp run's probe results and the settings its summary states (seed, sizes, wall time), with the
    sha256 of its results.csv under ``"results.csv sha256"``."""
    if not (folder / "results.json").is_file() or not (folder / "summary.md").is_file():
        variant = next((v for v, f in SOURCES.items() if f == folder.name), "skip")
        raise FileNotFoundError(f"{folder} holds no deep-mlp run (results.json and summary.md): make it with "
                                f"`linprobe reproduce deep-mlp --variant {variant} --out {folder}` or pass "
                                "results_from=<a folder with deep-mlp-skip/ and deep-mlp-aux/>")
    about = summary_settings(folder / "summary.md")
    about["folder"] = _shown(folder)
    about["results.csv sha256"] = hashlib.sha256((folder / "results.csv").read_bytes()).hexdigest()[:16]
    return lp.ProbeResult.load(folder), about


def _shown(folder: Path) -> str:
    """``folder`` relative to the repository when it lies inside it (a summary should not name a home folder)."""
    try:
        return str(folder.resolve().relative_to(RESULTS.parents[1]))
    except ValueError:
        return str(folder)


def test_images(about: dict[str, str]) -> int:
    """The number of test images a deep-mlp run scored its probes on, from its ``train/valid/test`` setting."""
    return int(about["train/valid/test"].split("/")[2])


def source_text(result: lp.ProbeResult, about: dict[str, str]) -> str:
    """Where a coloured diagram's numbers come from and what that run used, for the settings section."""
    return (f"{about['folder']} (results.csv sha256 {about['results.csv sha256']}; its summary: {about['model']}; "
            f"train/valid/test {about['train/valid/test']}; probed at minibatches {result.steps}; seed "
            f"{about['seed']}; wall time {about['wall time']})")


def depth_of(result: lp.ProbeResult) -> int:
    """The deep MLP's depth from the layers a deep-mlp run probed (``input``, ``layer1`` .. ``layerN``)."""
    return max(mlp_experiment.layer_index(name) for name in result.names)


def mlp_for(variant: str, result: lp.ProbeResult, *, seed: int = 0) -> MLP:
    """An (untrained) deep MLP of ``variant`` shaped as the run behind ``result`` was: its depth, width and input
    size, the skip into the middle, a head every eighth of the depth (as the deep-mlp experiment builds them)."""
    depth = depth_of(result)
    shapes = {info.name: info.shape for info in result.layers}
    return deep_mlp(variant=variant, depth=depth, width=int(shapes["layer1"][-1]),
                    in_features=math.prod(shapes["input"]), aux_every=max(1, depth // 8), skip_to=depth // 2,
                    seed=seed)


def coloured_layout(variant: str, result: lp.ProbeResult, *, seed: int = 0) -> dict[str, Any]:
    """``model_figure`` arguments (no errors yet) for the deep MLP ``variant`` behind ``result``: every
    (depth / ``BOXES``)-th layer, the first and last, the skip's neighbourhood (skip) or the layers the guides
    leave (aux) drawn, the rest elided; a probe on each drawn layer ``result`` measured; the guides as branches."""
    model = mlp_for(variant, result, seed=seed)
    depth, every = depth_of(result), max(1, depth_of(result) // BOXES)
    keep = {"input", "classifier", "layer1", *(f"layer{k}" for k in range(every, depth + 1, every))}
    layout: dict[str, Any] = {}
    if variant == "skip":
        keep |= {f"layer{depth // 2 + d}" for d in (-1, 0, 1)}
        layout["skips"] = {"input": f"layer{depth // 2}"}
    else:
        heads = [f"aux_heads.{name}" for name in model.aux_heads]
        keep |= {head.removeprefix("aux_heads.") for head in heads}
        layout["branches"] = {head.removeprefix("aux_heads."): [head] for head in heads}
    names = elide([n for n in model_layers(model, _example()) if n != "flatten"], keep)
    layout.update(names=names, probed=[n for n in names if n in result.names])
    layout["shapes"] = output_shapes(model, _drawn(layout))
    return layout


def draw_coloured(variant: str, result: lp.ProbeResult, out: Path, *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """One diagram of the deep MLP ``variant`` per moment of ``result``, each probe coloured by its ``SPLIT``
    error; per figure file: the variant, the step, the chance level, the errors fed and the colours read back."""
    layout, chance = coloured_layout(variant, result, seed=seed), result.chance_error
    drawn: dict[str, dict[str, Any]] = {}
    for step in result.steps:
        errors = {n: e for n, e in result.errors(SPLIT, step=step).items() if n in layout["probed"]}
        own = result.meta.get("model_test_error", {}).get(str(step))
        fig = model_figure(**layout, errors=errors, chance=chance,
                           title=f"deep MLP ({variant}) after {step} minibatches: probes coloured by {SPLIT} error"
                                 + (f"; the model's own {own:.1%}" if own is not None else ""))
        colours = probe_colours(fig)
        name = f"deep_mlp_{variant}_step{step}.png"
        save_figure(fig, out / name)
        drawn[name] = {"variant": variant, "step": step, "split": SPLIT, "chance": chance, "errors": errors,
                       "colours": {n: list(c) for n, c in colours.items()}, "layout": layout}
    return drawn


def ranges(variant: str, depth: int) -> list[tuple[int, int]]:
    """The layer ranges the paper's claim is about: below and from the skip (skip), the first three quarters and
    the last quarter (aux)."""
    if variant == "skip":
        return [(1, depth // 2 - 1), (depth // 2, depth)]
    return [(1, depth - depth // 4), (depth - depth // 4 + 1, depth)]


def coloured_finding(name: str, record: dict[str, Any], source: tuple[lp.ProbeResult, dict[str, str]]) -> str:
    """One coloured diagram in words: what is drawn and, over all the layers the run probed, the ranges the claim
    is about, each with its standard error on the run's test images."""
    result, about = source
    n, step = test_images(about), record["step"]
    errors = result.errors(SPLIT, step=step)
    means = [f"layers {a}-{b} {with_se(mlp_experiment.range_mean(errors, a, b), n)}"
             for a, b in ranges(record["variant"], depth_of(result))]
    own = result.meta.get("model_test_error", {}).get(str(step))
    return (f"{name}: {len(record['colours'])} probes coloured of the {len(errors)} the run fitted; {SPLIT} error "
            f"after {step} minibatches: input {with_se(errors['input'], n)}, {', '.join(means)}"
            + (f"; the model's own {with_se(own, n)}" if own is not None else ""))


def diagnosis_checks(variant: str, result: lp.ProbeResult, *, n: int) -> list[Check]:
    """The deep-mlp experiment's checks of ``variant`` (:func:`linprobe.experiments.deep_mlp.checks`) on the
    numbers the coloured diagrams show: the first and last moments' ``SPLIT`` errors of every probed layer and the
    model's own last error, each a rate on ``n`` images; each claim prefixed by its variant."""
    last = result.steps[-1]
    settings = replace(mlp_experiment.FULL, depth=depth_of(result))
    judged = mlp_experiment.checks(variant, result.errors(SPLIT, step=result.steps[0]), result.errors(SPLIT),
                                   float(result.meta["model_test_error"][str(last)]), chance=result.chance_error,
                                   n=n, settings=settings)
    return [replace(check, claim=f"{variant}: {check.claim}") for check in judged]


def output_shapes(model: nn.Module, names: list[str]) -> dict[str, list[int]]:
    """Each named layer's output shape for one example (``GAP`` skipped), through a forward in eval mode."""
    names = [n for n in names if n != GAP]
    was = model.training
    model.eval()
    with torch.no_grad(), lp.Taps(model, names) as taps:
        features = taps.run(_example())
    model.train(was)
    return {n: list(h.shape[1:]) for n, h in features.items()}


def _drawn(layout: dict[str, Any]) -> list[str]:
    """Every layer a layout draws: its main path and its branches."""
    return [*layout["names"], *(n for branch in layout.get("branches", {}).values() for n in branch)]


def _example() -> torch.Tensor:
    return torch.zeros(2, *EXAMPLE_SHAPE)
