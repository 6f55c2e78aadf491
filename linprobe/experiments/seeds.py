"""Several seeds of one experiment: each seed's run in ``out/seed-K/``, the spread per layer, a verdict over seeds.

One seed's run is bit-reproducible on its own (``reproduce(name, out, seed=K)`` gives the same numbers), so the
combined summary is a pure function of the per-seed summaries: their headline numbers (:class:`Headline`) give per
layer the mean, the SD and the min-max over seeds beside each seed's SE, their checks a verdict over seeds (a claim
holding in every seed, in most, in none: reproduced, partly, not; :func:`linprobe.experiments.report.verdict`).
"""
from __future__ import annotations

import csv
import io
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from linprobe.atomic import atomic_write_text
from linprobe.experiments.report import Check, Headline, Summary, standard_error, with_se
from linprobe.report.plots import plot_seed_spread
from linprobe.report.results import markdown_table

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    S = TypeVar("S", bound=DataclassInstance)
else:
    S = TypeVar("S")

RunOne = Callable[[Path, int], Summary]  # (the seed's folder, the seed) -> that run's summary
FIGURE, TABLE = "seeds.png", "seeds.csv"


def seed_folder(out: Path, seed: int) -> Path:
    """Where the run with ``seed`` goes: ``out/seed-K``."""
    return out / f"seed-{seed}"


def setting(*, quick: S, full: S, seeds: S, quick_run: bool, multi_seed: bool, epochs: int | None = None) -> S:
    """An experiment's setting (a frozen dataclass with ``epochs``): ``quick`` for a quick run, ``seeds`` for a full
    run with ``multi_seed`` (the lighter full setting several seeds run), else ``full``; ``epochs`` in place of its
    own when given. Quick runs ignore ``multi_seed``: they are small already and stay the single quick runs."""
    chosen = quick if quick_run else seeds if multi_seed else full
    return chosen if epochs is None else replace(chosen, epochs=epochs)


def over_seeds(run_one: RunOne, out: Path, *, seeds: int, first: int = 0) -> Summary:
    """Run the seeds ``first .. first + seeds - 1`` one after another, each into :func:`seed_folder`, then write
    the combined summary, table and figure into ``out`` and return the summary (its wall time is the total)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a whole number of runs >= 1, got {seeds!r}")
    start = time.perf_counter()
    runs: dict[int, Summary] = {}
    for seed in range(first, first + seeds):
        runs[seed] = run_one(seed_folder(out, seed), seed)
        if runs[seed].headline is None:  # stop at once, not after every seed
            raise ValueError(f"{runs[seed].name} gives no headline numbers (Summary.headline) to combine over seeds")
    summary = combine(runs, out)
    summary.seconds = time.perf_counter() - start
    summary.write(out)
    return summary


@dataclass(frozen=True)
class Spread:
    """One layer's error over the seeds (in seed order) and each seed's standard error."""

    values: tuple[float, ...]
    ses: tuple[float, ...]

    @property
    def mean(self) -> float:
        """The mean over seeds."""
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        """The sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def se(self) -> float:
        """A typical single seed's standard error: the root mean square of theirs."""
        return math.sqrt(statistics.fmean(s * s for s in self.ses))


def spreads(headlines: Mapping[int, Headline]) -> dict[str, dict[str, Spread]]:
    """Curve label -> layer -> :class:`Spread` over the seeds; every seed must have the same curves and layers."""
    first = next(iter(headlines.values()))
    shape = {label: list(curve) for label, curve in first.curves.items()}
    for seed, h in headlines.items():
        if {label: list(curve) for label, curve in h.curves.items()} != shape or h.split != first.split:
            raise ValueError(f"seed {seed}'s headline has other curves, layers or split than the first seed's; "
                             "runs of one experiment in one setting have the same ones")
    return {label: {layer: Spread(tuple(h.curves[label][layer] for h in headlines.values()),
                                  tuple(standard_error(h.curves[label][layer], h.n) for h in headlines.values()))
                    for layer in layers}
            for label, layers in shape.items()}


