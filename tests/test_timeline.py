"""save_timeline: the heatmap, an animation with one frame per step, diagnostics and the coloured diagram."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from linprobe.report.animate import animate_errors
from linprobe.report.plots import ERROR_CMAP, error_norm, plot_heatmap, probe_colour
from linprobe.report.timeline import save_timeline
from tests.test_diagnose import CHANCE, table

SKIP_LIKE = {0: [0.1, 0.5, 0.6, 0.7, 0.8, 0.3, 0.5, 0.6],
             100: [0.1, 0.5, 0.65, 0.75, 0.85, 0.2, 0.3, 0.4],
             200: [0.1, 0.5, 0.65, 0.8, 0.88, 0.1, 0.1, 0.1]}


def test_timeline_writes_every_file_and_names_the_dead_segment(tmp_path: Path) -> None:
    result = table(SKIP_LIKE)
    files = save_timeline(result, tmp_path, model_names=["input", "l1", "l2", "l3", "l4", "l5", "l6", "l7"])
    assert {"heatmap", "animation", "diagnostics", "diagram"} <= set(files)
    for path in files.values():
        assert path.parent == tmp_path and path.stat().st_size > 0
    with Image.open(files["animation"]) as gif:
        assert gif.n_frames == 3
    with Image.open(files["heatmap"]) as png:
        assert png.format == "PNG"
    text = files["diagnostics"].read_text()
    assert "dead segment: l1-l4 (4 layers)" in text and "steps 100, 200" in text
    assert not list(tmp_path.glob(".*tmp*"))  # temporary files renamed away


def test_timeline_refuses_a_metric_the_table_lacks_and_an_unmeasured_diagram_step(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no .online_top1_error."):
        save_timeline(table(SKIP_LIKE), tmp_path, metric="online_top1_error")
    with pytest.raises(ValueError, match="diagram_step=50 was not measured"):
        save_timeline(table(SKIP_LIKE), tmp_path, model_names=["input", "l1"], diagram_step=50)


def test_animation_frames_follow_the_steps_and_colour_bad_layers_red(tmp_path: Path) -> None:
    result = table({step: [0.05 if step < 2 else 0.9] * 3 for step in range(4)})
    [gif] = animate_errors(result, tmp_path / "movie", mp4=False)
    assert gif.name == "movie.gif"
    with Image.open(gif) as image:
        assert image.n_frames == 4
        image.seek(3)
        colours = image.convert("RGB").getcolors(1 << 16)
    red = tuple(round(255 * c) for c in probe_colour(0.9, CHANCE)[:3])  # at chance: the scale's red end
    assert any(sum(abs(a - b) for a, b in zip(rgb, red)) < 30 for _, rgb in colours)


def test_a_layer_missing_at_some_step_is_blank_not_an_error(tmp_path: Path) -> None:
    result = table(SKIP_LIKE)
    result.rows = [r for r in result.rows if not (r.layer == "l2" and r.step == 100)]
    files = save_timeline(result, tmp_path)
    with Image.open(files["animation"]) as gif:
        assert gif.n_frames == 3
    assert "dead segment: l1-l4 (3 layers)" in files["diagnostics"].read_text()  # l2 left out of the diagnosis


def test_one_colour_scale_from_0_to_chance_everywhere() -> None:
    assert probe_colour(0.45, 0.9) == ERROR_CMAP(0.5)  # half of chance: the middle of the scale
    assert probe_colour(0.9, 0.9) == probe_colour(0.95, 0.9) == ERROR_CMAP(1.0)  # chance or worse: red
    assert probe_colour(0.0, 0.5) == ERROR_CMAP(0.0)
    assert probe_colour(0.12, 0.9) != probe_colour(0.45, 0.9)  # absolute: 12% never shows as 'useless'
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="chance"):
            error_norm(bad)


@pytest.mark.parametrize("steps, uneven", [((0, 500, 5000), True), ((0, 10, 20, 30), False)])
def test_heatmap_colours_0_to_chance_and_says_when_rows_are_unevenly_spaced(steps: tuple[int, ...],
                                                                            uneven: bool) -> None:
    result = table({s: [0.1, 0.5, 0.6] for s in steps})
    fig = plot_heatmap(result, split="valid")
    ax = fig.axes[0]
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vmax) == (0.0, CHANCE)
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(s) for s in steps]  # each row its actual step
    assert ("not evenly spaced" in ax.get_ylabel()) is uneven
