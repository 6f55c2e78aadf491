"""``report.html``: one self-contained page per run folder (figures embedded, no network), built with a Jinja2
template from the saved results, so ``linprobe report RUN_DIR`` can rebuild it at any time."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from linprobe.atomic import atomic_write_text
from linprobe.results import ProbeResult, format_value

REPORT = "report.html"
_FIGURES = {"errors.png": "Error per layer", "heatmap.png": "Error per layer and step",
            "animation.gif": "Error per layer over training", "diagram.png": "The probed model (diode diagram)"}
_MIME = {".png": "image/png", ".gif": "image/gif"}
_SPLITS = ("train", "valid", "test")


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

    environment = jinja2.Environment(loader=jinja2.PackageLoader("linprobe", "templates"),
                                     autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    page = environment.get_template(REPORT).render(**_context(folder, result))
    atomic_write_text(folder / REPORT, page)
    return folder / REPORT


def _context(folder: Path, result: ProbeResult) -> dict[str, Any]:
    """What the template shows: the last step's per-layer table, warnings, figures, diagnostics, provenance."""
    step = result.steps[-1] if result.rows else 0
    splits = [s for s in _SPLITS if any((r.step, r.split, r.metric) == (step, s, "top1_error") for r in result.rows)]
    columns = [{"label": f"{s} top-1", "split": s} for s in splits]
    if {"train", "valid"} <= set(splits):
        columns.append({"label": "gap", "split": None})
    columns.append({"label": "chance", "split": None})
    invalid = result.meta.get("invalid", {})
    errors = {s: result.errors(s, "top1_error", step) for s in splits}
    rows = []
    for info in result.layers:
        found = {s: errors[s].get(info.name) for s in splits}
        cells = [{"text": _fraction(found[s]), "split": s, "metric": "top1_error",
                  "raw": "" if found[s] is None else format_value(found[s])} for s in splits]
        if {"train", "valid"} <= set(splits):
            gap = None if found["train"] is None or found["valid"] is None else found["valid"] - found["train"]
            cells.append({"text": _fraction(gap), "split": None})
        facts = info.cells()
        cells.append({"text": facts.pop("chance"), "split": None})
        rows.append({"name": info.name, **facts, "invalid": invalid.get(info.name), "cells": cells})
    meta = result.meta
    warnings = [f"{layer}: not converged ({why}); its errors are an unfinished fit's"
                for layer, why in meta.get("not_converged", {}).items()]
    warnings += [f"{layer}: invalid ({why}); no probe" for layer, why in invalid.items()]
    diagnostics = folder / "diagnostics.md"
    return {"title": meta.get("model", folder.name), "layers": result.layers, "steps": result.steps, "step": step,
            "chance": result.chance_error if result.layers else float("nan"), "columns": columns, "rows": rows,
            "warnings": warnings, "figures": _figures(folder), "skipped": meta.get("skipped", {}),
            "diagnostics": diagnostics.read_text() if diagnostics.is_file() else "",
            "provenance": json.dumps(meta.get("provenance", {}), indent=1) or "{}"}


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _figures(folder: Path) -> list[dict[str, str]]:
    """The folder's figures, embedded: the known ones first, then any other PNG."""
    found = [folder / name for name in _FIGURES if (folder / name).is_file()]
    found += sorted(p for p in folder.glob("*.png") if p.name not in _FIGURES)
    return [{"title": _FIGURES.get(p.name, p.stem.replace("_", " ")), "mime": _MIME[p.suffix],
             "data": base64.b64encode(p.read_bytes()).decode()} for p in found]
