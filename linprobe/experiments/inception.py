"""inception: a small Inception net with an auxiliary head, probed at 17 points at 4 moments of training (Fig. 5, 9).

The paper probes Inception v3 on ImageNet, each probe on a fixed random subset of 1,000 features,
and draws the model coloured by probe error: a smooth, nearly monotone gradient along the depth,
and an auxiliary head slightly ahead of the main head early in training (001 Sec. 4.2, App. C).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import linprobe as lp
from linprobe.capture.reduce import Reduction, reduction_from_dict
from linprobe.experiments.report import Check, Summary, compare, depth_trend, listed, with_se
from linprobe.experiments.resnet import QUICK as RESNET_QUICK
from linprobe.experiments.training import at_most, model_error, train_sgd
from linprobe.models import SmallInception, inception_layout, inception_probe_points, small_inception
from linprobe.report.diagram import draw_model, split_layout
from linprobe.report.plots import plot_layer_curves
from linprobe.report.results import markdown_table

CLAIM = ("the colours of the probes form a smooth, nearly monotone gradient along the depth (Fig. 5), and early in "
         "training the auxiliary head is slightly ahead of (lower error than) the main head (Fig. 9)")


@dataclass(frozen=True)
class Settings:
    """Training samples (None: all), the minibatches at which to probe, the batch size; the size of each
    probe's random feature subset, its training samples and L2 path."""

    limit: int | None
    steps: tuple[int, ...]
    batch_size: int
    subset: int
    probe_train: int | None
    l2_path: tuple[float, ...]


# 4 moments x 17 probes of 1,000 features: the full run drops the two weakest L2s of the library's path,
# the quick one also fits smaller subsets.
QUICK = Settings(limit=400, steps=(0, 10, 20, 40), batch_size=32, subset=256, probe_train=None,
                 l2_path=RESNET_QUICK.l2_path)
FULL = Settings(limit=None, steps=(0, 100, 400, 1600), batch_size=64, subset=1000, probe_train=3000,
                l2_path=(1e1, 1e0, 1e-1, 1e-2, 1e-3))


V3_AUX_WEIGHT = 0.4  # Inception v3 adds its auxiliary head's loss weighed 0.4


class _LastMoment(Exception):
    """Raised from the step callback once the last moment is probed: training stops exactly there."""


def run(out: Path, *, quick: bool = False, data: str = "fashion-mnist", seed: int = 0, progress: bool = True,
        steps: Sequence[int] | None = None, aux_weight: float = V3_AUX_WEIGHT) -> Summary:
    """Train the small Inception net, probing its 17 points on the same random feature subsets at each moment;
    ``aux_weight`` weighs the auxiliary head's loss (Inception v3's 0.4; 1.0 was this experiment's earlier value)."""
    settings = QUICK if quick else FULL
    if steps is not None:
        settings = replace(settings, steps=_moments(steps))
    splits = lp.standard_splits(data, seed=seed, limit=settings.limit)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    probes_on = at_most(train, settings.probe_train, seed=seed)
    model = small_inception(seed=seed)
    results = train_and_probe(model, train, (probes_on, valid, test), settings=settings, out=out, seed=seed,
                              progress=progress, aux_weight=aux_weight)
    combined = lp.ProbeResult.concat(results)
    combined.meta["model_valid_error"] = {r.steps[0]: r.meta["model_valid_error"] for r in results}
    combined.save(out)
    main, _ = split_layout(inception_layout(model))
    plot_layer_curves({f"step {r.steps[0]}": {n: r.value(n, "valid") for n in main} for r in results},
                      out / "inception_errors.png", ylabel="probe valid error",
                      chance=results[0].layers[0].chance_error,
                      title="small Inception: probe valid error along the main path at each moment")
    figures = [*draw_moments(model, results, out), "inception_errors.png"]
    return _summary(results, main, n_valid=len(valid), figures=figures,
                    settings={"data": data, "train/valid/test": f"{len(train)}/{len(valid)}/{len(test)}",
                              "probe training samples": len(probes_on), "moments (minibatches)": list(settings.steps),
                              "optimiser": "SGD Nesterov 0.9, lr 0.05 cosine per epoch, wd 5e-4, "
                                           f"batch {settings.batch_size}, auxiliary loss weight {aux_weight:g}"
                                           + (" (Inception v3's)" if aux_weight == V3_AUX_WEIGHT else
                                              f" (Inception v3: {V3_AUX_WEIGHT:g})"),
                              "reduction": f"a fixed random subset of {settings.subset} features per layer (all of "
                                           "a smaller layer), the same indices at every moment",
                              "probe L2 path": list(settings.l2_path), "torch threads": torch.get_num_threads(),
                              "seed": seed})


