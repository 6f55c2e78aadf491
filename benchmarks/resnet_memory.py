"""ResNet memory: peak RSS and wall time of ``lp.probe`` on a randomly initialised ResNet-18 (CIFAR stem, 32x32x3,
10 classes, torchvision's block structure with its in-place ReLUs and residual adds), every layer, one process.

Each run is a fresh process (its peak is its own): random float32 images and labels, train N / valid 500 / test
500, ``layers="all"`` with the default settings (a block's shared ReLU gives a probe per call), one torch thread,
default batch size 256 against 64. The target (issue 13): peak RSS under 2 GiB at the default batch size. ``peak_rss_mib`` is ``ru_maxrss`` (file-backed pages of the memory-mapped feature cache
included); ``above_start_mib`` is that peak less the RSS just before the call (model and data already built);
``anon_above_start_mib`` is the peak anonymous memory above the start (timing.PeakMemory: the cache's pages left
out). ``python -m benchmarks.resnet_memory [--images N] [--batch-size B ...] [--model NAME]`` prints them.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import PeakMemory, Row, in_fresh_process

HELD_OUT = 500  # valid and test images each (fewer when the run is smaller)


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def probe_once(images: int, batch_size: int, model: str = "resnet18", held_out: int = HELD_OUT) -> dict[str, float]:
    """In this (fresh) process: probe ``model`` on ``images`` random train images; peak memory and seconds."""
    import linprobe as lp
    from benchmarks import resnet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = getattr(resnet, model)(10, small_input=True).eval()
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    train, valid, test = split(images), split(held_out), split(held_out)
    with tempfile.TemporaryDirectory() as tmp:
        before = rss_mib()
        start = time.perf_counter()
        with PeakMemory() as anon:
            result = lp.probe(net, train, valid, test=test, layers="all", cache_dir=tmp,
                              batch_size=batch_size, progress=False, plot=False)
        took = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        cache_mib = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
    widths = [layer.features_out for layer in result.layers]
    return {"peak_rss_mib": peak, "above_start_mib": peak - before, "seconds": took,
            "anon_above_start_mib": anon.peak_mb, "rss_before_mib": before, "taps": len(widths),
            "train_features_mib": images * sum(widths) * 4 / 2**20, "widest_layer_mib": images * max(widths) * 4 / 2**20,
            "cache_mib": cache_mib}


def measure(images: int, batch_size: int, model: str = "resnet18") -> dict[str, float]:
    """Probe in a fresh Python process; ``{"peak_rss_mib", "above_start_mib", "seconds", ...}``."""
    return in_fresh_process("benchmarks.resnet_memory:probe_once", images=images, batch_size=batch_size, model=model,
                            held_out=min(HELD_OUT, max(images // 6, 10)))


def run(quick: bool) -> tuple[list[Row], str]:
    """The suite's workload: batch size 256 and 64, each in a fresh process."""
    model, images = ("resnet_tiny", 200) if quick else ("resnet18", 3000)
    runs = {b: measure(images, b, model) for b in (256, 64)}
    rows = []
    for b, r in runs.items():
        label = f"{model} (CIFAR stem), all {r['taps']:.0f} taps, N={images}, batch {b}"
        base = runs[256]
        rows += [Row("6 resnet memory", label, "time", r["seconds"], "s", r["seconds"] / base["seconds"], "batch 256"),
                 Row("6 resnet memory", label, "peak RSS", r["peak_rss_mib"], "MiB",
                     r["peak_rss_mib"] / base["peak_rss_mib"], "batch 256",
                     *(("< 2048 MiB", r["peak_rss_mib"] < 2048) if b == 256 and not quick else ())),
                 Row("6 resnet memory", label, "peak RSS above start", r["above_start_mib"], "MiB",
                     r["above_start_mib"] / r["train_features_mib"], "train features",
                     f"train features {r['train_features_mib']:.0f} MiB, widest layer "
                     f"{r['widest_layer_mib']:.0f} MiB"),
                 Row("6 resnet memory", label, "peak anonymous memory above start", r["anon_above_start_mib"], "MiB",
                     r["anon_above_start_mib"] / r["train_features_mib"], "train features")]
    return rows, ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.resnet_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--batch-size", type=int, action="append", help="repeatable; default 256 and 64")
    p.add_argument("--model", default="resnet18", choices=("resnet18", "resnet50", "resnet_tiny"))
    args = p.parse_args(argv)
    for b in args.batch_size or (256, 64):
        r = measure(args.images, b, args.model)
        print(json.dumps({"model": args.model, "images": args.images, "batch_size": b,
                          **{k: round(v, 1) for k, v in r.items()}}), flush=True)


if __name__ == "__main__":
    main()
