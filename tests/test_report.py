"""report.html: self-contained, its numbers those of results.csv, rendered by a real browser."""
from __future__ import annotations

import csv
import html
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from torch import nn

import linprobe as lp
from linprobe.cli import main
from linprobe.report.html import write_report


class _Cells(HTMLParser):
    """The (task, layer, split, metric) -> raw value cells of the per-layer tables, their tooltips, and every
    src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.task, self.layer, self.cells, self.titles, self.links = "", "", {}, {}, []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and "data-task" in a:
            self.task = a["data-task"] or ""
        if tag == "tr" and "data-layer" in a:
            self.layer = a["data-layer"] or ""
        if tag == "td" and a.get("data-value"):
            key = (self.task, self.layer, a["data-split"], a["data-metric"])
            self.cells[key], self.titles[key] = a["data-value"], a.get("title")
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def _csv_errors(folder: Path) -> dict[tuple[str, str, str, str], str]:
    """The numbers the report shows: top-1 error per split and the control task's selectivity on valid and test."""
    with open(folder / "results.csv") as f:
        return {(r["task"], r["layer"], r["split"], r["metric"]): r["value"] for r in csv.DictReader(f)
                if r["metric"] == "top1_error" or (r["metric"] == "selectivity" and r["split"] != "train")}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    g = np.random.default_rng(0)
    x, y = g.normal(size=(120, 6)).astype(np.float32), np.arange(120) % 3
    x[:, :3] += 2 * np.eye(3)[y]
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    lp.probe(model, (x[:80], y[:80]), (x[80:100], y[80:100]), test=(x[100:], y[100:]), cache_dir=folder,
             l2_path=(1.0, 0.1), progress=False, tasks={"control": lp.control_task()})
    return folder


def test_probe_writes_a_self_contained_report_with_the_tables_numbers(run):
    page = (run / "report.html").read_text()
    cells = _Cells()
    cells.feed(page)
    assert cells.cells == _csv_errors(run) and len(cells.cells) == 4 * (3 + 3 + 2)  # 4 layers; 2 tasks, selectivity
    with open(run / "results.csv") as f:
        lo, hi = next((r["lo"], r["hi"]) for r in csv.DictReader(f) if (r["task"], r["layer"], r["split"],
                                                                          r["metric"]) == ("main", "2", "test",
                                                                                           "top1_error"))
    assert cells.titles[("main", "2", "test", "top1_error")] == f"95% interval {float(lo):.4f} to {float(hi):.4f}"
    assert cells.links and all(link.startswith("data:image/") for link in cells.links)  # nothing to fetch
    assert '"seed": 0' in html.unescape(page) and "Error per layer" in page  # provenance and the figure


def test_report_command_rebuilds_the_same_page(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("features"))
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").read_text() == (run / "report.html").read_text()
    with pytest.raises(FileNotFoundError, match="no results.json"):
        write_report(tmp_path)


def test_report_renders_in_headless_chromium_without_console_errors(run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (`apt-get install chromium`; .ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run([browser, *flags, "--dump-dom", (run / "report.html").as_uri()], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = _Cells()
    cells.feed(done.stdout)  # the DOM as the browser built it
    assert cells.cells == _csv_errors(run)
    assert not re.findall(r"CONSOLE.*(?:Uncaught|Error)", done.stderr)


def test_a_run_with_steps_gets_a_heatmap_whose_cells_carry_their_intervals(run, tmp_path):
    first = lp.ProbeResult.load(run)
    later = lp.ProbeResult.from_dict(first.to_dict())
    for row in later.rows:
        row.step = 500
    both = lp.ProbeResult.concat([first, later])
    page = write_report(tmp_path, both).read_text()
    heat = page[page.index('<table id="heatmap">'):]
    heat = heat[:heat.index("</table>")]
    row = both.row("2", "valid", step=500)
    assert f'title="step 500: {row.value:.4f}; 95% interval {row.lo:.4f} to {row.hi:.4f}"' in heat
    assert heat.count("<tr>") == 1 + len(both.layers) and heat.count('class="heat"') == 2 * len(both.layers)


def test_the_per_layer_figure_draws_each_errors_interval_and_the_other_tasks(run):
    result = lp.ProbeResult.load(run)
    fig = result.plot()
    ax = fig.axes[0]
    bars = next(c for c in ax.containers if type(c).__name__ == "ErrorbarContainer")  # the 95% intervals
    low, high = bars.lines[2][0].get_segments()[1][:, 1]
    row = result.row(result.names[1], "test")
    assert (low, high) == pytest.approx((row.lo, row.hi))
    assert [line.get_label() for line in ax.lines if line.get_label().startswith("control")] == ["control (error)"]
