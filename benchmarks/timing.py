"""Measuring helpers shared by the workloads: result rows, interleaved medians, peak memory of a fresh process."""
from __future__ import annotations

import importlib
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One measured line of the table. ``ratio`` is ``value`` relative to ``per`` (what the ratio divides by)."""

    workload: str
    case: str
    contender: str
    value: float
    unit: str
    ratio: float
    per: str
    target: str = ""
    met: bool | None = None

    def cells(self) -> list[str]:
        met = "" if self.met is None else ("met" if self.met else "**not met**")
        return [self.workload, self.case, self.contender, f"{self.value:.4g} {self.unit}", f"{self.ratio:.3g}x",
                self.per, f"{self.target} {met}".strip()]


HEADER = ["workload", "case", "contender", "value", "ratio", "ratio of", "target"]


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and its wall time."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def interleaved(contenders: Mapping[str, Callable[[int], Any]], repeats: Mapping[str, int],
                warmup: int = 2) -> dict[str, float]:
    """Median seconds of each ``contender(round)``, run round-robin so that a busy machine slows them alike.

    Contender ``c`` takes part in the first ``repeats[c]`` rounds (slow contenders need fewer).
    """
    for r in range(warmup):
        for fn in contenders.values():
            fn(r)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(max(repeats.values())):
        for name, fn in contenders.items():
            if r < repeats[name]:
                times[name].append(seconds(lambda: fn(warmup + r))[1])
    return {name: statistics.median(t) for name, t in times.items()}


class PeakMemory:
    """Peak anonymous resident memory (MiB) above the start, sampled every few ms while the block runs.

    Anonymous memory leaves out the pages of memory-mapped files (the feature cache), which the OS can drop.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_mb, self._start = interval, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._start = self.peak_mb = anon_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, anon_rss_mb()) - self._start

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, anon_rss_mb())


def anon_rss_mb() -> float:
    """This process's anonymous resident memory (RssAnon) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return math.nan


def in_fresh_process(function: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` (JSON-able arguments and result) in a new Python; its peak memory is its own."""
    code = "import sys; from benchmarks.timing import _child; _child(sys.argv[1], sys.argv[2])"
    done = subprocess.run([sys.executable, "-c", code, function, json.dumps(kwargs)], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"{function} failed in a fresh process:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(function: str, kwargs: str) -> None:
    module, _, name = function.partition(":")
    result = getattr(importlib.import_module(module), name)(**json.loads(kwargs))
    print(json.dumps(result))
