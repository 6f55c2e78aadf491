"""Figures: probe error per layer with the chance line (matplotlib, no screen needed)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from linprobe.report.diagnose import Ripple
    from linprobe.report.results import ProbeResult

# probe error from good to bad: blue, green, yellow, red (001 Fig. 5, 9); shared by every coloured figure
ERROR_CMAP = matplotlib.colors.LinearSegmentedColormap.from_list("probe_error",
                                                                 ["#2c7bb6", "#1a9641", "#ffffbf", "#d7191c"])


def error_norm(chance: float) -> matplotlib.colors.Normalize:
    """The one colour scale of every coloured figure: 0 (blue) to ``chance`` (red, useless), worse clipped to red,
    so a colour means the same error in every diagram, heatmap and animation."""
    if not (isinstance(chance, (int, float)) and 0 < chance <= 1):
        raise ValueError(f"chance must be the error of a guess, in (0, 1], got {chance!r}")
    return matplotlib.colors.Normalize(0.0, float(chance), clip=True)


def probe_colour(error: float, chance: float) -> tuple[float, float, float, float]:
    """The RGBA colour of a probe ``error`` on the scale 0 to ``chance`` (see :func:`error_norm`)."""
    return ERROR_CMAP(error_norm(chance)(error))


def error_grid(result: ProbeResult, split: str, metric: str) -> tuple[list[str], list[list[float]]]:
    """The layers with ``metric`` on ``split`` at some step, and per step (ascending) their values, NaN where a
    layer was not measured."""
    per_step = [result.errors(split, metric, step) for step in result.steps]
    names = [n for n in result.names if any(n in errors for errors in per_step)]
    return names, [[errors.get(n, math.nan) for n in names] for errors in per_step]


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a figure as PNG through a temporary file, so no half-written image is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    plt.close(fig)
    return path


def plot_layer_errors(result: ProbeResult, path: str | Path | None = None, *, split: str = "test",
                      step: int | None = None, title: str | None = None) -> Any:
    """Bar chart of the main task's top-1 error per layer on ``split`` (0 to 1) with its confidence interval as
    an error bar and the chance level dotted; every other classification task of the result (a control task, a
    second label set) as a line of markers on the same axes, so a control task's selectivity is the height between
    its line and the bars; regression tasks' R^2 (their ``r2_score``) as dashed lines."""
    errors = result.errors(split, step=step)
    names = list(errors)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4))
    lo, hi = _interval_bars(result, names, split, step)
    ax.bar(range(len(names)), list(errors.values()), color="tab:blue", label="main",
           yerr=None if lo is None else [lo, hi], error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#444"})
    for task, about in result.meta.get("tasks", {}).items():
        if task == "main":
            continue
        metric = "r2" if about["kind"] == "values" else "top1_error"
        found = result.errors(split, metric, step, task=task)
        ax.plot([names.index(n) for n in found if n in names], [v for n, v in found.items() if n in names],
                marker="o", linestyle="--" if metric == "r2" else "-", linewidth=0.8, markersize=3,
                label=f"{task} ({'R^2' if metric == 'r2' else 'error'})")
    chance = result.chance_error
    ax.axhline(chance, linestyle=":", color="black", label=f"chance ({chance:.2f})")
    ax.set_xticks(range(len(names)), names, rotation=60 if len(names) < 40 else 90, ha="right",
                  fontsize=8 if len(names) < 40 else 5)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{split} error (linear probe)")
    ax.set_title(title or f"probe {split} error per layer" + (", 95% intervals" if lo is not None else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the axes, off the bars
    return save_figure(fig, path) if path is not None else fig


def _interval_bars(result: ProbeResult, names: list[str], split: str,
                   step: int | None) -> tuple[list[float] | None, list[float] | None]:
    """The distances below and above each layer's top-1 error to its interval's ends; None when the result has
    no intervals."""
    try:
        rows = [result.row(name, split, step=step) for name in names]
    except KeyError:
        return None, None
    if any(r.lo is None or r.hi is None for r in rows):
        return None, None
    return [r.value - r.lo for r in rows], [r.hi - r.value for r in rows]  # type: ignore[operator]


def plot_layer_curves(curves: dict[str, dict[str, float]], path: str | Path, *, ylabel: str = "probe error",
                      title: str = "", chance: float | None = None) -> Path:
    """Several error-per-layer lines on one axis (e.g. before and after training)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for label, errors in curves.items():
        ax.plot(range(len(errors)), list(errors.values()), marker="o", label=label)
    names = list(next(iter(curves.values())))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    if chance is not None:
        ax.axhline(chance, linestyle=":", color="black", label="chance")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_errors_against_model(errors: dict[str, float], model_error: float, path: str | Path, *,
                              chance: float | None = None, ylabel: str = "valid error", title: str = "") -> Path:
    """Probe error per layer (magenta) beside the model's own error (green line), as in 001 Fig. 4b."""
    names = list(errors)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(names) + 2), 4))
    ax.plot(range(len(names)), list(errors.values()), marker="o", color="magenta", label="linear probe")
    ax.axhline(model_error, color="green", label=f"the model itself ({model_error:.1%})")
    if chance is not None:
        ax.axhline(chance, linestyle=":", color="black", label=f"chance ({chance:.2f})")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05 * max([*errors.values(), model_error, chance or 0]))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_heatmap(result: ProbeResult, path: str | Path | None = None, *, split: str = "test",
                 metric: str = "top1_error", title: str | None = None) -> Any:
    """Layers (across) by measured steps (down) coloured by probe error, red bad to green/blue good (001 Fig. 5, 9).

    The colour scale runs from 0 to the chance level (:func:`error_norm`, as every coloured figure); a layer not
    measured at a step is left blank. One row per measured step, labelled with its step: where the steps are not
    evenly spaced the axis says so, since equal rows would otherwise suggest equal intervals.
    """
    steps = result.steps
    names, grid = error_grid(result, split, metric)
    chance = result.chance_error
    fig, ax = plt.subplots(figsize=(max(6.0, 0.07 * len(names) + 3), min(12.0, 1.5 + 0.45 * len(steps))))
    image = ax.imshow(grid, aspect="auto", cmap=ERROR_CMAP, norm=error_norm(chance), interpolation="nearest")
    every = max(1, len(names) // 16)
    ax.set_xticks(range(0, len(names), every), names[::every], rotation=90, fontsize=7)
    every = max(1, len(steps) // 24)
    ax.set_yticks(range(0, len(steps), every), [str(s) for s in steps[::every]])
    gaps = {b - a for a, b in pairwise(steps)}
    ax.set_ylabel("step (minibatches)" + ("\none row per measured step:\nrows not evenly spaced in steps"
                                          if len(gaps) > 1 else ""))
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"probe {split} {metric}: 0 to chance ({chance:.2f}) or worse")
    ax.set_title(title or f"probe {split} {metric} per layer and step")
    return save_figure(fig, path) if path is not None else fig


def plot_error_by_depth(result: ProbeResult, path: str | Path | None = None, *, split: str = "test",
                        step: int | None = None, title: str | None = None) -> Any:
    """Bar chart of top-1 error per layer for deep stacks (002 Figs. 7-8): fixed width, a label every few layers.

    Bars stand at each layer's position in execution order (0 for the input); y runs from 0 to 1 and the
    chance level is dotted.
    """
    errors = result.errors(split, step=step)
    position = {name: k for k, name in enumerate(result.names)}
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar([position[n] for n in errors], list(errors.values()), width=0.85, color="tab:blue")
    chance = result.chance_error
    ax.axhline(chance, linestyle=":", color="black", label=f"chance ({chance:.2f})")
    every = max(1, len(result.names) // 16)
    ax.set_xticks(range(0, len(result.names), every), result.names[::every], rotation=90, fontsize=7)
    ax.set_xlim(-1, len(result.names))
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{split} error (linear probe)")
    ax.set_title(title or f"probe {split} error per layer")
    ax.legend(loc="upper right")
    return save_figure(fig, path) if path is not None else fig


def plot_halfway(ripple: Ripple, path: str | Path, *, depth: Mapping[str, int] | None = None, title: str = "") -> Path:
    """The step at which each learning layer was ``ripple.fraction`` of the way down (log scale, linear below 1)
    against its ``depth`` (default: its position), with its bootstrap interval, the measured steps as faint lines: a
    ripple from input to output is a rising band (002 Sec. 3.4)."""
    x = [depth[n] if depth is not None else k for k, n in enumerate(ripple.layers)]
    fig, ax = plt.subplots(figsize=(10, 4))
    for step in ripple.steps:
        ax.axhline(step, color="0.9", linewidth=0.8, zorder=0)
    intervals = ripple.intervals()
    if intervals is not None:
        ax.errorbar(x, ripple.times, yerr=[[t - lo for t, (lo, _) in zip(ripple.times, intervals)],
                                           [hi - t for t, (_, hi) in zip(ripple.times, intervals)]],
                    fmt="none", ecolor="tab:blue", alpha=0.4, label=f"{ripple.level:.0%} bootstrap interval")
    ax.plot(x, ripple.times, "o", color="tab:blue", markersize=3, label=f"{ripple.fraction:.0%} of the way down")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("layer (depth)")
    ax.set_ylabel("step (minibatches)")
    ax.set_title(title or f"the step at which each layer was {ripple.fraction:.0%} of the way from its first to "
                          f"its last error (Spearman with depth {ripple.rho:.2f})", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_seed_spread(curves: Mapping[str, Mapping[str, Sequence[float]]], ses: Mapping[str, Mapping[str, float]],
                     path: str | Path, *, chance: float, model: Sequence[float] | None = None,
                     ylabel: str = "probe error", title: str = "") -> Path:
    """Probe error per layer over several seeds: per curve (label -> layer -> one error per seed) the mean as a line,
    the seeds' min-max as a band, each seed as a dot and error bars of two single-seed standard errors (``ses``,
    label -> layer) around the mean, so a band wider than the bars is a spread beyond one test set's noise; the
    model's own error (one per seed) as a green line over its own min-max band.

    The y axis is the absolute scale every figure shares, 0 to the chance level (dotted), whatever the data."""
    error_norm(chance)  # validates chance
    names = list(next(iter(curves.values())))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4))
    x = list(range(len(names)))
    top = float(chance)
    for k, (label, layers) in enumerate(curves.items()):
        colour = f"C{k}"
        values = [list(layers[n]) for n in names]
        means = [sum(v) / len(v) for v in values]
        lo, hi = [min(v) for v in values], [max(v) for v in values]
        ax.fill_between(x, lo, hi, color=colour, alpha=0.2, linewidth=0)
        ax.errorbar(x, means, yerr=[2 * ses[label][n] for n in names], color=colour, marker="o", markersize=4,
                    capsize=2, elinewidth=0.8, label=f"{label}: mean over {len(values[0])} seeds, min-max band, 2 SE")
        for i, v in enumerate(values):
            ax.plot([i] * len(v), v, linestyle="none", marker=".", markersize=3, color=colour, alpha=0.7)
        top = max(top, *hi)
    if model:
        mean = sum(model) / len(model)
        ax.axhspan(min(model), max(model), color="green", alpha=0.15, linewidth=0)
        ax.axhline(mean, color="green", linewidth=1, label=f"the model itself (mean {mean:.1%}, min-max band)")
    ax.axhline(chance, linestyle=":", color="black", label=f"chance ({chance:.2f})")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05 * top)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, path)
