"""The paper's diode notation (001 Appendix A): a model's layers in execution order, a probe on each tap.

Each probed layer sends its features up (or, on an auxiliary branch, down) to a probe through a
diode, the one-way valve of electronics: features flow into the probe, no gradient flows back.
Given errors, each probe is coloured red (chance, useless) -> yellow -> green -> blue (0), as in 001 Fig. 5/9,
on the one scale every figure shares (``linprobe.report.plots.error_norm``).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, Polygon, Rectangle
from torch import nn

from linprobe.capture.taps import layer_names
from linprobe.report.plots import ERROR_CMAP, error_norm, probe_colour, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GAP = "..."  # a name standing for layers left out of the picture; drawn as an ellipsis, never probed

_DX = 1.25  # distance between neighbouring layers
_BOX_W, _BOX_H = 0.7, 2.6
_PROBE_R = 0.46
_STEM = 2.0  # length of the wire from a layer to its probe
_BRANCH_DROP = 5.2  # how far below the main path an auxiliary branch runs
_ARC = 0.35  # how far a skip's arc bends, as arc3's rad
_BRANCH_FILL = "#fdd0a2"  # light orange: 002 Fig. 6 draws what is added to help training in orange


def draw_model(names: Sequence[str], path: str | Path, *, errors: Mapping[str, float] | None = None,
               probed: Collection[str] | None = None, branches: Mapping[str, Sequence[str]] | None = None,
               skips: Mapping[str, str] | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
               chance: float | None = None, title: str = "") -> Path:
    """Draw ``names`` (the main path, in execution order; ``GAP`` for left-out layers) as boxes with a
    probe behind a diode on every ``probed`` layer (default: all), and save a PNG to ``path``.

    ``branches`` maps a main-path layer to the layers of an auxiliary branch leaving it (drawn below, in orange
    as 002 Fig. 6 draws the components added to help training), ``skips`` a layer to a later one it also feeds
    (an arc below the path), ``shapes`` a layer to its output shape (printed in the box). ``errors`` colours
    probes on one absolute scale from 0 (blue) to ``chance`` (red: no better than a guess), the same in every
    diagram and heatmap, so ``chance`` is required with them. :func:`model_figure` gives the figure unsaved.
    """
    return save_figure(model_figure(names, errors=errors, probed=probed, branches=branches, skips=skips,
                                    shapes=shapes, chance=chance, title=title), path)


def model_figure(names: Sequence[str], *, errors: Mapping[str, float] | None = None,
                 probed: Collection[str] | None = None, branches: Mapping[str, Sequence[str]] | None = None,
                 skips: Mapping[str, str] | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
                 chance: float | None = None, title: str = "") -> Figure:
    """The figure :func:`draw_model` saves (same arguments, no path): each probe a circle whose ``gid`` is its
    layer's name, so :func:`probe_colours` can read back what was drawn."""
    branches, skips, shapes = {k: list(v) for k, v in (branches or {}).items()}, skips or {}, shapes or {}
    layers = _check_layout(names, branches)
    probed = set(layers) if probed is None else set(probed)
    _check_known("probed", probed, layers)
    _check_known("shapes", shapes, layers)
    _check_known("skips", {*skips, *skips.values()}, layers)
    errors = _check_errors(errors or {}, probed)
    if errors and chance is None:
        raise ValueError("errors need chance= (the error of a guess, e.g. result.chance_error): probes are coloured "
                         "on the scale 0 to chance")

    positions = _positions(names, branches)
    fig_w = max(6.0, 0.55 * (max(x for x, _ in positions.values()) + 2 * _DX))
    fig, ax = plt.subplots(figsize=(fig_w, 7.5 if branches else 4.8))
    _draw_path(ax, names, 0.0, 0.0, shapes)
    for point, branch in branches.items():
        _draw_path(ax, branch, *positions[branch[0]], shapes, branch_from=positions[point])
    for src, dst in skips.items():
        _draw_skip(ax, positions[src], positions[dst])
    for name in (n for n in layers if n in probed):
        x, y = positions[name]
        up = y == 0  # main-path probes above the path, branch probes below their branch
        color = probe_colour(errors[name], cast(float, chance)) if name in errors else "white"  # set with errors
        _draw_probe(ax, x, y, up=up, color=color, label=f"{errors[name]:.1%}" if name in errors else "p", name=name)
    if errors:
        sm = plt.cm.ScalarMappable(norm=error_norm(cast(float, chance)), cmap=ERROR_CMAP)  # checked above
        fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.01, shrink=0.6,
                     label=f"probe error: 0 (blue) to chance ({chance:.2f}, red) or worse")
    ax.set_title(title or "probes behind diodes: features flow to each probe, no gradient flows back")
    ax.set_aspect("equal")
    _fit_frame(fig, ax, fig_w, positions, skips)
    ax.axis("off")
    return fig


