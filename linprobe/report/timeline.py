"""Probes over training in one folder: heatmap, animation, diagnostics and (optionally) the model diagram.

``save_timeline`` takes any ``ProbeResult`` with several steps: a live ``Monitor``'s, exact probes
at checkpoints (``linprobe sweep``), or results concatenated by hand.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from linprobe.atomic import atomic_write_text
from linprobe.report.diagnose import describe, diagnose
from linprobe.report.html import write_report
from linprobe.report.results import ProbeResult


def save_timeline(result: ProbeResult, out: str | Path, *, split: str = "valid", metric: str = "top1_error",
                  model_names: Sequence[str] | None = None, diagram_step: int | None = None) -> dict[str, Path]:
    """Write into ``out``: ``heatmap.png`` (layers x steps), ``animation.gif`` (and ``animation.mp4`` with
    ffmpeg), ``diagnostics.md`` and, given ``model_names`` (the diagram's boxes, as for
    ``linprobe.report.diagram.draw_model``), ``diagram.png`` coloured by the error at ``diagram_step`` (default: the
    last step).

    Returns the files written, keyed by their stem (``"heatmap"``, ``"animation"``, ``"animation_mp4"``,
    ``"diagnostics"``, ``"diagram"``, ``"report"``: ``report.html`` showing them all with the last step's table).
    """
    have = {(r.split, r.metric) for r in result.rows}
    if (split, metric) not in have:
        raise ValueError(f"the result has no {metric!r} on split {split!r}; it has "
                         f"{sorted(have)}: pass split= and metric= from that list")
    step = result.steps[-1] if diagram_step is None else diagram_step
    if step not in result.steps:
        raise ValueError(f"diagram_step={step} was not measured; the result has steps {result.steps}")
    from linprobe.report.animate import animate_errors  # matplotlib, imported when a figure is drawn
    from linprobe.report.diagram import draw_model
    from linprobe.report.plots import plot_heatmap

    out = Path(out)
    files = {"heatmap": plot_heatmap(result, out / "heatmap.png", split=split, metric=metric)}
    movies = animate_errors(result, out / "animation.gif", split=split, metric=metric)
    files.update({"animation" if m.suffix == ".gif" else "animation_mp4": m for m in movies})
    files["diagnostics"] = out / "diagnostics.md"
    atomic_write_text(files["diagnostics"], diagnostics_markdown(result, split=split, metric=metric))
    if model_names is not None:
        errors = result.errors(split, metric, step)
        probed = [n for n in model_names if n in errors]
        files["diagram"] = draw_model(model_names, out / "diagram.png", errors={n: errors[n] for n in probed},
                                      probed=probed, chance=result.chance_error,
                                      title=f"probe {split} {metric} at step {step}")
    files["report"] = write_report(out, result)
    return files


def diagnostics_markdown(result: ProbeResult, *, split: str = "valid", metric: str = "top1_error") -> str:
    """The findings of ``linprobe.report.diagnose`` on ``metric`` / ``split`` as a small markdown page."""
    chance = result.chance_error
    return (f"# Diagnostics\n\nprobe {split} {metric} over {len(result.names)} layers at steps "
            f"{', '.join(map(str, result.steps))} (chance {chance:.1%})\n\n"
            f"{describe(diagnose(result, split=split, metric=metric))}\n")
