"""toy: an untrained 32-layer MLP on linearly separable Gaussian data, probed at every layer (002 Fig. 3).

Every repetition draws a new direction ``w``, new data ``x ~ N(0, I)`` in R^128 labelled by the
sign of ``x . w``, and a new Glorot-normal model: 002 runs "the same experiment 100 times, with a
different toy dataset each time", and 003's code re-initialises its unseeded model on every run, so
the average covers the model's randomness as well as the data's. The figure is the probe test
error per layer averaged over the repetitions, with the coin-flip level dotted at 0.5.
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import linprobe as lp
from linprobe.experiments.report import Check, Summary, compare, listed, significant_steps, standard_error, with_se
from linprobe.fit.solvers import DEFAULT_L2_PATH
from linprobe.models import toy_mlp
from linprobe.report.plots import plot_layer_errors

CLAIM = ("untrained, the probe error is essentially 0 on the input (layer 0) and climbs toward 0.5, "
         "a coin flip, as the layers get deeper")
IN_FEATURES = 128
MAX_ITER, PATIENCE = 500, 2  # the library's defaults: L-BFGS iterations per L2, L2 points without a better valid


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
         ("the paper trains its probes with RMSProp; ours are L2-regularised logistic regressions fitted by L-BFGS "
          f"(at most {MAX_ITER} iterations per L2) along the library's default L2 path {DEFAULT_L2_PATH}, from strong "
          f"to weak, stopping once {PATIENCE} points in a row give no better valid error; the L2 chosen on valid is "
          "counted under Our numbers, and any fit that stopped at the iteration limit is named there"),
         "the deep layers level off below 0.5: a linear classifier can still read something from the random layers"]


def separable_data(w: torch.Tensor, n: int, g: torch.Generator) -> lp.ArrayDataset:
    """``n`` points from N(0, I) labelled 1 where ``x . w > 0``, else 0."""
    x = torch.randn(n, len(w), generator=g)
    return lp.ArrayDataset(x, (x @ w > 0).long())


def repetition(g: torch.Generator, sizes: Sizes, *, depth: int) -> lp.ProbeResult:
    """One draw of ``w``, data and model; probes on the input and every layer along the default L2 path.

    Features go to a temporary cache: every repetition has a new model, so nothing could be reused,
    and keeping them would cost about 120 MB per repetition.

    ``meta["last_layer_rms"]`` records the root-mean-square activation of the last layer on the
    test points, the paper's check that the signal has not underflowed.
    """
    w = torch.randn(IN_FEATURES, generator=g)
    train, valid, test = (separable_data(w, n, g) for n in (sizes.train, sizes.valid, sizes.test))
    model = toy_mlp(depth=depth, in_features=IN_FEATURES, seed=g)
    result = lp.probe(model, train, valid, test, layers=["input", *model.layer_names], reduce="none",
                      l2_path=DEFAULT_L2_PATH, max_iter=MAX_ITER, patience=PATIENCE, progress=False, plot=False)
    with torch.no_grad():
        result.meta["last_layer_rms"] = model(test.x).square().mean().sqrt().item()
    return result


def mean_over_repetitions(results: list[lp.ProbeResult]) -> lp.ProbeResult:
    """One table, at step 0, of every metric's mean over the repetitions, plus the spread of the top-1 error.

    The chosen L2 differs between repetitions, so it is left out (``l2`` is None in the layer facts);
    ``meta`` keeps the number of repetitions, the mean of their ``last_layer_rms``, how often each L2 was chosen
    on the input and on the last layer (``chosen_l2``), and per layer how many fits stopped at the iteration
    limit (``not_converged``).
    """
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in results:
        for row in r.rows:
            if row.metric != "l2":
                values[(row.layer, row.split, row.metric)].append(row.value)
    chance = statistics.fmean(info.chance_error for r in results for info in r.layers)
    mean = lp.ProbeResult([replace(info, chance_error=chance, l2=None) for info in results[0].layers],
                          meta={"repetitions": len(results),
                                "last_layer_rms": statistics.fmean(r.meta["last_layer_rms"] for r in results),
                                "chosen_l2": {results[0].layers[k].name: dict(Counter(f"{r.layers[k].l2:g}"
                                                                                      for r in results))
                                              for k in (0, -1)},
                                "not_converged": dict(Counter(name for r in results
                                                              for name in r.meta.get("not_converged", {})))})
    for (layer, split, metric), v in values.items():
        mean.add(0, layer, split, {metric: statistics.fmean(v)})
        if metric == "top1_error":
            mean.add(0, layer, split, {"top1_error_std": statistics.pstdev(v)})
    return mean


def findings(mean: lp.ProbeResult, n: int) -> list[str]:
    """Our numbers for the summary (SEs on ``n`` pooled test points): the input, a few depths, shallow against
    deep, the check on underflow."""
    errors = mean.errors("test")
    hidden = list(errors.values())[1:]
    depths = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= len(hidden)]
    return [(f"input (layer 0): {with_se(errors['input'], n)} (std over repetitions "
            f"{mean.value('input', 'test', 'top1_error_std'):.1%})"),
            f"layers {', '.join(map(str, depths))}: " + ", ".join(with_se(hidden[k - 1], n) for k in depths),
            (f"mean of layers 1-5: {with_se(statistics.fmean(hidden[:5]), n)}; of the last five layers: "
            f"{with_se(statistics.fmean(hidden[-5:]), n)}"),
            (f"layers with a higher error than the layer before: "
            f"{sum(b > a for a, b in zip(errors.values(), hidden))} of {len(hidden)}"),
            (f"root-mean-square activation of the last layer: {mean.meta['last_layer_rms']:.1e} (input: 1), "
             "far above float32 underflow"),
            (f"train error: input {mean.value('input', 'train'):.2%}, last five layers "
             f"{statistics.fmean(list(mean.errors('train').values())[-5:]):.1%} (beside their test errors above: "
             "how much the probes overfit)"),
            "L2 chosen on valid, times over the repetitions: " + "; ".join(
                f"{layer} " + ", ".join(f"{l2} x{count}" for l2, count in counts.items())
                for layer, counts in mean.meta["chosen_l2"].items()),
            "fits stopped at the iteration limit: " + (", ".join(f"{layer} x{count}" for layer, count
                                                                in mean.meta["not_converged"].items()) or "none")]


def checks(errors: dict[str, float], n: int) -> list[Check]:
    """The paper's claims tested on the mean test errors ``errors`` (the input, then the layers in depth order),
    each a rate on ``n`` test points pooled over the repetitions.

    Core: the error climbs with depth (the last five layers above the first five, those above the input, beyond
    two SEs). Also: essentially 0 on the input (at most 2% within two SEs: a linear fit on a few thousand points
    of a separable problem is not exact), the last five within 0.1 of a coin flip (within two SEs), and no layer
    significantly below the one before it."""
    if len(errors) < 11 or "input" not in errors:
        raise ValueError(f"the toy's checks need the input and at least 10 layers, got {list(errors)}")
    source = errors["input"]
    hidden = {k: v for k, v in errors.items() if k != "input"}
    first, deep = statistics.fmean(list(hidden.values())[:5]), statistics.fmean(list(hidden.values())[-5:])
    falls = significant_steps(errors, n, direction=-1)
    return [Check("the error climbs with depth", compare(source, first, n) > 0 and compare(first, deep, n) > 0,
                  f"input {with_se(source, n)}, layers 1-5 {with_se(first, n)}, last five {with_se(deep, n)}",
                  core=True),
            Check("essentially 0 on the input (at most 2%)", source - 2 * standard_error(source, n) <= 0.02,
                  f"input {with_se(source, n)}"),
            Check("the deep layers near a coin flip (the last five within 0.1 of 0.5)",
                  deep + 2 * standard_error(deep, n) >= 0.4, f"last five {with_se(deep, n)}"),
            Check("monotone: no layer significantly below the one before it", not falls,
                  f"significant falls: {listed(falls)}")]


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
                "l2 path": f"{DEFAULT_L2_PATH} (the library's default), patience {PATIENCE}, at most {MAX_ITER} "
                           "L-BFGS iterations per L2", "reported error": "test split, mean over repetitions",
                "torch threads": torch.get_num_threads(), "seed": seed}
    n = sizes.test * sizes.repetitions
    return Summary("toy", CLAIM, findings(mean, n), checks(mean.errors("test"), n), settings=settings,
                   figures=["toy.png"], tables=[mean.table(markdown=True)], notes=NOTES)
