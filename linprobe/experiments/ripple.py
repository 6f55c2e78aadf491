"""ripple: deep-mlp's model with heads, probed at 21 log-spaced moments: learning ripples from input to output.

002 Sec. 3.4 on Fig. 7: the error "goes down from the first probe to the last probe. This is even more apparent on
the full video (instead of the 3 frames provided here). This is a ripple effect [...] during most of the training the
prediction error goes down for a parent layer before it comes down for a layer itself."

Three frames cannot show an order in time, so this run trains deep-mlp's ``aux`` model as deep-mlp does and probes it
at 0 and 20 moments log-spaced over its 5000 minibatches (the animation is the video), then measures the ripple
(``linprobe.report.diagnose.ripple``): per layer the moment its test error had fallen halfway from its first to its last
value, interpolated on log(1 + step); the Spearman correlation of that moment with depth; the median lag per 16 layers
(one head's span); each with a 95% interval from a bootstrap of the test images.

It is an experiment of its own rather than an option of deep-mlp because it tests another claim, with its own verdict,
on another design (many moments, every second layer): deep-mlp's three frames on every layer stay Fig. 7's.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import linprobe as lp
from linprobe.experiments import deep_mlp
from linprobe.experiments.report import Check, Summary
from linprobe.report.diagnose import Ripple, ripple
from linprobe.report.plots import plot_halfway
from linprobe.report.results import markdown_table

CLAIM = ("learning ripples from input to output: during most of the training the prediction error goes down for a "
         "parent layer before it comes down for the layer itself, \"even more apparent on the full video\" "
         "(002 Sec. 3.4, the 128-layer MLP with a head every 16 layers of Fig. 7)")
VARIANT = "aux"


def log_moments(last: int, count: int) -> tuple[int, ...]:
    """0 and at least ``count`` distinct whole minibatch counts spaced evenly in log from 1 to ``last``: rounding
    merges the first few, so points are added until ``count`` distinct ones remain."""
    if not 2 <= count <= last:
        raise ValueError(f"need 2 <= count <= last, got count={count}, last={last}")
    points = count
    while len(moments := sorted({round(last ** (i / (points - 1))) for i in range(points)})) < count:
        points += 1
    return (0, *moments)


@dataclass(frozen=True)
class Settings:
    """The deep-mlp run (its moments log-spaced, its probes on fewer layers) and how the ripple is measured: the
    fractions of the way down at which each layer is timed (the first is the headline, the others test "most of the
    training") and the bootstrap's resamples of the test images."""

    run: deep_mlp.Settings
    fractions: tuple[float, ...] = (0.5, 0.25, 0.75)
    resamples: int = 1000
    learn: float = 0.05  # a layer is timed when its error fell by this fraction of chance (and beyond noise)


# Full: 21 moments x 65 probes (input, layers 2, 4, ..., 128) without the probes' own bootstrap: about 40 s a moment
# on one busy thread against 2 minutes for deep-mlp's 129 bootstrapped probes, 25 minutes in all with the training.
# Quick (the tests): one L2 instead of two halves the fits.
QUICK = Settings(replace(deep_mlp.QUICK, steps=log_moments(400, 10), probe_every=4, probe_bootstrap=False,
                         l2_path=(1e-2,)))
FULL = Settings(replace(deep_mlp.FULL, steps=log_moments(5000, 20), probe_every=2, probe_bootstrap=False))


def measure(result: lp.ProbeResult, settings: Settings, *, seed: int) -> dict[float, Ripple]:
    """The ripple on test error at each of ``settings.fractions``, all from one seeded set of resamples."""
    return {f: ripple(result, split="test", fraction=f, learn=settings.learn, resamples=settings.resamples, seed=seed)
            for f in settings.fractions}


def lag_per(measured: Ripple, span: int) -> tuple[float, tuple[float, float] | None]:
    """The median lag in minibatches of a layer behind the layer ``span`` below it, with its interval."""
    return measured.lag({name: deep_mlp.layer_index(name) for name in measured.layers}, span)


RIPPLE = 0.5  # "a parent layer before the layer itself": Spearman of the halfway step with depth at least this


def ordered(measured: Ripple) -> bool:
    """Whether the times rise with depth, clearly and beyond noise: Spearman at least ``RIPPLE``, its interval above
    0 (a weak but consistent order is no ripple)."""
    return measured.rho >= RIPPLE and measured.interval is not None and measured.interval[0] > 0


def spearman_words(measured: Ripple) -> str:
    """The correlation, its interval and how many layers it rests on."""
    interval = ("no interval" if measured.interval is None else
                f"{measured.level:.0%} interval {measured.interval[0]:.2f} to {measured.interval[1]:.2f}")
    return f"Spearman {measured.rho:.2f} ({interval}) over {len(measured.layers)} learning layers"


def lag_words(lag: tuple[float, tuple[float, float] | None], span: int, level: float) -> str:
    """The median lag per ``span`` layers in minibatches, with its interval at ``level``."""
    median, interval = lag
    shown = "" if interval is None else f" ({level:.0%} interval {interval[0]:.1f} to {interval[1]:.1f})"
    return f"median lag per {span} layers {median:.1f} minibatches{shown}"


def checks(measured: Mapping[float, Ripple], settings: Settings) -> list[Check]:
    """The claim tested on the measured ripple (``measured`` keyed by the fractions of ``settings``).

    Core: the step at which each layer is halfway down rises with depth, Spearman at least 0.5 and its 95% bootstrap
    interval above 0.
    Also: the median lag per head span (16 layers) is above 0 beyond its interval; the same order holds at the other
    fractions (a quarter and three quarters of the way: "during most of the training")."""
    headline, *others = (measured[f] for f in settings.fractions)
    span = settings.run.aux_every
    lag = lag_per(headline, span)
    return [Check(f"the error falls in a parent layer before its children: the step at which each layer is "
                  f"{headline.fraction:.0%} of the way down rises with depth (Spearman at least {RIPPLE:g}, its 95% "
                  "interval above 0)",
                  ordered(headline), spearman_words(headline), core=True),
            Check(f"a layer gets there later than the layer {span} below it (the median lag's interval above 0)",
                  lag[1] is not None and lag[1][0] > 0, lag_words(lag, span, headline.level)),
            Check("during most of the training: the same order at "
                  + " and ".join(f"{r.fraction:.0%}" for r in others) + " of the way down",
                  all(ordered(r) for r in others),
                  "; ".join(f"{r.fraction:.0%}: {spearman_words(r)}" for r in others))]


def block_times(measured: Ripple, block: int, depth: int) -> dict[str, float]:
    """The median halfway step over the learning layers of each block of ``block`` layers (NaN where none)."""
    times = dict(zip(measured.layers, measured.times))
    out = {}
    for first in range(1, depth + 1, block):
        inside = [t for name, t in times.items() if first <= deep_mlp.layer_index(name) < first + block]
        out[f"{first}-{first + block - 1}"] = statistics.median(inside) if inside else math.nan
    return out


def findings(result: lp.ProbeResult, measured: Mapping[float, Ripple], settings: Settings, n: int) -> list[str]:
    """Each moment in blocks of layers (the video in numbers), then the halfway step per block and the ripple's
    measures."""
    run = settings.run
    headline = measured[settings.fractions[0]]
    blocks = block_times(headline, run.aux_every, run.depth)
    return [*(deep_mlp.moment_line(result, step, run, n) for step in result.steps),
            (f"the step at which layers are {headline.fraction:.0%} of the way down, median per block: "
             + ", ".join(f"{k} {v:.3g}" for k, v in blocks.items())),
            *(f"{r.fraction:.0%} of the way down: {spearman_words(r)}" for r in measured.values()),
            lag_words(lag_per(headline, run.aux_every), run.aux_every, headline.level),
            (f"left out (did not fall by {settings.learn:.0%} of chance beyond noise): "
             f"{', '.join(headline.left_out) or 'none'}")]


def halfway_table(result: lp.ProbeResult, measured: Ripple) -> str:
    """Per learning layer its first and last test error and the step it was ``measured.fraction`` of the way down,
    with that step's bootstrap interval."""
    first, last = result.errors("test", step=result.steps[0]), result.errors("test")
    intervals = measured.intervals() or [(math.nan, math.nan)] * len(measured.layers)
    return markdown_table(["layer", f"step {result.steps[0]}", f"step {result.steps[-1]}",
                           f"{measured.fraction:.0%} of the way at step", f"{measured.level:.0%} interval"],
                          [[name, f"{first[name]:.3f}", f"{last[name]:.3f}", f"{t:.3g}", f"{lo:.3g}-{hi:.3g}"]
                           for name, t, (lo, hi) in zip(measured.layers, measured.times, intervals)])


def notes(settings: Settings, moments: Sequence[int], *, n: int, probes: int) -> list[str]:
    """What this run does differently from deep-mlp's and how the ripple is measured, from the settings."""
    run = settings.run
    spacing = (f"0 and {len(moments) - 1} whole minibatch counts log-spaced from 1 to {moments[-1]}"
               if tuple(moments) == run.steps else "the moments asked for")
    return [f"moments: {spacing} ({', '.join(map(str, moments))}); deep-mlp probes Fig. 7's three frames",
            (f"{len(moments)} moments x {probes} probes: the probes sit on the input and one layer in "
             f"{run.probe_every}, and their cross-entropy and top-5 {'get' if run.probe_bootstrap else 'skip'} "
             "bootstrap intervals (a third of a moment's fit; top-1 keeps its Wilson interval), so that the full "
             f"setting's {len(FULL.run.steps)} moments take about 25 minutes on one shared thread, not an hour"),
            ("a layer's step at a fraction f of the way down is where its test error first reached first - f (first - "
             "last), interpolated linearly on log(1 + step) between the moments around it; a layer counts when it fell "
             f"by {settings.learn:.0%} of chance beyond noise (a barely moving layer has a halfway step of noise)"),
            (f"intervals: percentile bootstrap, {settings.resamples} resamples of the {n:,} test images through the "
             "probes' per-sample predictions, one draw for every layer and moment, so the samples the layers share "
             "stay shared")]


def described(settings: Settings, splits: dict[str, lp.ArrayDataset], moments: list[int]) -> dict[str, object]:
    """The settings section: deep-mlp's, and the ripple's measurement."""
    return {**deep_mlp.described(settings.run, VARIANT, splits, moments),
            "probe bootstrap intervals": "top-1 only (Wilson)" if not settings.run.probe_bootstrap else "all metrics",
            "ripple fractions": settings.fractions, "ripple bootstrap resamples": settings.resamples}


def run(out: Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True,
        steps: Sequence[int] | None = None) -> Summary:
    """Train deep-mlp's aux model, probing at each of ``steps`` (default: the settings' log-spaced moments), and
    measure the ripple."""
    settings = QUICK if quick else FULL
    moments = sorted(set(steps if steps is not None else settings.run.steps))
    if len(moments) < 3:
        raise ValueError(f"the ripple needs at least three moments, got {moments}")
    splits = lp.standard_splits(data, seed=seed)
    train, n = splits["train"], len(splits["test"])
    model = deep_mlp.make_model(VARIANT, settings.run, train, seed=seed)
    result = deep_mlp.train_and_probe(model, splits, settings.run, moments=moments, cache=out / "cache", seed=seed,
                                      progress=progress)
    result.save(out)
    timeline = lp.save_timeline(result, out, split="test")
    measured = measure(result, settings, seed=seed)
    headline = measured[settings.fractions[0]]
    figure = plot_halfway(headline, out / "halfway.png", depth={k: deep_mlp.layer_index(k) for k in result.names},
                          title=f"ripple: the step at which each layer is {headline.fraction:.0%} of the way down")
    return Summary("ripple", CLAIM, findings(result, measured, settings, n), checks(measured, settings),
                   settings={"data": data, **described(settings, splits, moments), "seed": seed},
                   figures=[figure.name, timeline["heatmap"].name, timeline["animation"].name],
                   tables=[halfway_table(result, headline)],
                   notes=[*notes(settings, moments, n=n, probes=len(result.names)),
                          *deep_mlp.run_notes(settings.run, variant=VARIANT, data=data, n_train=len(train),
                                              moments=moments, probes=len(result.names), quick=quick),
                          *deep_mlp.head_notes(result, settings.run, n=n, n_train=len(train))])
