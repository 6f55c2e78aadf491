"""Scaling: how ``lp.probe``'s time and peak memory grow with samples N, with taps, and with checkpoints.

* N: each size in a fresh process, the convnet on Fashion-MNIST with per-channel pooling of the conv layers
  (features at most 784 wide) and one L2; peak (anonymous) memory is counted from after the data are loaded, for
  the whole call and for the fit alone (a second fresh process on the same cache). Extraction streams batch by batch
  to disk; the fit reads each standardised layer through a memory-mapped scratch file: neither holds a layer.
* taps: the deep MLP with 1 to all 129 taps.
* checkpoints: ``linprobe.sweep`` over K checkpoints of the convnet sharing one folder; the
  slope per checkpoint against one extraction pass of every split.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import linprobe as lp
from benchmarks.fixtures import Case, convnet, fashion, mlp, train
from benchmarks.timing import PeakMemory, Row, in_fresh_process, seconds
from linprobe.models import MNIST_CONVNET_PROBES, mnist_convnet

POOL_CONVS = {name: "pool" for name in MNIST_CONVNET_PROBES if name.startswith("conv")}  # per-channel averages
FIT = {"reduce": POOL_CONVS, "l2_path": (1e-3,), "max_iter": 100}


def probe_at(n: int, cache_dir: str) -> dict[str, float]:
    """In a fresh process: seconds and peak memory (MiB above the loaded data) of probing the convnet on N samples
    (only the fit when ``cache_dir`` already holds the features)."""
    case = convnet(fashion(n, min(n // 10, 5000), 100), train_steps=0)
    with PeakMemory() as memory:
        result, t = seconds(lambda: lp.probe(case.model, case.splits["train"], case.splits["valid"],
                                             layers=case.layers, cache_dir=cache_dir, progress=False, plot=False,
                                             **FIT))
    widths = [layer.features_out for layer in result.layers]
    return {"seconds": t, "peak_mb": memory.peak_mb, "widest_mb": n * max(widths) * 4 / 2**20,
            "all_layers_mb": n * sum(widths) * 4 / 2**20}


def with_n(sizes: list[int], fit_alone: bool = True) -> list[Row]:
    """Each N in a fresh process, then (``fit_alone``) again in another on the same cache: the fit's own peak
    memory."""
    runs, fits = {}, {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            runs[n] = in_fresh_process("benchmarks.scaling:probe_at", n=n, cache_dir=tmp)
            if fit_alone:
                fits[n] = in_fresh_process("benchmarks.scaling:probe_at", n=n, cache_dir=tmp)
    first = runs[sizes[0]]
    rows = []
    for n, r in runs.items():
        label = f"convnet, pooled, N={n}"
        rows += [Row("4 scaling", label, "time", r["seconds"], "s", r["seconds"] / first["seconds"],
                     f"N={sizes[0]} (N ratio {n / sizes[0]:.0f})"),
                 Row("4 scaling", label, "peak memory above data", r["peak_mb"], "MiB", r["peak_mb"] / first["peak_mb"],
                     f"N={sizes[0]}", f"one layer {r['widest_mb']:.0f} MiB, all {r['all_layers_mb']:.0f} MiB")]
        if fit_alone:
            rows.append(Row("4 scaling", label, "peak memory, the fit alone (features cached)", fits[n]["peak_mb"],
                            "MiB", fits[n]["peak_mb"] / fits[sizes[0]]["peak_mb"], f"N={sizes[0]}"))
    return rows


def with_taps(case: Case, counts: list[int]) -> list[Row]:
    rows, base = [], None
    for k in counts:
        layers = [case.layers[i] for i in np.linspace(0, len(case.layers) - 1, k).round().astype(int)]
        with tempfile.TemporaryDirectory() as tmp:
            t = seconds(lambda: lp.probe(case.model, case.splits["train"], case.splits["valid"], layers=layers,
                                         cache_dir=tmp, progress=False, plot=False))[1]
        base = base or t
        rows.append(Row("4 scaling", f"{case.name}, {k} taps", "time", t, "s", t / base, f"{counts[0]} tap(s)"))
    return rows


def with_checkpoints(case: Case, count: int) -> list[Row]:
    """Sweep ``count`` checkpoints (10 training steps apart) one at a time into one folder: cumulative times."""
    from linprobe.training.sweeps import sweep

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for step in range(count):
            files.append((step, Path(tmp) / f"step{step}.pt"))
            torch.save(case.model.state_dict(), files[-1][1])
            train(case, 10)
        times = np.cumsum([seconds(lambda: sweep(lambda: mnist_convnet(seed=0), files[:k], case.splits["train"],
                                                 case.splits["valid"], out=Path(tmp) / "sweep", layers=case.layers,
                                                 figures=False, progress=False, **FIT))[1] for k in range(1, count + 1)])
        one = lp.probe(case.model, case.splits["train"], case.splits["valid"], layers=case.layers,
                       cache_dir=Path(tmp) / "one", progress=False, plot=False, **FIT)
    extraction = sum(len(case.splits[s]) / r for s, r in one.meta["extraction_samples_per_s"].items())
    slope = float(np.polyfit(np.arange(1, count + 1), times, 1)[0])
    label = f"convnet, pooled, N={len(case.splits['train'])}"
    rows = [Row("4 scaling", f"{label}, {k} checkpoints", "sweep time", t, "s", t / times[0], "1 checkpoint")
            for k, t in enumerate(times, 1)]
    return rows + [Row("4 scaling", label, "sweep: seconds per added checkpoint", slope, "s", slope / extraction,
                       "one extraction pass", "<= 1.3x", slope / extraction <= 1.3)]


def run(quick: bool) -> tuple[list[Row], str]:
    sizes = [200, 400] if quick else [10000, 30000, 60000]
    taps = mlp(depth=8 if quick else 128, limit=200 if quick else None, train_steps=0)
    counts = [1, 3] if quick else [1, 129]
    checkpoints = convnet(fashion(300 if quick else 5000, 100 if quick else 1000, 100), train_steps=0)
    rows = with_n(sizes, fit_alone=not quick) + with_taps(taps, counts)
    return rows + with_checkpoints(checkpoints, 2 if quick else 4), ""