def train_and_probe(model: SmallInception, train: lp.ArrayDataset, probe_splits: tuple[lp.ArrayDataset, ...], *,
                    settings: Settings, out: Path, seed: int, progress: bool,
                    aux_weight: float = V3_AUX_WEIGHT) -> list[lp.ProbeResult]:
    """Train for ``settings.steps[-1]`` minibatches, probing every point at each of ``settings.steps`` (0: before
    training) on the (train, valid, test) ``probe_splits``; the subsets drawn at the first moment are kept. The
    auxiliary head's loss counts ``aux_weight`` times."""
    moments = settings.steps
    results: list[lp.ProbeResult] = []

    def probe_now(step: int) -> None:
        reduce = fixed_reductions(results[0]) if results else f"subset:{settings.subset}"
        result = lp.probe(model, *probe_splits, layers=inception_probe_points(model), reduce=reduce,
                          cache_dir=out / "cache", out_dir=out / f"step_{step}", step=step, seed=seed,
                          l2_path=settings.l2_path, progress=progress, plot=False)
        result.meta["model_valid_error"] = model_error(model, probe_splits[1])
        result.save(out / f"step_{step}")
        results.append(result)

    def on_step(step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if step in moments:
            probe_now(step)
        if step == moments[-1]:
            raise _LastMoment

    if moments[0] == 0:
        probe_now(0)
    if moments[-1] > 0:
        try:
            train_sgd(model, train, epochs=math.ceil(moments[-1] / math.ceil(len(train) / settings.batch_size)),
                      batch_size=settings.batch_size, seed=seed, on_step=on_step, aux_weight=aux_weight)
        except _LastMoment:
            pass
    return results


def fixed_reductions(first: lp.ProbeResult) -> dict[str, Reduction]:
    """The reductions (subset indices) the first moment drew, to be reused at every later moment."""
    return {info.name: reduction_from_dict(info.reduction) for info in first.layers}


def draw_moments(model: SmallInception, results: Sequence[lp.ProbeResult], out: Path) -> list[str]:
    """One diode diagram per moment, probes coloured by valid error on the scale 0 to chance every figure shares."""
    main, branches = split_layout(inception_layout(model))
    names = []
    for result in results:
        step = result.steps[0]
        draw_model(main, out / f"inception_step_{step}.png", errors=result.errors("valid"), branches=branches,
                   shapes={info.name: info.shape for info in result.layers}, chance=result.chance_error,
                   title=f"small Inception after {step} minibatches: model valid error "
                         f"{result.meta['model_valid_error']:.1%}; probes coloured by valid error")
        names.append(f"inception_step_{step}.png")
    return names


def _moments(steps: Sequence[int]) -> tuple[int, ...]:
    moments = tuple(sorted(set(steps)))
    if not moments or any(not isinstance(s, int) or s < 0 for s in moments):
        raise ValueError(f"steps must be non-negative minibatch counts, got {list(steps)}")
    return moments


def aux_lead(results: Sequence[lp.ProbeResult], *, n_valid: int) -> tuple[bool | None, str]:
    """Whether the auxiliary head's probe beats the main head's at the first trained moment: None when the two
    differ by less than two standard errors of the difference (level), with a sentence saying so."""
    trained = [r for r in results if r.steps[0] > 0]
    if not trained:
        return None, "no moment after training began: nothing can lead"
    r = trained[0]
    aux, main = r.value("aux_head", "valid"), r.value("logits", "valid")
    order = compare(main, aux, n_valid)
    lead = None if order == 0 else order < 0
    words = {True: "ahead of", False: "behind", None: "level with"}[lead]
    return lead, (f"at step {r.steps[0]}, the first trained moment, the auxiliary head is {words} the main head: "
                  f"probe valid error {with_se(aux, n_valid)} vs {with_se(main, n_valid)}")


SMOOTH = -0.7  # "a smooth, nearly monotone gradient": Spearman correlation of error with depth at most this


def checks(main_path: dict[str, float], lead: bool | None, lead_words: str, n: int) -> list[Check]:
    """The paper's claims tested on the main path's probe valid errors at the last moment (in depth order, each
    a rate on ``n`` valid images) and the auxiliary head's lead from :func:`aux_lead`.

    Core: the error falls with depth (Spearman <= -0.7). Also: no rise beyond two standard errors along the main
    path (smooth); the auxiliary head ahead of the main head at the first trained moment beyond two SEs."""
    if len(main_path) < 3:
        raise ValueError(f"the inception checks need at least three main-path probes, got {list(main_path)}")
    rho, rises = depth_trend(main_path, n)
    return [Check("the error falls along the main path (Spearman <= -0.7)", rho <= SMOOTH,
                  f"Spearman {rho:.2f} at the last moment", core=True),
            Check("smooth: no rise along the main path", not rises, f"significant rises: {listed(rises)}"),
            Check("early in training the auxiliary head is ahead of the main head", lead is True, lead_words)]


def _summary(results: Sequence[lp.ProbeResult], main: list[str], *, n_valid: int, figures: list[str],
             settings: dict[str, object]) -> Summary:
    """Our numbers beside the paper's: the trend along the main path and aux head vs main head per moment."""
    last, n = results[-1], n_valid
    main_path = {k: last.value(k, "valid") for k in main}
    rho, rises = depth_trend(main_path, n)
    aux_vs_main = [(r.steps[0], r.value("aux_head", "valid"), r.value("logits", "valid")) for r in results]
    lead, lead_words = aux_lead(results, n_valid=n)
    findings = [f"step {r.steps[0]}: probe valid error input {with_se(r.value('input', 'valid'), n)}, "
                f"mixed_4d {with_se(r.value('mixed_4d', 'valid'), n)}, aux_head "
                f"{with_se(r.value('aux_head', 'valid'), n)}, logits {with_se(r.value('logits', 'valid'), n)}; "
                f"the model's own valid error {with_se(r.meta['model_valid_error'], n)}" for r in results]
    findings += [(f"last moment, main path: Spearman correlation of probe error with depth {rho:.2f} "
                 f"(-1 is perfectly monotone); rises beyond two standard errors: {listed(rises)}"),
                 "auxiliary head minus main head (probe valid error) per moment: "
                 + ", ".join(f"step {s}: {a - m:+.1%}" for s, a, m in aux_vs_main), lead_words]
    kept = [info.name for info in last.layers if info.features_out == info.features_in]
    return Summary("inception", CLAIM, findings, checks(main_path, lead, lead_words, n), settings=settings,
                   figures=figures, tables=[_moments_table(results, n)],
                   notes=[(f"the raw pixels alone are linearly separable to {last.value('input', 'valid'):.0%} "
                          "error here, so no moment is 'all red' as the paper's ImageNet diagrams are at first "
                          "(1000 classes, chance 0.999); every diagram is coloured on one scale, 0 (blue) to chance "
                          f"({last.chance_error:.2f}, red), as the heatmaps are"),
                          (f"layers with no more features than the subset size keep all of them ({', '.join(kept)}), "
                          "the unfairness the paper's Appendix C mentions"),
                          "the paper itself calls the auxiliary head's lead small and not necessarily lasting"])


def _moments_table(results: Sequence[lp.ProbeResult], n: int) -> str:
    """Probe valid error of each point (rows) at each moment (columns), each with its standard error on ``n``
    valid images, as a markdown table."""
    head = ["probe point", "features"] + [f"step {r.steps[0]}" for r in results]
    return markdown_table(head, [[info.name, f"{info.features_out}/{info.features_in}"]
                                 + [with_se(r.value(info.name, "valid"), n) for r in results]
                                 for info in results[0].layers])
