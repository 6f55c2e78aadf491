"""Cache: samples/s of extraction (forward + reduction + write) against reading the cache back (paper App. B)."""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import linprobe as lp
from linprobe.cache import FeatureCache
from linprobe.finished import _extract_all  # the extraction step alone, timed
from linprobe.models import MNIST_CONVNET_PROBES, mnist_convnet


def measure(limit: int | None, reduce: str) -> dict[str, float]:
    """Extract the ten convnet taps of the MNIST training split, then read every layer back once."""
    train = lp.standard_splits("mnist", limit=limit)["train"]
    model = mnist_convnet(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        with lp.Taps(model, list(MNIST_CONVNET_PROBES)) as taps:
            rate = _extract_all(taps, {"train": train}, FeatureCache(tmp, "bench"), reduce, 8192, 0, "float32", 256,
                                False)["train"]
        cache = FeatureCache(tmp, "bench")
        first, epoch = _read_all(cache), _read_all(cache)  # the first read also verifies every checksum
    return {"samples": len(train), "extract_samples_per_s": rate, "first_read_samples_per_s": len(train) / first,
            "epoch_read_samples_per_s": len(train) / epoch, "epoch_over_extract": (len(train) / epoch) / rate}


def _read_all(cache: FeatureCache) -> float:
    """Seconds to read every layer of the training split into float32 arrays."""
    start = time.perf_counter()
    for layer in cache.manifest["order"]:
        np.asarray(cache.features("train", layer), dtype=np.float32).sum()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--reduce", default="none")
    print(measure(**vars(p.parse_args())))


if __name__ == "__main__":
    main()
