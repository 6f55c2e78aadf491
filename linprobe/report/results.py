"""Probe results: per-layer facts plus one tidy table (step, task, layer, split, metric, value, lo, hi)."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linprobe.atomic import atomic_write_bytes, atomic_write_text

COLUMNS = ("step", "task", "layer", "split", "metric", "value", "lo", "hi")
PREDICTIONS = "predictions.npz"
MAIN = "main"
"""The task of the data's own labels; other label sets are named by the caller (``probe(..., tasks=...)``)."""
_TABLE_METRICS = {"top1_error": "top1", "top5_error": "top5", "balanced_error": "bal", "cross_entropy": "ce",
                  "auroc": "auroc", "macro_f1": "f1", "r2": "r2", "mse": "mse", "selectivity": "sel"}


@dataclass
class LayerInfo:
    """What was probed at one layer: its shape, how it was reduced, the chosen L2 and chance level."""

    name: str
    shape: tuple[int, ...]
    features_in: int
    features_out: int
    reduction: dict[str, Any]
    chance_error: float
    l2: float | None = None

    def cells(self) -> dict[str, str]:
        """The layer's facts as table text: shape, features in->out, reduction, chosen L2, chance."""
        return {"shape": "x".join(map(str, self.shape)), "features": f"{self.features_in}->{self.features_out}",
                "reduction": describe_reduction(self.reduction), "l2": "-" if self.l2 is None else f"{self.l2:.0e}",
                "chance": f"{self.chance_error:.3f}"}


@dataclass
class Row:
    """One measurement of the tidy table, with its confidence interval ``[lo, hi]`` where one is known."""

    step: int
    layer: str
    split: str
    metric: str
    value: float
    task: str = MAIN
    lo: float | None = None
    hi: float | None = None


