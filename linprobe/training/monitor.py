"""Probes over training, inside any training loop: live online probes and, optionally, exact snapshots.

::

    with lp.Monitor(model, layers, num_classes=10, valid=valid, every=100, exact=probe_train) as monitor:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
            monitor.step(y)                     # after the forward, before opt.step()
            opt.step()
    monitor.result                              # one tidy table over every measured step

Between measurements the online probes learn from the features of the model's own training forward
(detached, no second forward). Every ``every`` steps, and at step 0, the monitor measures:

- **online** probes are evaluated on ``valid``; their rows carry metric names prefixed ``online_``;
- **exact** probes (when ``exact`` holds a probe-training subset) are the paper's definition of the probe
  at step n: the optimal linear classifier for the parameters at step n, fitted to convergence on that
  subset, L2 chosen on ``valid``, warm-started from the previous measurement's probes; plain metric names.

Called between the forward and ``opt.step()``, the measurement of step n sees the parameters after
exactly n optimiser steps. The online probe of step n has learned from the n + 1 minibatches up to that
point, so it trails a moving model: the gap to the exact probe is what ``online_exact_gap`` reports.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import nn

from linprobe.capture.reduce import DEFAULT_FEATURE_BUDGET, ReduceSpec
from linprobe.capture.taps import LayerSpec
from linprobe.data.inputs import Split
from linprobe.finished import probe
from linprobe.fit.probes import ProbeBank
from linprobe.fit.solvers import DEFAULT_L2_PATH
from linprobe.report.results import ProbeResult, Row
from linprobe.training.live import OnlineProbes

ONLINE = "online_"  # prefix of the online probes' metric names in a monitor's table
MeasureCallback = Callable[[ProbeResult, int], None]


class _ExactOptions(TypedDict):
    """The options a monitor passes on to ``probe`` for its exact snapshots."""

    reduce: ReduceSpec
    feature_budget: int
    seed: int
    batch_size: int
    l2_path: tuple[float, ...]
    max_iter: int
    patience: int | None


def online_metric(metric: str) -> str:
    """The name ``metric`` has in the table for online probes (``top1_error`` -> ``online_top1_error``)."""
    return ONLINE + metric


class Monitor:
    """Online probes on ``layers`` of ``model`` learning at every ``step(y)``, measured every ``every`` steps.

    ``valid`` is the fixed held-out set every measurement is evaluated on; ``exact`` (a probe-training
    subset, any data ``probe`` accepts) turns on exact snapshots, fitted by ``probe`` with ``l2_path``,
    ``max_iter`` and ``patience``. ``learn_every`` > 1 lets the online probes learn from every that many
    training forwards only, dividing their cost. ``on_measure(result, step)`` is called after each
    measurement with the whole table so far (e.g. a TensorBoard logger). ``seconds`` accumulates the time
    spent learning, evaluating online probes and fitting exact ones.
    """

    def __init__(self, model: nn.Module, layers: LayerSpec = "all", *, num_classes: int, valid: Any,
                 every: int = 100, exact: Any = None, learn_every: int = 1, lr: float = 1e-3,
                 reduce: ReduceSpec = "auto", feature_budget: int = DEFAULT_FEATURE_BUDGET, seed: int = 0,
                 batch_size: int = 256, l2_path: tuple[float, ...] = DEFAULT_L2_PATH, max_iter: int = 100,
                 patience: int | None = 2, on_measure: MeasureCallback | None = None) -> None:
        if every < 1 or learn_every < 1:
            raise ValueError(f"every={every} and learn_every={learn_every} must be at least 1 (measure, and let the "
                             "online probes learn, every that many optimiser steps)")
        self.valid = Split.of(valid, name="valid")  # normalised once: every measurement reuses its fingerprint
        self.exact = None if exact is None else Split.of(exact, name="exact")
        self.model, self.every, self.learn_every = model, every, learn_every
        self.online = OnlineProbes(model, layers, num_classes=num_classes, lr=lr, reduce=reduce,
                                   feature_budget=feature_budget, seed=seed)
        self._exact_options = _ExactOptions(reduce=reduce, feature_budget=feature_budget, seed=seed,
                                            batch_size=batch_size, l2_path=l2_path, max_iter=max_iter,
                                            patience=patience)
        self.batch_size = batch_size
        self.on_measure = on_measure
        self.result = ProbeResult([], meta={"every": every, "exact": exact is not None})
        self.probes: ProbeBank | None = None  # the exact probes of the latest measurement
        self.seconds = {"learn": 0.0, "online": 0.0, "exact": 0.0}
        self._next = 0  # the step number step(y) assumes when none is given
        self._due = 0  # the next step to measure at

    def step(self, y: torch.Tensor, step: int | None = None) -> dict[str, float]:
        """Let the online probes learn from the model's latest forward and measure when ``step`` is due.

        ``step`` is the number of optimiser steps done before this forward (default: counted from 0 by
        the calls). Returns the probes' batch metrics (``probe/<layer>/train_top1_error``) for logging, or
        nothing on a step ``learn_every`` skips.
        """
        step = self._next if step is None else step
        logs: dict[str, float] = {}
        if step % self.learn_every == 0 or self.online.optimizer is None:
            start = time.perf_counter()
            _, logs = self.online.step(y)
            self.seconds["learn"] += time.perf_counter() - start
        if step >= self._due:
            self.measure(step)
            self._due = (step // self.every + 1) * self.every
        self._next = step + 1
        return logs

    def measure(self, step: int) -> ProbeResult:
        """Evaluate the online probes and fit the exact ones (if enabled) now, as step ``step``; returns both rows."""
        if step in self.result.steps:
            raise ValueError(f"step {step} is already measured: measure each step once (after the loop, measure "
                             "the number of optimiser steps done)")
        start = time.perf_counter()
        online = self.online.evaluate(self.valid, split="valid", batch_size=self.batch_size, step=step)
        online.rows = [Row(r.step, r.layer, r.split, online_metric(r.metric), r.value) for r in online.rows]
        middle = time.perf_counter()
        parts = [online]
        if self.exact is not None:
            snapshot = probe(self.model, self.exact, self.valid, layers=self.online.taps.order, step=step,
                             warm_start=self.probes, progress=False, plot=False, **self._exact_options)
            self.probes = snapshot.probes  # type: ignore[attr-defined]  # finished.probe attaches its bank
            parts.append(snapshot)
        self.seconds["online"] += middle - start
        self.seconds["exact"] += time.perf_counter() - middle
        self._merge(parts)
        if self.on_measure is not None:
            self.on_measure(self.result, step)
        return ProbeResult.concat(parts)

    def _merge(self, parts: list[ProbeResult]) -> None:
        """Add the rows of one measurement to ``result``; layer facts and invalid layers from the latest."""
        layers = {info.name: info for info in self.result.layers}
        invalid = dict(self.result.meta.get("invalid", {}))
        for part in parts:
            layers.update({info.name: info for info in part.layers})
            invalid.update(part.meta.get("invalid", {}))
            self.result.rows.extend(part.rows)
        self.result.layers = [layers[n] for n in self.online.taps.order]
        self.result.meta.update(seconds=dict(self.seconds), **({"invalid": invalid} if invalid else {}))

    def close(self) -> None:
        """Remove the hooks from the model (idempotent)."""
        self.online.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Gap:
    """How far the online probes' errors were from the exact probes' at one step."""

    step: int
    mean: float  # mean over layers of |online - exact|
    worst: float
    worst_layer: str
    online_minus_exact: float  # mean signed difference: > 0 when online probes are worse


def online_exact_gap(result: ProbeResult, *, split: str = "valid", metric: str = "top1_error") -> list[Gap]:
    """Per step measured both ways, the gap between online and exact probes' ``metric`` on ``split``."""
    gaps = []
    for step in result.steps:
        online, exact = result.errors(split, online_metric(metric), step), result.errors(split, metric, step)
        diff = {n: online[n] - exact[n] for n in online if n in exact}
        if not diff:
            continue
        worst = max(diff, key=lambda n: abs(diff[n]))
        gaps.append(Gap(step, sum(map(abs, diff.values())) / len(diff), abs(diff[worst]), worst,
                        sum(diff.values()) / len(diff)))
    if not gaps:
        raise ValueError(f"no step has both {metric!r} and {online_metric(metric)!r} on {split!r}: run the Monitor "
                         "with exact=<a probe-training subset> to get exact snapshots beside the online probes")
    return gaps


def gap_table(gaps: list[Gap]) -> str:
    """The gaps as markdown table rows (header included), in percentage points."""
    lines = ["| step | mean abs gap | worst gap (layer) | online - exact |", "| --- | --- | --- | --- |"]
    lines += [f"| {g.step} | {100 * g.mean:.1f} | {100 * g.worst:.1f} ({g.worst_layer}) | "
              f"{100 * g.online_minus_exact:+.1f} |" for g in gaps]
    return "\n".join(lines)


def metrics_at(result: ProbeResult, step: int) -> Mapping[str, float]:
    """Every number measured at ``step`` keyed ``probe/<layer>/<split>/<metric>``, for loggers."""
    return {f"probe/{r.layer}/{r.split}/{r.metric}": r.value for r in result.rows if r.step == step}