def probe_colours(fig: Figure) -> dict[str, tuple[float, float, float, float]]:
    """Layer name -> RGBA fill of its probe as drawn in ``fig`` (a :func:`model_figure`), in drawing order: what
    a test compares with :func:`linprobe.report.plots.probe_colour` of the errors fed."""
    return {str(p.get_gid()): tuple(p.get_facecolor())  # type: ignore[misc]
            for ax in fig.axes for p in ax.patches if isinstance(p, Circle) and p.get_gid()}


def _fit_frame(fig: Figure, ax: Axes, width: float, positions: Mapping[str, tuple[float, float]],
               skips: Mapping[str, str]) -> None:
    """Frame the drawing (boxes, probes, branches, the deepest skip arc) and make the figure as tall as that frame
    at ``width`` inches (equal aspect) plus room for the title, so a long skip neither squeezes the boxes into a
    strip nor leaves the page empty."""
    xs, ys = [x for x, _ in positions.values()], [y for _, y in positions.values()]
    arcs = [_ARC * abs(positions[b][0] - positions[a][0]) / 2 for a, b in skips.items()]  # a quadratic arc's sag
    top = _BOX_H / 2 + _STEM + 2 * _PROBE_R
    bottom = min(min(ys) - _BOX_H / 2 - (_STEM + 2 * _PROBE_R if min(ys) < 0 else 0.0),
                 -_BOX_H / 2 - max(arcs, default=0.0)) - 0.3
    ax.set_xlim(min(xs) - _DX, max(xs) + _DX)
    ax.set_ylim(bottom, top)
    fig.set_size_inches(width, max(2.5, width * (top - bottom) / (max(xs) - min(xs) + 2 * _DX)) + 1.2)


def model_layers(model: nn.Module, example: object = None) -> list[str]:
    """``"input"`` then the model's top-level submodules, in execution order when ``example`` is given
    (see :func:`linprobe.layer_names`): the boxes of a diagram."""
    return [name for name in layer_names(model, example) if "." not in name]


def elide(names: Sequence[str], keep: Collection[str]) -> list[str]:
    """``names`` with every run of layers not in ``keep`` replaced by one ``GAP`` (to draw a deep model)."""
    _check_known("keep", keep, names)
    out: list[str] = []
    for name in names:
        if name in keep:
            out.append(name)
        elif not out or out[-1] != GAP:
            out.append(GAP)
    return out


def split_layout(layout: Sequence[tuple[str, str]]) -> tuple[list[str], dict[str, list[str]]]:
    """Main path and branches from ``(name, "main" | "aux")`` pairs in execution order, as
    :func:`linprobe.models.inception_layout` gives: an aux layer hangs off the main layer before it."""
    main: list[str] = []
    branches: dict[str, list[str]] = {}
    for name, role in layout:
        if role == "main":
            main.append(name)
        elif role == "aux" and main:
            branches.setdefault(main[-1], []).append(name)
        else:
            raise ValueError(f"layout entry ({name!r}, {role!r}): role must be 'main' or 'aux', "
                             "and an aux layer must follow a main one")
    return main, branches


def _check_layout(names: Sequence[str], branches: Mapping[str, Sequence[str]]) -> list[str]:
    """Every real layer of the picture, after checking that names are non-empty, distinct strings."""
    if isinstance(names, str) or not names:
        raise ValueError("names must be a non-empty sequence of layer names in execution order")
    _check_known("branches", branches, names)
    if any(isinstance(b, str) or not b for b in branches.values()):
        raise ValueError(f"each branch must be a non-empty sequence of layer names, got {dict(branches)}")
    layers = [n for n in names if n != GAP] + [n for branch in branches.values() for n in branch]
    bad = [n for n in layers if not isinstance(n, str) or not n]
    if bad:
        raise ValueError(f"layer names must be non-empty strings, got {bad}")
    dupes = sorted({n for n in layers if layers.count(n) > 1})
    if dupes:
        raise ValueError(f"layer names must be distinct, repeated: {dupes}")
    if GAP in branches or any(GAP in b for b in branches.values()):
        raise ValueError(f"{GAP!r} marks left-out layers of the main path; it cannot start or sit on a branch")
    return layers


