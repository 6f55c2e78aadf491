"""Diagnostics in words: what the paper teaches to read from probe errors over layers and steps.

``diagnose(result)`` returns findings as small dataclasses; ``describe(findings)`` turns them into
markdown lines. Layers are taken in the result's execution order, so "the layer before" is the
parent on a plain stack and the previous layer run on a branched model. Every threshold is a
fraction of the chance error, so the same defaults serve 2 or 1000 classes, and every difference a
finding rests on must also lie beyond noise: a two-proportion test at ``level`` on the split's number
of evaluated samples (``meta["samples"]``), so a "kink" of one valid image is never reported:

- **dead segment** (001 Fig. 6, 002 Fig. 8, the skip-connection pathology): consecutive layers that
  did not learn since the first measured step, right before a layer that is suddenly much better and
  from which the model does learn: that layer gets its information by another path.
- **garbage forward-prop** (002 Fig. 3): at the first measured step the error climbs with depth.
- **lag** (001 Fig. 9, the ripple from left to right): a layer still worse than the best layer before
  it at some step, that catches up by the last step.
- **kink** (002 Fig. 5): a layer worse than both neighbours.

``ripple(result)`` measures the ripple rather than flagging it, from many steps: per layer the step at which its
error has fallen a fraction (half) of the way from its first to its last value, the rank correlation of that step
with depth, and bootstrap intervals from the per-sample predictions (002 Sec. 3.4: "the prediction error goes down
for a parent layer before it comes down for a layer itself").
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from linprobe.capture.taps import INPUT
from linprobe.fit.uncertainty import differs_beyond_noise, resample_weights
from linprobe.report.results import ProbeResult

Beyond = Callable[[float, float, float], bool]
"""``beyond(high, low, threshold)``: ``high`` exceeds ``low`` by the threshold and by more than noise."""


@dataclass(frozen=True)
class DeadSegment:
    """Layers ``first``..``last`` did not learn between ``since`` and each of ``steps``, while ``recovery`` on did."""

    first: str
    last: str
    size: int
    since: int
    steps: tuple[int, ...]
    recovery: str
    drop: float  # error of ``last`` minus error of ``recovery`` at the last of ``steps``

    def describe(self) -> str:
        return (f"dead segment: {_span(self.first, self.last, self.size)} did not learn between step {self.since} "
                f"and step{'s' if len(self.steps) > 1 else ''} {_steps(self.steps)}, while {self.recovery} (error "
                f"{_points(self.drop)} lower than {self.last}) and the layers after it did: information reaches "
                f"{self.recovery} by another path (a skip connection?) and the segment is useless")


@dataclass(frozen=True)
class GarbageForward:
    """At ``step`` (the first measured) the error climbs from ``low`` at ``first`` to ``high`` at ``last``."""

    first: str
    last: str
    size: int
    step: int
    low: float
    high: float

    def describe(self) -> str:
        when = "at initialisation (step 0)" if self.step == 0 else f"at step {self.step}, the first measured"
        return (f"garbage forward-prop {when}: the error climbs with depth over "
                f"{_span(self.first, self.last, self.size)}, from {self.low:.0%} to {self.high:.0%}: random layers "
                "lose information")


@dataclass(frozen=True)
class Lag:
    """At ``step`` layers ``first``..``last`` trail the best earlier layer by up to ``behind``; caught up by ``by``."""

    first: str
    last: str
    size: int
    step: int
    behind: float
    by: int

    def describe(self) -> str:
        return (f"lag at step {self.step}: {_span(self.first, self.last, self.size)} trail the best layer before "
                f"them by up to {_points(self.behind)} and catch up by step {self.by} (learning ripples from input to "
                "output)")


@dataclass(frozen=True)
class Kink:
    """At ``step``, ``layer`` is worse than both neighbours by at least ``rise``."""

    layer: str
    step: int
    rise: float

    def describe(self) -> str:
        return f"kink at step {self.step}: {self.layer} is worse than the layers on both sides by {_points(self.rise)}"


Finding = DeadSegment | GarbageForward | Lag | Kink


def diagnose(result: ProbeResult, *, split: str = "valid", metric: str = "top1_error", learn: float = 0.1,
             drop: float = 0.25, climb: float = 0.25, dip: float = 0.05, lag: float = 0.1, kink: float = 0.03,
             min_layers: int = 2, level: float = 0.95) -> list[Finding]:
    """Findings from ``metric`` on ``split`` over every measured step, thresholds as fractions of chance; layers
    missing at some step (found invalid, not measured) are left out.

    ``learn``: how far a layer's error must fall since the first step to count as learning; ``drop``: how
    much better than the last dead layer its successor must be; ``climb``: the rise with depth that counts
    as garbage forward-prop, ``dip`` the fall that ends a climb; ``lag``: how far behind the best earlier
    layer counts as lagging; ``kink``: how much worse than both neighbours; ``min_layers``: the shortest
    dead segment, climb or lag reported. ``level``: the confidence at which a difference must lie beyond noise
    (on the split's evaluated samples, when the result records how many; thresholds alone otherwise).
    """
    if not metric.endswith("error"):
        raise ValueError(f"diagnose reads an error metric (top1_error, online_top1_error, ...), not {metric!r}: "
                         "its thresholds are fractions of the chance error")
    if not result.rows:
        raise ValueError("the result has no rows: measure at least one step before diagnosing")
    chance = result.chance_error
    steps = result.steps
    n = samples(result, split)

    def beyond(high: float, low: float, threshold: float) -> bool:
        """``high`` exceeds ``low`` by ``threshold`` and by more than noise."""
        return high - low >= threshold and (n is None or differs_beyond_noise(high, low, n, level))

    grid = {s: result.errors(split, metric, s) for s in steps}
    names = [n for n in result.names if all(n in grid[s] for s in steps)]  # layers measured at every step
    grid = {s: {n: grid[s][n] for n in names} for s in steps}
    if not names:
        raise ValueError(f"no layer has {metric!r} on {split!r} at every step {steps}: pick a split and metric "
                         "the result measured throughout")
    findings: list[Finding] = []
    findings += _dead_segments(names, grid, steps, learn * chance, drop * chance, min_layers, beyond)
    findings += _climbs(names, list(grid[steps[0]].values()), steps[0], climb * chance, dip * chance, min_layers,
                        beyond)
    findings += _lags(names, grid, steps, lag * chance, min_layers, beyond)
    findings += [Kink(names[i], s, rise) for s in steps
                 for i, rise in _kinks(list(grid[s].values()), kink * chance, beyond)]
    return findings


@dataclass(frozen=True, eq=False)
class Ripple:
    """When each learning layer's error had fallen ``fraction`` of the way from its first to its last value.

    ``times`` are those steps for ``layers`` (execution order), interpolated on log(1 + step); ``replicates`` the same
    in each bootstrap resample of the split's samples, (resamples, layers), None without per-sample predictions;
    ``rho`` the Spearman correlation of the times with the layers' order (1: every layer after its parent), with its
    percentile ``interval`` at ``level``; ``left_out`` the layers that did not learn (or were not measured throughout).
    """

    fraction: float
    steps: tuple[int, ...]
    layers: tuple[str, ...]
    times: tuple[float, ...]
    replicates: Tensor | None
    rho: float
    interval: tuple[float, float] | None
    left_out: tuple[str, ...]
    samples: int | None
    level: float = 0.95

    def lag(self, depth: Mapping[str, int], span: int) -> tuple[float, tuple[float, float] | None]:
        """The median over layer pairs ``span`` apart in ``depth`` of how many steps later the deeper one got there,
        with its bootstrap interval (None without replicates); NaN when no such pair learned."""
        pairs = [(i, j) for i, a in enumerate(self.layers) for j, b in enumerate(self.layers)
                 if depth[b] - depth[a] == span]
        if not pairs:
            return math.nan, None
        upper, lower = (torch.tensor(index) for index in zip(*pairs))
        times = torch.tensor(self.times, dtype=torch.float64)
        point = float((times[lower] - times[upper]).quantile(0.5))
        if self.replicates is None:
            return point, None
        lags = (self.replicates[:, lower] - self.replicates[:, upper]).quantile(0.5, dim=1)
        return point, _percentiles(lags, self.level)

    def intervals(self) -> list[tuple[float, float]] | None:
        """Each layer's time's percentile interval at ``level`` over the replicates (None without them)."""
        if self.replicates is None:
            return None
        lo, hi = _bounds(self.replicates, self.level, dim=0).tolist()
        return list(zip(lo, hi))

    def describe(self) -> str:
        where = (f", {self.level:.0%} interval {self.interval[0]:.2f} to {self.interval[1]:.2f} (bootstrap of "
                 f"{len(self.replicates)} resamples of the {self.samples} samples)"
                 if self.interval is not None and self.replicates is not None else ", no interval (no predictions)")
        ends = (f"; {self.layers[0]} at step {self.times[0]:.3g}, {self.layers[-1]} at step {self.times[-1]:.3g}"
                if self.layers else "")
        return (f"ripple: the step at which each of {len(self.layers)} layers had fallen {self.fraction:.0%} of the "
                f"way from its first to its last error follows depth with Spearman {self.rho:.2f}{where}{ends}"
                + (f" ({len(self.left_out)} left out, not learning)" if self.left_out else ""))


def ripple(result: ProbeResult, *, split: str = "test", fraction: float = 0.5, learn: float = 0.05,
           level: float = 0.95, resamples: int = 1000, seed: int = 0) -> Ripple:
    """Measure the ripple on top-1 error on ``split``: per layer the step at which it had fallen ``fraction`` of the
    way from its first to its last error, and how that step follows the layers' order.

    Only layers whose error fell by ``learn`` times chance, and beyond noise at ``level``, count: a layer that barely
    moves has a halfway step of noise. Intervals come from resampling the split's samples (the same draw for every
    layer and step, so the layers' shared samples stay shared) through the result's per-sample predictions.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
    steps = result.steps
    if len(steps) < 3:
        raise ValueError(f"a ripple needs at least three measured steps (first, middle, last), got {steps}")
    grid = [result.errors(split, step=s) for s in steps]
    names = [n for n in result.names if all(n in g for g in grid)]
    n = samples(result, split)
    learned = [name for name in names if _learned(grid[0][name], grid[-1][name], learn * result.chance_error, n,
                                                  level)]
    errors = torch.tensor([[g[name] for name in learned] for g in grid], dtype=torch.float64)
    times = halfway_steps(errors, steps, fraction)
    replicates = _replicate_errors(result, split, steps, learned, resamples, seed)
    replicate_times = None if replicates is None else halfway_steps(replicates, steps, fraction)
    order = torch.tensor([names.index(name) for name in learned], dtype=torch.float64)
    rho = float(rank_correlation(times, order))
    interval = (None if replicate_times is None
                else _percentiles(rank_correlation(replicate_times, order.expand_as(replicate_times)), level))
    return Ripple(fraction, tuple(steps), tuple(learned), tuple(times.tolist()), replicate_times, rho, interval,
                  tuple(name for name in result.names if name not in learned), n, level)


def halfway_steps(errors: Tensor, steps: Sequence[int], fraction: float = 0.5) -> Tensor:
    """The step at which each column of ``errors`` (..., steps, layers) first reached ``fraction`` of the way from
    its first to its last value, interpolated linearly on log(1 + step) between the two measured steps around it, so
    log-spaced moments weigh alike; (..., layers). A column that never falls that far gets the last step."""
    t = torch.log1p(torch.tensor(steps, dtype=torch.float64))
    target = errors[..., :1, :] - fraction * (errors[..., :1, :] - errors[..., -1:, :])
    reached = errors[..., 1:, :] <= target
    reached[..., -1, :] = True
    at = reached.to(torch.int8).argmax(dim=-2, keepdim=True) + 1  # the first step at or below the target
    before, after = errors.gather(-2, at - 1), errors.gather(-2, at)
    share = ((before - target) / (before - after).clamp_min(1e-12)).clamp(0.0, 1.0)
    return torch.expm1(t[at - 1] + share * (t[at] - t[at - 1])).squeeze(-2)


def rank_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Spearman's correlation along the last axis (ties get their average rank), vectorised over the others so a
    bootstrap's replicates go at once; NaN where either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()


def _ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last axis, ties averaged: below plus (equal + 1) / 2."""
    below = (x.unsqueeze(-2) < x.unsqueeze(-1)).sum(-1)
    equal = (x.unsqueeze(-2) == x.unsqueeze(-1)).sum(-1)
    return below.double() + (equal.double() + 1.0) / 2.0


def _learned(first: float, last: float, threshold: float, n: int | None, level: float) -> bool:
    """Whether the error fell from ``first`` to ``last`` by ``threshold`` and beyond noise (when ``n`` is known)."""
    return first - last >= threshold and (n is None or differs_beyond_noise(first, last, n, level))


def _replicate_errors(result: ProbeResult, split: str, steps: Sequence[int], layers: Sequence[str], resamples: int,
                      seed: int) -> Tensor | None:
    """Top-1 errors (resamples, steps, layers) in seeded bootstrap resamples of ``split``'s samples, one draw for all;
    None when the result lacks a layer's predictions at some step (or there is no layer)."""
    if not layers:
        return None
    try:
        correct = np.stack([[result.correct(name, split, step) for name in layers] for step in steps])
    except KeyError:
        return None
    wrong = torch.from_numpy(~correct).double().reshape(len(steps) * len(layers), -1)
    n = wrong.shape[1]
    counts = [w @ wrong.T / n for w in resample_weights(n, resamples, seed)]
    return torch.cat(counts).reshape(resamples, len(steps), len(layers))


def _percentiles(values: Tensor, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of ``values``, NaNs skipped."""
    lo, hi = _bounds(values, level, dim=0).tolist()
    return lo, hi


def _bounds(values: Tensor, level: float, *, dim: int) -> Tensor:
    """The central ``level`` percentile interval's two ends along ``dim`` (first dimension of the answer), NaNs
    skipped."""
    return torch.nanquantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=values.dtype), dim=dim)


def samples(result: ProbeResult, split: str) -> int | None:
    """How many samples ``split``'s numbers were measured on (the smallest over the result's parts); None when the
    result does not say."""
    counts = [part.get("samples", {}).get(split) for part in [result.meta, *result.meta.get("parts", [])]]
    known = [c for c in counts if c]
    return min(known) if known else None


def describe(findings: Sequence[Finding]) -> str:
    """Markdown bullets, one per finding (a line saying so when there is none)."""
    if not findings:
        return "- nothing to report: no dead segment, garbage forward-prop, lag or kink above the thresholds"
    return "\n".join(f"- {f.describe()}" for f in findings)


def _dead_segments(names: list[str], grid: dict[int, dict[str, float]], steps: list[int], learn: float,
                   drop: float, min_layers: int, beyond: Beyond) -> list[DeadSegment]:
    """Per later step: runs of non-learning layers (the input excluded) ended by a sharp drop, learning after it."""
    first = grid[steps[0]]
    found: dict[tuple[int, int], list[int]] = {}
    for s in steps[1:]:
        now = grid[s]
        learned = [beyond(first[n], now[n], learn) for n in names]
        start = None
        for i, name in enumerate(names):
            if learned[i] or name == INPUT:  # the input cannot learn: never part of a dead segment
                start = None
                continue
            start = i if start is None else start
            nxt = i + 1
            if (nxt < len(names) and beyond(now[name], now[names[nxt]], drop) and any(learned[nxt:])
                    and nxt - start >= min_layers):
                found.setdefault((start, i), []).append(s)
                start = None
    return [DeadSegment(names[a], names[b], b - a + 1, steps[0], tuple(ss), names[b + 1],
                        grid[ss[-1]][names[b]] - grid[ss[-1]][names[b + 1]]) for (a, b), ss in found.items()]


def _climbs(names: list[str], errors: list[float], step: int, climb: float, dip: float,
            min_layers: int, beyond: Beyond) -> list[GarbageForward]:
    """Stretches where the error rises with depth by ``climb``; a fall of more than ``dip`` below the peak ends one."""
    out, start = [], 0
    for end in range(1, len(errors) + 1):
        if end < len(errors) and errors[end] >= max(errors[start:end]) - dip:
            continue
        seg = errors[start:end]
        peak = start + seg.index(max(seg))
        low = start + errors[start:peak + 1].index(min(errors[start:peak + 1]))
        if beyond(errors[peak], errors[low], climb) and peak - low + 1 >= min_layers:
            out.append(GarbageForward(names[low], names[peak], peak - low + 1, step, errors[low], errors[peak]))
        start = end
    return out


def _lags(names: list[str], grid: dict[int, dict[str, float]], steps: list[int], lag: float,
          min_layers: int, beyond: Beyond) -> list[Lag]:
    """Runs of layers behind the best earlier layer at a middle step but not at the last."""
    def behind(errors: dict[str, float]) -> list[tuple[float, float]]:
        """Each layer's error and the best error before it (its own for the first)."""
        values = list(errors.values())
        return [(values[0], values[0])] + [(values[i], min(values[:i])) for i in range(1, len(values))]

    final = behind(grid[steps[-1]])
    out = []
    for s in steps[1:-1]:
        now = behind(grid[s])
        lagging = [beyond(*now[i], lag) and not beyond(*final[i], lag) for i in range(len(names))]
        for a, b in _runs(lagging):
            if b - a + 1 >= min_layers:
                out.append(Lag(names[a], names[b], b - a + 1, s, max(e - best for e, best in now[a:b + 1]), steps[-1]))
    return out


def _kinks(errors: list[float], kink: float, beyond: Beyond) -> list[tuple[int, float]]:
    """Positions worse than both neighbours by at least ``kink`` (and noise), with the smaller of the two rises."""
    return [(i, min(errors[i] - errors[i - 1], errors[i] - errors[i + 1])) for i in range(1, len(errors) - 1)
            if beyond(errors[i], errors[i - 1], kink) and beyond(errors[i], errors[i + 1], kink)]


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(first, last) index of every run of consecutive True."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def _span(first: str, last: str, size: int) -> str:
    return first if first == last else f"{first}-{last} ({size} layers)"


def _points(difference: float) -> str:
    return f"{100 * difference:.1f} points"


def _steps(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps))