def combine_checks(per_seed: Mapping[int, Sequence[Check]]) -> list[Check]:
    """One check per claim over the seeds: held in how many, each seed's evidence; the claims must match."""
    lists = list(per_seed.values())
    if any([(c.claim, c.core) for c in checks] != [(c.claim, c.core) for c in lists[0]] for checks in lists):
        raise ValueError("the seeds' checks differ in their claims: runs of one experiment check the same claims")
    combined = []
    for k, first in enumerate(lists[0]):
        held = sum(checks[k].passed for checks in lists)
        evidence = " | ".join(f"seed {seed}{'' if checks[k].passed else ' FAILS'}: {checks[k].evidence}"
                              for seed, checks in per_seed.items())
        combined.append(Check(first.claim, held == len(lists), evidence, first.core, seeds=(held, len(lists))))
    return combined


def _points(x: float) -> str:
    """An error difference or spread in percentage points, two decimals."""
    return f"{100 * x:.2f}"


def spread_table(label: str, layers: Mapping[str, Spread], seeds: Sequence[int], n: Sequence[int]) -> str:
    """A markdown table for one curve: per layer each seed's error with its SE, the mean, the SD and the min-max
    over seeds, and the SD against a single seed's SE (above 1: the seeds differ by more than one test set's
    noise)."""
    head = [f"{label}: layer", *(f"seed {s} (SE)" for s in seeds), "mean", "SD over seeds (points)", "min-max",
            "SD / SE"]
    rows = [[layer, *(with_se(v, m) for v, m in zip(sp.values, n)), f"{sp.mean:.2%}", _points(sp.sd),
             f"{min(sp.values):.1%}-{max(sp.values):.1%}", f"{sp.sd / sp.se:.1f}" if sp.se else "-"]
            for layer, sp in layers.items()]
    return markdown_table(head, rows)


def spread_csv(curves: Mapping[str, Mapping[str, Spread]], seeds: Sequence[int]) -> str:
    """Tidy rows ``curve, layer, seed, error, se``, then per layer the ``mean``, ``sd``, ``min``, ``max`` (seed
    column empty, se the typical single seed's)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["curve", "layer", "seed", "statistic", "error", "se"])
    for label, layers in curves.items():
        for layer, sp in layers.items():
            writer.writerows([label, layer, s, "seed", repr(v), repr(se)] for s, v, se in zip(seeds, sp.values, sp.ses))
            writer.writerows([label, layer, "", name, repr(value), repr(sp.se)] for name, value in
                             (("mean", sp.mean), ("sd", sp.sd), ("min", min(sp.values)), ("max", max(sp.values))))
    return buffer.getvalue()


def spread_finding(label: str, layers: Mapping[str, Spread]) -> str:
    """How far the seeds spread on one curve, against a single seed's SE."""
    sds = {layer: sp.sd for layer, sp in layers.items()}
    widest = max(sds, key=lambda layer: sds[layer])
    ses = [sp.se for sp in layers.values()]
    above = [layer for layer, sp in layers.items() if sp.sd > sp.se]
    return (f"{label}: SD over seeds {_points(min(sds.values()))}-{_points(sds[widest])} points per layer (widest at "
            f"{widest}: {', '.join(f'{v:.1%}' for v in layers[widest].values)}) against a single seed's SE of "
            f"{_points(min(ses))}-{_points(max(ses))} points; the SD exceeds the SE at {len(above)} of {len(layers)} "
            "layers" + (f" ({', '.join(above)})" if above else ""))


