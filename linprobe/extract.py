"""Feature extraction: one forward pass per batch feeds every tap, reduced and written to the cache."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from linprobe.cache import FeatureCache
from linprobe.data import dataset_length, iter_batches
from linprobe.reduce import Reduction
from linprobe.taps import Taps


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(x: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors inside a tuple, list or dict, to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def reduce_features(features: Mapping[str, torch.Tensor], reductions: Mapping[str, Reduction]) -> dict[str, torch.Tensor]:
    """Apply each layer's reduction: (B, ...) outputs to (B, D) float32 features."""
    return {name: reductions[name](h) for name, h in features.items()}


def extract_split(taps: Taps, data: Any, cache: FeatureCache, split: str, *, data_fingerprint: str,
                  reductions: Callable[[dict[str, torch.Tensor]], dict[str, Reduction]],
                  batch_size: int = 256, dtype: str = "float32", progress: bool = True) -> float:
    """Run the (frozen) model over ``data`` once and write every tap's reduced features to ``cache``.

    ``reductions`` is called with the first batch's raw features and returns the reduction per
    layer (it also records the layer metadata in the cache). The first batch runs the whole
    forward to check that every layer executes; later batches stop after the deepest tap.
    Returns the extraction throughput in samples per second.
    """
    device = model_device(taps.model)
    n = dataset_length(data)
    writer, start, chosen = None, time.perf_counter(), None
    taps.stop_early = False
    try:
        bar = tqdm(total=n, desc=f"extract {split}", unit="sample", disable=not progress, leave=False)
        for x, y in iter_batches(data, batch_size):
            raw = taps.run(to_device(x, device))
            if writer is None:
                chosen = reductions(raw)
                writer = cache.writer(split, n, dtype=dtype)
                taps.stop_early = True
            index = torch.arange(writer.pos, writer.pos + len(y))
            writer.write(reduce_features(raw, chosen), y, index)
            bar.update(len(y))
        bar.close()
        if writer is None:
            raise ValueError(f"the {split} split is empty: probing needs samples in every split")
        shard = writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        taps.stop_early = False
    seconds = time.perf_counter() - start
    cache.complete(split, data_fingerprint, [shard], seconds=seconds)
    return n / max(seconds, 1e-9)
