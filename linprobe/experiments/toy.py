"""toy: an untrained 32-layer MLP on linearly separable Gaussian data, probed at every layer (002 Fig. 3).

Every repetition draws a new direction ``w``, new data ``x ~ N(0, I)`` in R^128 labelled by the
sign of ``x . w``, and a new Glorot-normal model: 002 runs "the same experiment 100 times, with a
different toy dataset each time", and 003's code re-initialises its unseeded model on every run, so
the average covers the model's randomness as well as the data's. The figure is the probe test
error per layer averaged over the repetitions, with the coin-flip level dotted at 0.5.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import linprobe as lp
from linprobe.experiments.report import Summary
from linprobe.models import toy_mlp
from linprobe.plots import plot_layer_errors

CLAIM = ("untrained, the probe error is essentially 0 on the input (layer 0) and climbs toward 0.5, "
         "a coin flip, as the layers get deeper")
IN_FEATURES = 128
# Deep layers reach the same error at any L2 from 1 down to 1e-3, but weak L2 on their collapsed,
# ill-conditioned features costs hundreds of L-BFGS iterations per layer (see NOTES).
L2_PATH = (1.0, 1e-2)


@dataclass(frozen=True)
class Sizes:
    """How many repetitions, and the probe's train / valid / test samples in each (the data are free)."""

    repetitions: int
    train: int
    valid: int
    test: int


QUICK = Sizes(repetitions=2, train=5000, valid=1000, test=1000)
FULL = Sizes(repetitions=100, train=5000, valid=1000, test=1000)
NOTES = ["each repetition re-draws w, the data and the model's Glorot-normal weights (see the module docstring)",
         "probes are the exact convex optimum (L-BFGS to convergence, L2 chosen on valid) where the paper trains "
         "them with RMSProp; the deep layers level off below 0.5, and more probe data does not move that level "
         "(2,000, 5,000 and 10,000 training points gave the same last-five mean within 0.01 in our trials), so the "
         "gap to 0.5 is what an optimal linear classifier can still read from the random layers",
         f"L2 path {L2_PATH}: the full default path chose the same error on the deep layers at twice the cost; "
         "weaker L2 helps only the input (separable), whose error is about 1 point lower with 1e-3 at 1.5 times "
         "the cost"]


def separable_data(w: torch.Tensor, n: int, g: torch.Generator) -> lp.ArrayDataset:
    """``n`` points from N(0, I) labelled 1 where ``x . w > 0``, else 0."""
    x = torch.randn(n, len(w), generator=g)
    return lp.ArrayDataset(x, (x @ w > 0).long())


def repetition(g: torch.Generator, sizes: Sizes, *, depth: int) -> lp.ProbeResult:
    """One draw of ``w``, data and model; exact probes on the input and every layer.

    Features go to a temporary cache: every repetition has a new model, so nothing could be reused,
    and keeping them would cost about 120 MB per repetition.

    ``meta["last_layer_rms"]`` records the root-mean-square activation of the last layer on the
    test points, the paper's check that the signal has not underflowed.
    """
    w = torch.randn(IN_FEATURES, generator=g)
    train, valid, test = (separable_data(w, n, g) for n in (sizes.train, sizes.valid, sizes.test))
    model = toy_mlp(depth=depth, in_features=IN_FEATURES, seed=g)
    result = lp.probe(model, train, valid, test, layers=["input", *model.layer_names], reduce="none",
                      l2_path=L2_PATH, progress=False, plot=False)
    with torch.no_grad():
        result.meta["last_layer_rms"] = model(test.x).square().mean().sqrt().item()
    return result


def mean_over_repetitions(results: list[lp.ProbeResult]) -> lp.ProbeResult:
    """One table, at step 0, of every metric's mean over the repetitions, plus the spread of the top-1 error.

    The chosen L2 differs between repetitions, so it is left out (``l2`` is None in the layer facts);
    ``meta`` keeps the number of repetitions and the mean of their ``last_layer_rms``.
    """
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in results:
        for row in r.rows:
            if row.metric != "l2":
                values[(row.layer, row.split, row.metric)].append(row.value)
    chance = statistics.fmean(info.chance_error for r in results for info in r.layers)
    mean = lp.ProbeResult([replace(info, chance_error=chance, l2=None) for info in results[0].layers],
                          meta={"repetitions": len(results),
                                "last_layer_rms": statistics.fmean(r.meta["last_layer_rms"] for r in results)})
    for (layer, split, metric), v in values.items():
        mean.add(0, layer, split, {metric: statistics.fmean(v)})
        if metric == "top1_error":
            mean.add(0, layer, split, {"top1_error_std": statistics.pstdev(v)})
    return mean


def findings(mean: lp.ProbeResult) -> list[str]:
    """Our numbers for the summary: the input, a few depths, shallow against deep, the check on underflow."""
    errors = mean.errors("test")
    hidden = list(errors.values())[1:]
    depths = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= len(hidden)]
    return [f"input (layer 0): {errors['input']:.1%} (std over repetitions "
            f"{mean.value('input', 'test', 'top1_error_std'):.1%})",
            f"layers {', '.join(map(str, depths))}: " + ", ".join(f"{hidden[k - 1]:.1%}" for k in depths),
            f"mean of layers 1-5: {statistics.fmean(hidden[:5]):.1%}; of the last five layers: "
            f"{statistics.fmean(hidden[-5:]):.1%}",
            f"layers with a higher error than the layer before: "
            f"{sum(b > a for a, b in zip(errors.values(), hidden))} of {len(hidden)}",
            f"root-mean-square activation of the last layer: {mean.meta['last_layer_rms']:.1e} (input: 1), "
            "far above float32 underflow"]


def agrees(errors: dict[str, float]) -> bool:
    """The paper's shape: near 0 on the input, deep layers (the last five) near a coin flip and worse than shallow."""
    hidden = list(errors.values())[1:]
    deep = statistics.fmean(hidden[-5:])
    return errors["input"] < 0.05 and deep > 0.3 and deep > statistics.fmean(hidden[:5])


def run(out: Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True,
        repetitions: int | None = None, depth: int = 32) -> Summary:
    """Average the per-layer probe error of fresh untrained MLPs over repetitions; ``data`` is unused (synthetic)."""
    sizes = QUICK if quick else FULL
    if repetitions is not None:
        sizes = replace(sizes, repetitions=repetitions)
    g = torch.Generator().manual_seed(seed)
    results = [repetition(g, sizes, depth=depth)
               for _ in tqdm(range(sizes.repetitions), desc="toy repetitions", disable=not progress)]
    mean = mean_over_repetitions(results)
    mean.save(out)
    plot_layer_errors(mean, out / "toy.png", title=f"Toy: untrained {depth}-layer MLP, probe test error "
                                                     f"(mean of {sizes.repetitions} repetitions)")
    settings = {"repetitions": sizes.repetitions,
                "model": f"{depth} x Linear(128) + LeakyReLU(0.5), Glorot normal, zero bias, untrained",
                "data": f"x ~ N(0, I_{IN_FEATURES}), y = [x.w > 0] (the data option, {data!r}, is not used)",
                "probe samples train/valid/test per repetition": f"{sizes.train}/{sizes.valid}/{sizes.test}",
                "l2 path": L2_PATH, "reported error": "test split, mean over repetitions",
                "torch threads": torch.get_num_threads(), "seed": seed}
    return Summary("toy", CLAIM, findings(mean), agrees(mean.errors("test")), settings=settings,
                   figures=["toy.png"], tables=[mean.table(markdown=True)], notes=NOTES)
