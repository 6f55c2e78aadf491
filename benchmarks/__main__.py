"""Run the benchmark suite: ``python -m benchmarks [--quick] [--only NAME ...] [--out FILE] [--threads N]``.

Every workload runs its contenders in this process (or fresh ones it starts, for peak memory) on the same
data and reports ratios; the Markdown table goes to stdout and, with ``--out``, to a file.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from benchmarks.timing import Row, markdown

WORKLOADS = ("live_cost", "finished_model", "cache_rates", "scaling", "solver_floor", "resnet_memory", "fashion_pixels")


def machine() -> str:
    """A one-line description of where the numbers come from."""
    load = os.getloadavg()[0]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f} at start, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes, under a minute: a smoke test, not a measurement")
    p.add_argument("--only", action="append", choices=WORKLOADS, help="run only this workload (repeatable)")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # fresh processes started by a workload inherit it
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy's and scikit-learn's BLAS / OpenMP too
    header = f"{'quick run (smoke test)' if args.quick else 'full run'} on {machine()}"
    print(header, flush=True)
    rows: list[Row] = []
    details = []
    for name in args.only or WORKLOADS:
        start = time.perf_counter()
        found, detail = importlib.import_module(f"benchmarks.{name}").run(args.quick)
        rows += found
        details += [detail] if detail else []
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        report = "\n\n".join([header, markdown(rows), *details]) + "\n"
        if args.out:  # after every workload, so a long run keeps what it has measured
            args.out.write_text(report)
    print(report)
    return rows


if __name__ == "__main__":
    main()
