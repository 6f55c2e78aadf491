"""The paper's experiments, one module each, built only on linprobe's public API.

Each module has a docstring whose first line names the experiment and a function
``run(out, *, quick, data, seed, progress, **options) -> Summary`` that writes the tidy results
(``results.csv``/``results.json``), the figures (PNG) and ``summary.md`` into ``out``.
"""
from __future__ import annotations

import importlib
import inspect
import time
from pathlib import Path
from typing import Any

import torch

from linprobe.experiments.report import Summary
from linprobe.experiments.seeds import over_seeds
from linprobe.report.html import write_report

EXPERIMENTS: dict[str, str] = {
    "toy": "linprobe.experiments.toy",
    "mnist-convnet": "linprobe.experiments.mnist_convnet",
    "deep-mlp": "linprobe.experiments.deep_mlp",
    "ripple": "linprobe.experiments.ripple",
    "depth": "linprobe.experiments.depth",
    "resnet": "linprobe.experiments.resnet",
    "inception": "linprobe.experiments.inception",
    "diagram": "linprobe.experiments.diagram",
    "reductions": "linprobe.experiments.reductions",
}


def available() -> dict[str, str]:
    """Name -> one-line description of every experiment whose module exists."""
    out = {}
    for name, module in EXPERIMENTS.items():
        try:
            out[name] = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]
        except ModuleNotFoundError:
            continue
    return out


def reproduce(name: str, out: str | Path, *, quick: bool = False, data: str | None = None, seed: int = 0,
              progress: bool = True, seeds: int | None = None, **options: Any) -> Summary:
    """Run one experiment into ``out`` and return its summary (also written as ``out/summary.md``).

    The global random generator (dropout, anything that draws without its own generator) is seeded with
    ``seed`` for the run and the caller's state restored afterwards: the same seed and settings give the same
    bits whatever the global state.

    ``seeds=k`` runs the seeds ``seed .. seed + k - 1`` into ``out/seed-K/`` (each exactly the single run
    ``reproduce(name, out/seed-K, seed=K, ...)`` with the same options) and writes their combination into ``out``:
    the spread per layer, ``seeds.png`` and a verdict over seeds (:mod:`linprobe.experiments.seeds`). A full run of
    an experiment whose ``run`` takes ``multi_seed`` gets ``multi_seed=True`` unless the options say otherwise:
    its lighter full setting, sized to run several seeds."""
    names = available()
    if name not in names:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(names)}")
    run = importlib.import_module(EXPERIMENTS[name]).run
    accepted = set(inspect.signature(run).parameters)
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"experiment {name!r} takes no option(s) {sorted(unknown)}; it accepts "
                         f"{sorted(accepted - {'out', 'quick', 'data', 'seed', 'progress'}) or 'none'}")
    if seeds is not None:
        if not quick and "multi_seed" in accepted:
            options.setdefault("multi_seed", True)
        return over_seeds(lambda folder, k: reproduce(name, folder, quick=quick, data=data, seed=k, progress=progress,
                                                      **options), Path(out), seeds=seeds, first=seed)
    if data is not None:
        options["data"] = data
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the global generator (dropout, init) seeded, the caller's restored
        torch.manual_seed(seed)
        summary: Summary = run(Path(out), quick=quick, seed=seed, progress=progress, **options)
    summary.seconds = time.perf_counter() - start
    summary.write(Path(out))
    if (Path(out) / "results.json").is_file():
        write_report(out)
    return summary