def _check_known(what: str, given: Collection[str], known: Collection[str]) -> None:
    unknown = sorted(set(given) - set(known) | ({GAP} & set(given)))
    if unknown:
        raise ValueError(f"{what} names layer(s) {unknown} that are not drawable layers of the diagram; "
                         f"it has: {[n for n in known if n != GAP]}")


def _check_errors(errors: Mapping[str, float], probed: Collection[str]) -> dict[str, float]:
    _check_known("errors", errors, probed)
    bad = {n: e for n, e in errors.items() if not (isinstance(e, (int, float)) and math.isfinite(e) and e >= 0)}
    if bad:
        raise ValueError(f"errors must be finite numbers >= 0, got {bad}")
    return {n: float(e) for n, e in errors.items()}


def _positions(names: Sequence[str], branches: Mapping[str, Sequence[str]]) -> dict[str, tuple[float, float]]:
    """Box centres: the main path along y = 0; a branch starts one step right of its branch point, lower."""
    pos = {name: (i * _DX, 0.0) for i, name in enumerate(names) if name != GAP}
    for point, branch in branches.items():
        x0 = pos[point][0]
        pos.update({name: (x0 + (k + 1) * _DX, -_BRANCH_DROP) for k, name in enumerate(branch)})
    return pos


def _draw_path(ax: Axes, names: Sequence[str], x0: float, y: float, shapes: Mapping[str, Sequence[int]], *,
               branch_from: tuple[float, float] | None = None) -> None:
    """Boxes from ``x0`` rightwards at height ``y``, joined by arrows (dotted around a ``GAP``); a branch
    first drops from the box at ``branch_from``."""
    xs = [x0 + i * _DX for i in range(len(names))]
    if branch_from is not None:
        ax.plot([branch_from[0]] * 2, [branch_from[1] - _BOX_H / 2, y], color="black", lw=1)
        _arrow(ax, (branch_from[0], y), (xs[0] - _BOX_W / 2, y))
    for x, name in zip(xs, names):
        if name == GAP:
            ax.text(x, y, "\u22ef", ha="center", va="center", fontsize=14)
            continue
        ax.add_patch(Rectangle((x - _BOX_W / 2, y - _BOX_H / 2), _BOX_W, _BOX_H, edgecolor="black", lw=1,
                               facecolor="#eeeeee" if branch_from is None else _BRANCH_FILL))
        label = name if name not in shapes else f"{name}\n{'x'.join(map(str, shapes[name]))}"
        ax.text(x, y, label, rotation=90, ha="center", va="center", fontsize=6.5)
    for (xa, a), (xb, b) in zip(zip(xs, names), zip(xs[1:], names[1:])):
        half_a, half_b = (0.3 if n == GAP else _BOX_W / 2 for n in (a, b))
        _arrow(ax, (xa + half_a, y), (xb - half_b, y), dotted=GAP in (a, b))


def _arrow(ax: Axes, a: tuple[float, float], b: tuple[float, float], *, dotted: bool = False) -> None:
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=8, lw=1, color="black",
                                 linestyle=":" if dotted else "-", shrinkA=0, shrinkB=0))


def _draw_skip(ax: Axes, a: tuple[float, float], b: tuple[float, float]) -> None:
    """A skip connection: an arc under the main path from one box to a later one."""
    ax.add_patch(FancyArrowPatch((a[0], a[1] - _BOX_H / 2), (b[0], b[1] - _BOX_H / 2), arrowstyle="-|>",
                                 mutation_scale=10, lw=1.2, color="tab:purple",
                                 connectionstyle=f"arc3,rad={_ARC if b[0] > a[0] else -_ARC}"))


def _draw_probe(ax: Axes, x: float, y: float, *, up: bool, color: object, label: str, name: str) -> None:
    """A wire from the box to the probe with a diode on it (triangle pointing to the probe, then a bar); the
    probe's circle carries the layer's ``name`` as its gid."""
    sign = 1 if up else -1
    y0 = y + sign * _BOX_H / 2
    y1 = y0 + sign * _STEM
    ax.plot([x, x], [y0, y1 - sign * _PROBE_R], color="black", lw=1)
    mid, half = (y0 + y1) / 2, 0.22
    ax.add_patch(Polygon([(x - half, mid - sign * half), (x + half, mid - sign * half), (x, mid + sign * half)],
                         closed=True, facecolor="black", edgecolor="black"))
    ax.plot([x - half, x + half], [mid + sign * half] * 2, color="black", lw=1.6)
    ax.add_patch(Circle((x, y1), _PROBE_R, facecolor=color, edgecolor="black", lw=1, gid=name))
    ax.text(x, y1, label, ha="center", va="center", fontsize=5.5)
