"""inception: a small Inception net with an auxiliary head, probed at 17 points at 5 moments of training (Fig. 5, 9).

The paper probes Inception v3 on ImageNet, each probe on a fixed random subset of 1,000 features,
and draws the model coloured by probe error: a smooth, nearly monotone gradient along the depth,
and an auxiliary head slightly ahead of the main head early in training (001 Sec. 4.2, App. C).
Here every moment gets its depth trend (Spearman, with a bootstrap interval over the valid images) and the
first quarter of training several moments, on which the auxiliary head's lead is tested.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import linprobe as lp
from linprobe.capture.reduce import Reduction, reduction_from_dict
from linprobe.experiments.report import (
    TREND_LEVEL,
    TREND_SAMPLES,
    Check,
    Summary,
    compare,
    depth_trend,
    depth_trend_interval,
    difference_with_se,
    listed,
    standard_error,
    trend_text,
    with_se,
)
from linprobe.experiments.resnet import QUICK as RESNET_QUICK
from linprobe.experiments.training import at_most, model_error, train_sgd
from linprobe.models import SmallInception, inception_layout, inception_probe_points, small_inception
from linprobe.report.diagram import draw_model, split_layout
from linprobe.report.plots import plot_layer_curves, save_figure
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


# 17 probes of 1,000 features at each moment: the full run drops the two weakest L2s of the library's path,
# the quick one also fits smaller subsets.
QUICK = Settings(limit=400, steps=(0, 5, 10, 20, 40), batch_size=32, subset=256, probe_train=None,
                 l2_path=RESNET_QUICK.l2_path)
FULL = Settings(limit=None, steps=(0, 25, 100, 400, 1600), batch_size=64, subset=1000, probe_train=3000,
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
    moments = [moment(r, main, seed=seed) for r in results]
    plot_layer_curves({f"step {m.step}: Spearman {trend_text(m.rho, m.interval)}": m.main_path for m in moments},
                      out / "inception_errors.png", ylabel="probe valid error",
                      chance=results[0].layers[0].chance_error,
                      title="small Inception: probe valid error along the main path at each moment")
    plot_trend(moments, out / "inception_trend.png", n=len(valid))
    figures = [*draw_moments(model, results, moments, out), "inception_errors.png", "inception_trend.png"]
    return _summary(results, main, n_valid=len(valid), figures=figures, moments=moments,
                    settings={"data": data, "train/valid/test": f"{len(train)}/{len(valid)}/{len(test)}",
                              "probe training samples": len(probes_on), "moments (minibatches)": list(settings.steps),
                              "probes scored on": "train and valid at every moment, test at the last",
                              "early moments (the auxiliary head's lead)": early_steps(settings.steps),
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
    training) on the (train, valid, test) ``probe_splits``, test only at the last moment (the moments are compared
    on valid; test would add the extraction of its images and about half of each moment's feature cache); the
    subsets drawn at the first moment are kept. The auxiliary head's loss counts ``aux_weight`` times."""
    moments = settings.steps
    results: list[lp.ProbeResult] = []

    def probe_now(step: int) -> None:
        reduce = fixed_reductions(results[0]) if results else f"subset:{settings.subset}"
        splits = probe_splits if step == moments[-1] else probe_splits[:2]  # test only at the end
        result = lp.probe(model, *splits, layers=inception_probe_points(model), reduce=reduce,
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


def draw_moments(model: SmallInception, results: Sequence[lp.ProbeResult], moments: Sequence[Moment],
                 out: Path) -> list[str]:
    """One diode diagram per moment, probes coloured by valid error on the scale 0 to chance every figure shares,
    the moment's depth trend in the title."""
    main, branches = split_layout(inception_layout(model))
    names = []
    for result, m in zip(results, moments):
        draw_model(main, out / f"inception_step_{m.step}.png", errors=result.errors("valid"), branches=branches,
                   shapes={info.name: info.shape for info in result.layers}, chance=result.chance_error,
                   title=f"small Inception after {m.step} minibatches: model valid error {m.model:.1%}, main path "
                         f"Spearman {trend_text(m.rho, m.interval)}; probes coloured by valid error")
        names.append(f"inception_step_{m.step}.png")
    return names


def _moments(steps: Sequence[int]) -> tuple[int, ...]:
    moments = tuple(sorted(set(steps)))
    if not moments or any(not isinstance(s, int) or s < 0 for s in moments):
        raise ValueError(f"steps must be non-negative minibatch counts, got {list(steps)}")
    return moments


EARLY = 0.25  # "the first part of the training" (001 Sec. 4.2): trained moments up to this fraction of the last


def early_steps(steps: Sequence[int]) -> list[int]:
    """The trained moments in the first ``EARLY`` of training (up to that fraction of the last moment), at least
    the first trained one: where the auxiliary head should lead."""
    trained = sorted(s for s in steps if s > 0)
    if not trained:
        return []
    return [s for s in trained if s <= EARLY * trained[-1]] or trained[:1]


def aux_lead(results: Sequence[lp.ProbeResult], *, n_valid: int) -> tuple[bool | None, str]:
    """Whether the auxiliary head's probe beats the main head's early in training (:func:`early_steps`), on
    probe valid errors of ``n_valid`` images: True when it is ahead beyond two standard errors of the difference at
    more than half of the early moments and behind at none, False when it is behind at any, None otherwise
    (level); with a sentence giving each early moment's difference and its SE."""
    by_step = {r.steps[0]: r for r in results}
    early = early_steps(list(by_step))
    if not early:
        return None, "no moment after training began: nothing can lead"
    heads = {s: (by_step[s].value("aux_head", "valid"), by_step[s].value("logits", "valid")) for s in early}
    order = {s: compare(main, aux, n_valid) for s, (aux, main) in heads.items()}
    ahead, behind = [s for s in early if order[s] < 0], [s for s in early if order[s] > 0]
    lead = False if behind else (True if 2 * len(ahead) > len(early) else None)
    per_moment = ", ".join(f"step {s} {difference_with_se(*heads[s], n_valid)}" for s in early)
    return lead, (f"early in training (trained moments up to {EARLY:.0%} of the last: steps {_listed(early)}) the "
                  f"auxiliary head's probe is ahead of the main head's beyond 2 SE at {len(ahead)} of {len(early)} "
                  f"moments{_at(ahead)} and behind at {len(behind)}{_at(behind)}; probe valid error aux_head minus "
                  f"logits: {per_moment}")


def _listed(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps))


