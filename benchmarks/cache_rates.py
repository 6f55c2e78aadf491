"""Cache: samples/s of extraction (model forward + reduction + write) against reading the cache back.

Extraction is ``lp.probe``'s own measurement (``meta["extraction_samples_per_s"]``, one forward per
batch feeding every tap). Reading is timed here on the finished cache: a probe epoch reads one layer's
train features (the median over layers is reported), and reading every layer of a sample is shown too.
The paper (App. B) saw 100 samples/s extracting against 6,000 reading, 60x.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np

import linprobe as lp
from benchmarks.fixtures import Case, convnet, fashion, mlp
from benchmarks.timing import Row, seconds
from linprobe.capture.cache import FeatureCache

TARGET = 50.0


def read_seconds(cache: FeatureCache, layer: str) -> float:
    """Seconds to read one layer's train features into a float32 array and touch every value."""
    return seconds(lambda: np.asarray(cache.features("train", layer, verify=False), dtype=np.float32).sum())[1]


def measure(case: Case, reduce: str) -> list[Row]:
    """Extract the train split into a fresh cache, then read it back (a first pass warms and verifies it)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = lp.probe(case.model, case.splits["train"], case.splits["valid"], layers=case.layers, cache_dir=tmp,
                          reduce=reduce, l2_path=(1.0,), max_iter=1, progress=False, plot=False)
        extract = result.meta["extraction_samples_per_s"]["train"]
        root = Path(result.meta["cache"])
        cache = FeatureCache(root, root.name)
        for layer in case.layers:
            cache.features("train", layer)  # verifies checksums once
        per_layer = {layer: read_seconds(cache, layer) for layer in case.layers}
    n = len(case.splits["train"])
    epoch, everything = n / statistics.median(per_layer.values()), n / sum(per_layer.values())
    label = f"{case.name} ({len(case.layers)} taps, reduce {reduce}, N={n})"
    return [Row("3 cache", label, "extraction", extract, "samples/s", 1.0, "extraction"),
            Row("3 cache", label, "read, one probe epoch (median layer)", epoch, "samples/s", epoch / extract,
                "extraction", f">= {TARGET:.0f}x", epoch / extract >= TARGET),
            Row("3 cache", label, "read, every layer of a sample", everything, "samples/s", everything / extract,
                "extraction")]


def run(quick: bool) -> tuple[list[Row], str]:
    n = 200 if quick else 10000
    cases = [(convnet(fashion(n, 100, 100), train_steps=0), "auto"),
             (mlp(depth=16 if quick else 128, limit=n, train_steps=0), "auto")]
    return [r for case, reduce in cases for r in measure(case, reduce)], ""
