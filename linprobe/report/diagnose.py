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
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from linprobe.capture.taps import INPUT
from linprobe.fit.uncertainty import differs_beyond_noise
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