@dataclass
class ProbeResult:
    """Everything one probing run measured, in execution order of the layers."""

    layers: list[LayerInfo]
    rows: list[Row] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    """Per-sample predictions (class codes or values) keyed ``step/task/split/layer``, and the targets keyed
    ``step/task/split/:targets``: what paired comparisons read; saved as ``predictions.npz``."""

    def add(self, step: int, layer: str, split: str, metrics: Mapping[str, float], *, task: str = MAIN,
            intervals: Mapping[str, tuple[float, float]] | None = None) -> None:
        """Append one row per metric, with its interval from ``intervals`` when there is one."""
        intervals = intervals or {}
        for k, v in metrics.items():
            lo, hi = intervals.get(k, (None, None))
            self.rows.append(Row(step, layer, split, k, float(v), task,
                                 None if lo is None else float(lo), None if hi is None else float(hi)))

    @classmethod
    def concat(cls, results: list[ProbeResult]) -> ProbeResult:
        """One table from several runs over the same layers (e.g. one per training step)."""
        layers = {info.name: info for r in results for info in r.layers}
        invalid: dict[str, str] = {}
        for r in results:  # the first report of each invalid layer
            for name, where in r.meta.get("invalid", {}).items():
                invalid.setdefault(name, where)
        meta: dict[str, Any] = {"parts": [r.meta for r in results]}
        return cls(list(layers.values()), [row for r in results for row in r.rows],
                   {**meta, "invalid": invalid} if invalid else meta,
                   {k: v for r in results for k, v in r.predictions.items()})

    @property
    def chance_error(self) -> float:
        """The chance level the figures mark: the largest of the layers' (all equal when they share labels)."""
        return max(info.chance_error for info in self.layers)

    @property
    def names(self) -> list[str]:
        """Layer names in execution order."""
        return [info.name for info in self.layers]

    @property
    def tasks(self) -> list[str]:
        """The tasks measured, the main one first."""
        seen = dict.fromkeys([MAIN] if any(r.task == MAIN for r in self.rows) else [])
        return list({**seen, **dict.fromkeys(r.task for r in self.rows)})

    @property
    def steps(self) -> list[int]:
        """The distinct steps measured, ascending."""
        return sorted({r.step for r in self.rows})

    def value(self, layer: str, split: str, metric: str = "top1_error", step: int | None = None, *,
              task: str = MAIN) -> float:
        """One number of the table (``step`` defaults to the last one measured)."""
        return self.row(layer, split, metric, step, task=task).value

    def interval(self, layer: str, split: str, metric: str = "top1_error", step: int | None = None, *,
                 task: str = MAIN) -> tuple[float, float]:
        """The confidence interval ``(lo, hi)`` of one number of the table."""
        row = self.row(layer, split, metric, step, task=task)
        if row.lo is None or row.hi is None:
            raise KeyError(f"{metric} of layer {layer!r} on {split!r} has no interval")
        return row.lo, row.hi

    def row(self, layer: str, split: str, metric: str = "top1_error", step: int | None = None, *,
            task: str = MAIN) -> Row:
        """One row of the table (``step`` defaults to the last one measured)."""
        step = self.steps[-1] if step is None else step
        for r in self.rows:
            if (r.step, r.task, r.layer, r.split, r.metric) == (step, task, layer, split, metric):
                return r
        raise KeyError(f"no {metric} for layer {layer!r} on {split!r} at step {step} (task {task!r})")

    def correct(self, layer: str, split: str = "test", step: int | None = None, *, task: str = MAIN) -> np.ndarray:
        """Whether the probe of ``layer`` got each sample of ``split`` right (for
        :func:`linprobe.fit.uncertainty.paired_difference`: two layers, checkpoints or models on the same samples)."""
        step = self.steps[-1] if step is None else step
        key = f"{step}/{task}/{split}/{layer}"
        if key not in self.predictions:
            raise KeyError(f"no predictions of layer {layer!r} on {split!r} at step {step} (task {task!r}); "
                           f"this result holds {len(self.predictions)} prediction arrays")
        correct: np.ndarray = self.predictions[key] == self.predictions[f"{step}/{task}/{split}/:targets"]
        return correct

    def errors(self, split: str = "test", metric: str = "top1_error", step: int | None = None, *,
               task: str = MAIN) -> dict[str, float]:
        """``metric`` per layer on ``split`` at ``step`` (default: the last) for ``task``, in execution order.

        Layers without that number (found invalid, or not measured at that step) are left out.
        """
        step = self.steps[-1] if step is None else step
        have = {r.layer: r.value for r in self.rows
                if (r.step, r.task, r.split, r.metric) == (step, task, split, metric)}
        return {n: have[n] for n in self.names if n in have}

    def table(self, step: int | None = None, *, markdown: bool = False, metrics: Sequence[str] | None = None,
              task: str = MAIN) -> str:
        """A table of ``task``, one row per layer: size, reduction, L2, chance and each metric per split
        (``metrics``: which of top1_error, top5_error, balanced_error, cross_entropy, auroc, macro_f1, r2, mse,
        selectivity; default all measured).

        Fixed-width text for a terminal, or a markdown table (``markdown=True``) for a report page.
        """
        step = self.steps[-1] if step is None else step
        mine = [r for r in self.rows if r.step == step and r.task == task]
        splits = [s for s in ("train", "valid", "test") if any(r.split == s for r in mine)]
        metrics = [m for m in _TABLE_METRICS if any(r.metric == m for r in mine) and (metrics is None or m in metrics)]
        head = ["layer", "shape", "features", "reduction", "l2", "chance"] + [
            f"{s} {_TABLE_METRICS[m]}" for m in metrics for s in splits]
        invalid = self.meta.get("invalid", {})
        chance = self.meta.get("tasks", {}).get(task, {}).get("chance_error")
        lines = []
        for info in self.layers:
            have = {(r.split, r.metric): r.value for r in mine if r.layer == info.name}
            facts = info.cells()
            if task != MAIN:
                facts["l2"] = f"{have[('valid', 'l2')]:.0e}" if ("valid", "l2") in have else "-"
                facts["chance"] = "-" if chance is None else f"{chance:.3f}"
            cells = [info.name, *facts.values()]
            if info.name in invalid:
                filler = [""] * (len(head) - len(cells) - 1) if markdown else []  # markdown rows need every cell
                cells += [f"invalid: {invalid[info.name]}", *filler]
            else:
                cells += [f"{have[(s, m)]:.4f}" if (s, m) in have else "-" for m in metrics for s in splits]
            lines.append(cells)
        if markdown:
            return markdown_table(head, lines)
        widths = [max(len(c) for c in col) for col in zip(head, *[r for r in lines if len(r) == len(head)])]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths + [0])).rstrip() for row in [head, *lines])

    def to_csv(self) -> str:
        """The tidy table as CSV text."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows((r.step, r.task, r.layer, r.split, r.metric, format_value(r.value),
                     "" if r.lo is None else format_value(r.lo), "" if r.hi is None else format_value(r.hi))
                    for r in self.rows)
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, inverted by ``from_dict``."""
        return {"layers": [asdict(i) for i in self.layers], "rows": [asdict(r) for r in self.rows], "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        layers = [LayerInfo(**{**i, "shape": tuple(i["shape"])}) for i in d["layers"]]
        return cls(layers, [Row(**r) for r in d["rows"]], d.get("meta", {}))

    def save(self, folder: str | Path) -> Path:
        """Write ``results.csv``, ``results.json`` and (when there are any) ``predictions.npz`` into ``folder``
        atomically; returns the folder."""
        folder = Path(folder)
        atomic_write_text(folder / "results.csv", self.to_csv())
        atomic_write_text(folder / "results.json", json.dumps(self.to_dict(), indent=1))
        if self.predictions:
            buf = io.BytesIO()
            # mypy matches the ** keys against savez_compressed's allow_pickle: bool; they are array names
            np.savez_compressed(buf, **self.predictions)  # type: ignore[arg-type]
            atomic_write_bytes(folder / PREDICTIONS, buf.getvalue())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ProbeResult:
        """Read back what ``save`` wrote."""
        result = cls.from_dict(json.loads((Path(folder) / "results.json").read_text()))
        if (Path(folder) / PREDICTIONS).is_file():
            with np.load(Path(folder) / PREDICTIONS) as saved:
                result.predictions = {k: saved[k] for k in saved.files}
        return result

    def plot(self, path: str | Path | None = None, *, split: str = "test", step: int | None = None) -> Any:
        """Error per layer with the chance line (see ``linprobe.report.plots.plot_layer_errors``)."""
        from linprobe.report.plots import plot_layer_errors

        return plot_layer_errors(self, path, split=split, step=step)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with its columns padded to line up in plain text too."""
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in (head, *rows)]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def format_value(value: float) -> str:
    """A value for the CSV: one that float32 holds exactly (the metrics are computed in float32) as float32's
    shortest text, which reads back (as float32) as the same number: ``0.08``, not ``0.07999999821186066``;
    anything else as Python's ``repr``. ``results.json`` keeps every value's full float64 ``repr``."""
    single = np.float32(value)
    return np.format_float_positional(single, trim="-") if float(single) == value else repr(value)


def describe_reduction(reduction: dict[str, Any]) -> str:
    """A reduction saved as a dict, in words (``pool 2x2``, ``subset 100/784``)."""
    from linprobe.capture.reduce import reduction_from_dict

    return reduction_from_dict(reduction).describe()
