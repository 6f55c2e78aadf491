"""``report.html``: one self-contained page per run folder (figures embedded, no network), built with a Jinja2
template from the saved results, so ``linprobe report RUN_DIR`` can rebuild it at any time."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from linprobe.atomic import atomic_write_text
from linprobe.fit.evaluate import LEVEL
from linprobe.report.results import MAIN, ProbeResult, Row, format_value

REPORT = "report.html"
_FIGURES = {"errors.png": "Error per layer", "heatmap.png": "Error per layer and step",
            "animation.gif": "Error per layer over training", "diagram.png": "The probed model (diode diagram)"}
_MIME = {".png": "image/png", ".gif": "image/gif"}
_SPLITS = ("train", "valid", "test")
_LABELS = {"top1_error": "top-1", "r2": "R^2"}


def write_report(folder: str | Path, result: ProbeResult | None = None) -> Path:
    """Write ``folder/report.html`` from ``result`` (default: the folder's ``results.json``) and the figures and
    ``diagnostics.md`` found in the folder; returns its path."""
    folder = Path(folder)
    if result is None:
        path = folder / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no results.json: pass a folder written by linprobe probe, sweep "
                                    "or a Monitor's save_timeline")
        result = ProbeResult.load(folder)
    import jinja2  # only a report needs it

    environment = jinja2.Environment(loader=jinja2.PackageLoader("linprobe.report", "templates"),
                                     autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    page = environment.get_template(REPORT).render(**_context(folder, result))
    atomic_write_text(folder / REPORT, page)
    return folder / REPORT


def _context(folder: Path, result: ProbeResult) -> dict[str, Any]:
    """What the template shows: the last step's per-layer table of every task, warnings, figures, diagnostics,
    provenance."""
    step = result.steps[-1] if result.rows else 0
    invalid = result.meta.get("invalid", {})
    tasks = [_section(result, task, step, invalid) for task in (result.tasks or [MAIN])]
    meta = result.meta
    warnings = [f"{layer}: not converged ({why}); its errors are an unfinished fit's"
                for layer, why in meta.get("not_converged", {}).items()]
    warnings += [f"{layer}: invalid ({why}); no probe" for layer, why in invalid.items()]
    warnings += [f"{layer}: the probe overfits ({why}); fewer features or more samples narrow the gap"
                 for layer, why in meta.get("overfit", {}).items()]
    diagnostics = folder / "diagnostics.md"
    return {"title": meta.get("model", folder.name), "layers": result.layers, "steps": result.steps, "step": step,
            "chance": result.chance_error if result.layers else float("nan"), "tasks": tasks,
            "heatmap": _heatmap(result) if len(result.steps) > 1 else None,
            "warnings": warnings, "figures": _figures(folder), "skipped": meta.get("skipped", {}),
            "diagnostics": diagnostics.read_text() if diagnostics.is_file() else "",
            "provenance": json.dumps(meta.get("provenance", {}), indent=1) or "{}"}


def _section(result: ProbeResult, task: str, step: int, invalid: dict[str, str]) -> dict[str, Any]:
    """One task's table: its headline metric per split (top-1 error, or R^2 for regression) with its interval as a
    tooltip, the train/valid gap, chance, and a baseline task's selectivity."""
    about = result.meta.get("tasks", {}).get(task, {"kind": "classes"})
    mine = {(r.layer, r.split, r.metric): r for r in result.rows if r.step == step and r.task == task}
    metric = "r2" if about["kind"] == "values" else "top1_error"
    splits = [s for s in _SPLITS if any(key[1:] == (s, metric) for key in mine)]
    columns = [(f"{s} {_LABELS[metric]}", s, metric) for s in splits]
    gap = {"train", "valid"} <= set(splits)
    if "baseline_of" in about:
        columns += [(f"{s} selectivity", s, "selectivity") for s in splits if s != "train"]
    labels = [label for label, _, _ in columns] + (["gap"] if gap else []) + (["chance"] if metric != "r2" else [])
    chance = about.get("chance_error", result.chance_error if result.layers else None)
    rows = []
    for info in result.layers:
        cells = [_cell(mine.get((info.name, s, m))) for _, s, m in columns]
        if gap:
            train, valid = mine.get((info.name, "train", metric)), mine.get((info.name, "valid", metric))
            cells.append({"text": "-" if train is None or valid is None else f"{valid.value - train.value:.4f}",
                          "split": None})
        if metric != "r2":
            cells.append({"text": "-" if chance is None else f"{chance:.3f}", "split": None})
        l2 = mine.get((info.name, "valid", "l2"))
        facts = info.cells()
        rows.append({"name": info.name, "shape": facts["shape"], "features": facts["features"],
                     "reduction": facts["reduction"], "l2": "-" if l2 is None else f"{l2.value:.0e}",
                     "invalid": invalid.get(info.name), "cells": cells})
    title = "Per layer" if task == MAIN else f"Task {task}"
    if "baseline_of" in about:
        title += f" (baseline of {about['baseline_of']}: selectivity = its error - {about['baseline_of']}'s)"
    return {"name": task, "title": title, "labels": labels, "rows": rows,
            "note": "R^2 per split (1 is perfect, 0 is the training mean); gap: valid minus train" if metric == "r2"
            else "Errors are fractions; gap: valid minus train top-1 error (a large gap: the probe overfits)"}


def _heatmap(result: ProbeResult, split: str = "valid") -> dict[str, Any]:
    """The main task's top-1 error per layer (rows) and step (columns) as coloured cells, on the figures' absolute
    scale (0 blue to chance red), each with its number and interval as a tooltip."""
    from matplotlib.colors import to_hex

    from linprobe.report.plots import probe_colour  # matplotlib only when a report has steps

    chance = result.chance_error or 1.0
    found = {(r.layer, r.step): r for r in result.rows if (r.task, r.split, r.metric) == (MAIN, split, "top1_error")}
    rows = []
    for info in result.layers:
        cells = []
        for step in result.steps:
            row = found.get((info.name, step))
            cell = _cell(row)
            cell["colour"] = "#ffffff" if row is None else to_hex(probe_colour(row.value, chance))
            cell["title"] = f"step {step}: {cell['text']}" + (f"; {cell['title']}" if cell.get("title") else "")
            cells.append(cell)
        rows.append({"name": info.name, "cells": cells})
    return {"split": split, "steps": result.steps, "rows": rows}


def _cell(row: Row | None) -> dict[str, Any]:
    """A table cell for one number: its text, what it is, its raw value and its interval as a tooltip."""
    if row is None:
        return {"text": "-", "split": None}
    title = "" if row.lo is None else f"{int(LEVEL * 100)}% interval {row.lo:.4f} to {row.hi:.4f}"
    return {"text": f"{row.value:.4f}", "split": row.split, "metric": row.metric, "raw": format_value(row.value),
            "title": title}


def _figures(folder: Path) -> list[dict[str, str]]:
    """The folder's figures, embedded: the known ones first, then any other PNG."""
    found = [folder / name for name in _FIGURES if (folder / name).is_file()]
    found += sorted(p for p in folder.glob("*.png") if p.name not in _FIGURES)
    return [{"title": _FIGURES.get(p.name, p.stem.replace("_", " ")), "mime": _MIME[p.suffix],
             "data": base64.b64encode(p.read_bytes()).decode()} for p in found]
