"""The paper's video: the bar chart of probe error per layer, one frame per measured step.

A GIF is always written (matplotlib's PillowWriter; Pillow comes with matplotlib); an MP4 as well
when matplotlib finds ffmpeg.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.animation import AbstractMovieWriter, FFMpegWriter, FuncAnimation, PillowWriter, writers  # noqa: E402

from linprobe.report.plots import error_grid, probe_colour  # noqa: E402
from linprobe.report.results import ProbeResult  # noqa: E402


def animate_errors(result: ProbeResult, path: str | Path, *, split: str = "valid", metric: str = "top1_error",
                   fps: float = 2.0, mp4: bool = True) -> list[Path]:
    """Write ``path`` as a GIF, one frame per step: a bar per layer coloured red (chance) to blue (0) on the scale
    every figure shares, chance dotted, the legend outside the bars, no bar for a layer not measured at that step.
    With ``mp4`` and ffmpeg available, the same frames go to ``path`` with suffix ``.mp4`` too. Returns the files
    written."""
    path = Path(path).with_suffix(".gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    names, frames = error_grid(result, split, metric)
    chance = result.chance_error
    fig, ax = plt.subplots(figsize=(max(6.0, min(14.0, 0.3 * len(names) + 2)), 4))
    bars = ax.bar(range(len(names)), frames[0], width=0.85)
    ax.axhline(chance, linestyle=":", color="black", label=f"chance ({chance:.2f})")
    every = max(1, len(names) // 24)
    ax.set_xticks(range(0, len(names), every), names[::every], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{split} {metric}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)

    def draw(k: int) -> list[Any]:
        for bar, error in zip(bars, frames[k]):
            bar.set_height(error)
            bar.set_color(probe_colour(error, chance))
        ax.set_title(f"probe {split} {metric} per layer, step {result.steps[k]}")
        return list(bars)

    draw(0)
    fig.tight_layout()
    movie = FuncAnimation(fig, draw, frames=len(frames), blit=False)
    # matplotlib's stubs say fps: int; both writers take a fractional frame rate
    written = [_save(movie, path, PillowWriter(fps=fps))]  # type: ignore[arg-type]
    if mp4 and writers.is_available("ffmpeg"):
        written.append(_save(movie, path.with_suffix(".mp4"), FFMpegWriter(fps=fps)))  # type: ignore[arg-type]
    plt.close(fig)
    return written


def _save(movie: FuncAnimation, path: Path, writer: AbstractMovieWriter) -> Path:
    """Save through a temporary file in the same folder, so no half-written movie is left behind."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    movie.save(tmp, writer=writer)
    tmp.replace(path)
    return path