def head_finding(headlines: Mapping[int, Headline]) -> str | None:
    """Fig. 4b over the seeds: the head-input probe against the model, the gap and its side in each seed."""
    heads = {seed: h.head for seed, h in headlines.items() if h.head is not None}
    if not heads:
        return None
    first = next(iter(heads.values()))
    sides = [head.side for head in heads.values()]
    gaps = ", ".join(f"seed {seed} {head.probe - head.model:+.1%}" for seed, head in heads.items())
    return (f"Fig. 4b over {len(heads)} seeds, the probe at the head's input ({first.point}) against the model on "
            f"{first.split}: probe mean {statistics.fmean(h.probe for h in heads.values()):.2%}, model mean "
            f"{statistics.fmean(h.model for h in heads.values()):.2%}; gap per seed {gaps}; level within 2 SE in "
            f"{sides.count(0)}, probe clearly below in {sides.count(-1)}, clearly above in {sides.count(1)} "
            "(each seed's summary says what its gap means)")


def model_finding(headlines: Mapping[int, Headline]) -> str | None:
    """The model's own error in each seed, with its SE, and the spread over seeds."""
    own = {seed: (h.model_error, h.n) for seed, h in headlines.items() if h.model_error is not None}
    if not own:
        return None
    values = [e for e, _ in own.values()]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    split = next(iter(headlines.values())).split
    return (f"the model's own {split} error: " + ", ".join(f"seed {s} {with_se(e, n)}" for s, (e, n) in own.items())
            + f"; mean {statistics.fmean(values):.2%}, SD over seeds {_points(sd)} points")


def combine(runs: Mapping[int, Summary], out: Path) -> Summary:
    """The summary of several seeds' runs (seed -> its summary, each with a :class:`Headline`): checks over seeds,
    the spread per layer as tables, ``seeds.csv`` and the figure ``seeds.png`` (written into ``out``)."""
    missing = [seed for seed, s in runs.items() if s.headline is None]
    if not runs or missing:
        raise ValueError(f"combining seeds needs each run's headline numbers; missing in seed(s) {missing or 'all'}")
    headlines = {seed: s.headline for seed, s in runs.items() if s.headline is not None}
    seeds, first = list(runs), next(iter(runs.values()))
    curves = spreads(headlines)
    h0 = headlines[seeds[0]]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / TABLE, spread_csv(curves, seeds))
    own = [h.model_error for h in headlines.values() if h.model_error is not None]
    plot_seed_spread({label: {layer: list(sp.values) for layer, sp in layers.items()}
                      for label, layers in curves.items()},
                     {label: {layer: sp.se for layer, sp in layers.items()} for label, layers in curves.items()},
                     out / FIGURE, chance=h0.chance, model=own or None, ylabel=f"probe {h0.split} error",
                     title=f"{first.name}: probe {h0.split} error per layer over {len(seeds)} seeds")
    verdicts = ", ".join(f"seed {s} {r.verdict or 'see notes'}" for s, r in runs.items())
    findings = [f"per-seed verdicts: {verdicts}",
                *[spread_finding(label, layers) for label, layers in curves.items()],
                *[f for f in (model_finding(headlines), head_finding(headlines)) if f is not None]]
    notes = [(f"seed K reseeds everything the run draws (splits where they are drawn, initialisation, minibatch "
              f"order, dropout, probe subsets): the SD over seeds is the run-to-run spread, each seed's SE only its "
              f"{h0.split} set's sampling noise; every seed's run is in seed-K/ with its own summary and equals "
              "reproduce(name, out, seed=K) with the same options (a full run's multi_seed=True included) bit for bit"),
             *dict.fromkeys(note for s in runs.values() for note in s.notes)]  # each seed's notes, once
    settings = {"seeds": ", ".join(map(str, seeds)),
                **{k: v for k, v in first.settings.items() if k != "seed"},
                "per-seed wall time": ", ".join(f"seed {s} {r.seconds:.0f} s" for s, r in runs.items())}
    tables = [spread_table(label, layers, seeds, [h.n for h in headlines.values()]) for label, layers in
              curves.items()]
    return Summary(f"{first.name} over {len(seeds)} seeds", first.claim, findings,
                   combine_checks({s: r.checks for s, r in runs.items()}) if first.checks else [],
                   settings=settings, figures=[FIGURE], tables=tables, notes=notes)
