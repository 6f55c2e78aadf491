"""``report.html``: one self-contained page per run folder (figures embedded, no network), built with a Jinja2
template from the saved results, so ``linprobe report RUN_DIR`` can rebuild it at any time."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from linprobe.atomic import atomic_write_text
from linprobe.results import ProbeResult, describe_reduction, format_value

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
    have = {(r.layer, r.split, r.metric): r.value for r in result.rows if r.step == step}
    splits = [s for s in _SPLITS if any(k[1] == s and k[2] == "top1_error" for k in have)]
    columns = [{"label": f"{s} top-1", "split": s} for s in splits]
    if {"train", "valid"} <= set(splits):
        columns.append({"label": "gap", "split": None})
    columns.append({"label": "chance", "split": None})
    invalid = result.meta.get("invalid", {})
    rows = []
    for info in result.layers:
        cells = [{"text": _fraction(have.get((info.name, s, "top1_error"))), "split": s, "metric": "top1_error",
                  "raw": format_value(have[(info.name, s, "top1_error")])
                  if (info.name, s, "top1_error") in have else ""}
                 for s in splits]
        if {"train", "valid"} <= set(splits):
            train, valid = have.get((info.name, "train", "top1_error")), have.get((info.name, "valid", "top1_error"))
            cells.append({"text": _fraction(None if train is None or valid is None else valid - train), "split": None})
        cells.append({"text": f"{info.chance_error:.3f}", "split": None})
        rows.append({"name": info.name, "shape": "x".join(map(str, info.shape)),
                     "features": f"{info.features_in}->{info.features_out}", "reduction": describe_reduction(
                         info.reduction), "l2": "-" if info.l2 is None else f"{info.l2:.0e}",
                     "invalid": invalid.get(info.name), "cells": cells})
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