def _at(steps: Sequence[int]) -> str:
    return f" (steps {_listed(steps)})" if steps else ""


SMOOTH = -0.7  # "a smooth, nearly monotone gradient": Spearman correlation of error with depth at most this


def checks(main_path: dict[str, float], lead: bool | None, lead_words: str, n: int, *,
           interval: tuple[float, float] | None = None) -> list[Check]:
    """The paper's claims tested on the main path's probe valid errors at the last moment (in depth order, each
    a rate on ``n`` valid images; ``interval``: the trend's bootstrap interval, for the evidence) and the
    auxiliary head's lead from :func:`aux_lead`.

    Core: the error falls with depth (Spearman <= -0.7). Also: no rise beyond two standard errors along the main
    path (smooth); the auxiliary head ahead of the main head early in training (:func:`aux_lead`)."""
    if len(main_path) < 3:
        raise ValueError(f"the inception checks need at least three main-path probes, got {list(main_path)}")
    rho, rises = depth_trend(main_path, n)
    trend = f"Spearman {rho:.2f}" if interval is None else f"Spearman {trend_text(rho, interval)}"
    return [Check("the error falls along the main path (Spearman <= -0.7)", rho <= SMOOTH,
                  f"{trend} at the last moment", core=True),
            Check("smooth: no rise along the main path", not rises, f"significant rises: {listed(rises)}"),
            Check("early in training the auxiliary head is ahead of the main head", lead is True, lead_words)]


@dataclass(frozen=True)
class Moment:
    """What one probed moment says: the main path's probe valid errors in depth order, their Spearman correlation
    with depth and its bootstrap interval, the two heads' probe errors and the model's own error."""

    step: int
    main_path: dict[str, float]
    rho: float
    interval: tuple[float, float]
    aux: float
    main: float
    model: float


def moment(result: lp.ProbeResult, main: Sequence[str], *, seed: int = 0) -> Moment:
    """The numbers of one moment's ``result``; the interval resamples the valid images the probes were scored on
    (their saved predictions), the same images for every probe."""
    step = result.steps[0]
    main_path = {k: result.value(k, "valid") for k in main}
    wrong = np.stack([~result.correct(k, "valid", step) for k in main], axis=1)
    return Moment(step, main_path, depth_trend(main_path, len(wrong))[0], depth_trend_interval(wrong, seed=seed),
                  result.value("aux_head", "valid"), result.value("logits", "valid"),
                  float(result.meta["model_valid_error"]))


def plot_trend(moments: Sequence[Moment], path: Path, *, n: int) -> Path:
    """Two panels over the moments (evenly spaced, labelled by step): the main path's Spearman correlation of
    probe error with depth and its interval, the paper's threshold dashed; and the auxiliary head's probe valid
    error minus the main head's with two standard errors of the difference (below 0: the auxiliary head leads)."""
    steps = [str(m.step) for m in moments]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.8 * len(steps) + 3), 6), sharex=True)
    rho = np.array([m.rho for m in moments])
    lo, hi = (np.array([m.interval[k] for m in moments]) for k in (0, 1))
    top.errorbar(steps, rho, yerr=[rho - lo, hi - rho], marker="o", capsize=3, label="Spearman, 95% interval")
    top.axhline(SMOOTH, linestyle="--", color="black", label=f"{SMOOTH:g}: 'nearly monotone'")
    top.set_ylim(-1.05, 1.05)
    top.set_ylabel("Spearman (error, depth)")
    top.legend(fontsize=8)
    diff = np.array([m.aux - m.main for m in moments])
    se = np.array([math.hypot(standard_error(m.aux, n), standard_error(m.main, n)) for m in moments])
    bottom.errorbar(steps, 100 * diff, yerr=200 * se, marker="o", capsize=3, color="tab:orange",
                    label="aux_head - logits, 2 SE")
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("probe valid error difference (points)")
    bottom.set_xlabel("moment (minibatches); below 0 the auxiliary head leads")
    bottom.legend(fontsize=8)
    top.set_title("small Inception: the depth trend and the auxiliary head's lead at each moment")
    return save_figure(fig, path)


def _summary(results: Sequence[lp.ProbeResult], main: list[str], *, n_valid: int, figures: list[str],
             settings: dict[str, object], moments: Sequence[Moment]) -> Summary:
    """Our numbers beside the paper's: the trend along the main path and aux head vs main head per moment."""
    last, n = results[-1], n_valid
    final = moments[-1]
    lead, lead_words = aux_lead(results, n_valid=n)
    findings = [f"step {m.step}: main path Spearman {trend_text(m.rho, m.interval)}; probe valid error input "
                f"{with_se(r.value('input', 'valid'), n)}, mixed_4d {with_se(r.value('mixed_4d', 'valid'), n)}, "
                f"aux_head {with_se(m.aux, n)}, logits {with_se(m.main, n)} (aux_head - logits "
                f"{difference_with_se(m.aux, m.main, n)}); the model's own valid error {with_se(m.model, n)}"
                for r, m in zip(results, moments)]
    findings += [(f"last moment, main path: rises beyond two standard errors: "
                  f"{listed(depth_trend(final.main_path, n)[1])}"), lead_words]
    kept = [info.name for info in last.layers if info.features_out == info.features_in]
    return Summary("inception", CLAIM, findings, checks(final.main_path, lead, lead_words, n,
                                                        interval=final.interval),
                   settings=settings, figures=figures, tables=[_moments_table(results, moments, n)],
                   notes=[(f"the raw pixels alone are linearly separable to {last.value('input', 'valid'):.0%} "
                          "error here, so no moment is 'all red' as the paper's ImageNet diagrams are at first "
                          "(1000 classes, chance 0.999); every diagram is coloured on one scale, 0 (blue) to chance "
                          f"({last.chance_error:.2f}, red), as the heatmaps are"),
                          (f"layers with no more features than the subset size keep all of them ({', '.join(kept)}), "
                          "the unfairness the paper's Appendix C mentions"),
                          (f"the Spearman interval is a {TREND_LEVEL:.0%} percentile bootstrap over the {n} valid "
                           f"images ({TREND_SAMPLES} replicates, every probe's errors from the same resample): the "
                           "noise of measuring the trend, not the spread over training runs (one seed)"),
                          ("the auxiliary head's difference takes the two errors as independent (conservative: both "
                           "are scored on the same images); untrained, a shallower head is ahead only because random "
                           "layers lose information, which is why step 0 is not an early moment"),
                          "the paper itself calls the auxiliary head's lead small and not necessarily lasting"])


def _moments_table(results: Sequence[lp.ProbeResult], moments: Sequence[Moment], n: int) -> str:
    """Probe valid error of each point (rows) at each moment (columns), each with its standard error on ``n``
    valid images, then the main path's Spearman correlation with depth, the heads' difference and the model's own
    error at each moment, as a markdown table."""
    head = ["probe point", "features"] + [f"step {r.steps[0]}" for r in results]
    rows = [[info.name, f"{info.features_out}/{info.features_in}"]
            + [with_se(r.value(info.name, "valid"), n) for r in results] for info in results[0].layers]
    rows += [["Spearman (main path)", f"{TREND_LEVEL:.0%} interval"]
             + [trend_text(m.rho, m.interval) for m in moments],
             ["aux_head - logits", "SE of the difference"] + [difference_with_se(m.aux, m.main, n) for m in moments],
             ["the model itself", "valid error"] + [with_se(m.model, n) for m in moments]]
    return markdown_table(head, rows)
