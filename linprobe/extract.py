"""Feature extraction: one forward pass per batch feeds every tap, reduced and written to the cache."""
from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from linprobe import distributed
from linprobe.cache import CacheError, FeatureCache
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
    forward to check that every layer executes; later batches stop after the deepest tap. Every
    batch is checked: one row per label, the shapes of the first batch, finite values (a layer with
    a NaN or Inf is recorded in the split's ``nonfinite`` entry with its first batch and sample).

    Under torch.distributed each rank extracts its own contiguous whole batches of ``data``
    (``distributed.shard_range``) into its own shard; rank 0 chooses the reductions first and records
    every rank's shard in the manifest, which every rank then holds. Returns the throughput of the
    whole split in samples per second.
    """
    rank, world = distributed.rank(), distributed.world_size()
    n = dataset_length(data)
    rows = distributed.shard_range(n, rank, world, distributed.batch_size_of(data, batch_size))
    start = time.perf_counter()
    if world > 1 and not cache.layers:
        _agree_layers(taps, data, cache, reductions, batch_size)
    shard = None
    if len(rows) or world == 1:  # a rank left without rows (fewer batches than ranks) writes no shard
        local = distributed.shard_data(data, rows) if world > 1 else data
        shard = _extract_shard(taps, local, cache, split, rows, reductions=reductions, batch_size=batch_size,
                               dtype=dtype, progress=progress and rank == 0)
    seconds = time.perf_counter() - start
    shards = [s for s in distributed.all_gather_object(shard) if s is not None]
    if rank == 0:
        cache.complete(split, data_fingerprint, [s for s, _ in shards], seconds=seconds,
                       nonfinite=_first_nonfinite(found for _, found in shards))
    cache.manifest = distributed.broadcast_object(cache.manifest)
    return n / max(time.perf_counter() - start, 1e-9)


def _agree_layers(taps: Taps, data: Any, cache: FeatureCache,
                  reductions: Callable[[dict[str, torch.Tensor]], dict[str, Reduction]], batch_size: int) -> None:
    """Rank 0 chooses the reductions from the split's first batch and records them; every rank takes its manifest."""
    if distributed.rank() == 0:
        x, _ = next(iter(iter_batches(data, batch_size)))
        reductions(taps.run(to_device(x, model_device(taps.model))))
    cache.manifest = distributed.broadcast_object(cache.manifest)


def _extract_shard(taps: Taps, data: Any, cache: FeatureCache, split: str, rows: range, *,
                   reductions: Callable[[dict[str, torch.Tensor]], dict[str, Reduction]], batch_size: int,
                   dtype: str, progress: bool) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Extract ``data`` (the dataset's ``rows``) into this rank's shard; returns its manifest entry and the first
    NaN/Inf of each layer (batch and sample numbered within the whole split)."""
    device, storage = model_device(taps.model), getattr(torch, dtype)
    rank, world = distributed.rank(), distributed.world_size()
    first_batch = rows.start // distributed.batch_size_of(data, batch_size)
    writer, chosen = None, {}
    nonfinite: dict[str, dict[str, Any]] = {}
    taps.stop_early = False
    try:
        bar = tqdm(total=len(rows), desc=f"extract {split}", unit="sample", disable=not progress, leave=False)
        for batch, (x, y) in enumerate(iter_batches(data, batch_size), start=first_batch):
            raw = taps.run(to_device(x, device))
            if writer is None:
                chosen = reductions(raw)
                writer = cache.writer(split, len(rows), dtype=dtype, rank=rank, world=world)
                taps.stop_early = True
            _check_batch(raw, len(y), cache, split, batch)
            reduced = reduce_features(raw, chosen)
            stored = {name: f.to(storage) for name, f in reduced.items()}
            at = rows.start + writer.pos
            for name, (row, what) in _nonfinite(reduced, stored).items():
                nonfinite.setdefault(name, {"batch": batch, "sample": at + row, "value": what})
            writer.write(stored, y, torch.arange(at, at + len(y)))
            bar.update(len(y))
        bar.close()
        if writer is None:
            raise ValueError(f"the {split} data yielded no batch (a DataLoader with drop_last and fewer samples than "
                             "its batch size?): probing needs samples in every split")
        return {**writer.commit(), "start": rows.start}, nonfinite
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CacheError(f"disk full while writing the {split} features into {cache.root}: free some space or "
                             "pass a cache_dir on a bigger disk (nothing half-written was kept)") from e
        raise
    finally:
        taps.stop_early = False


def _first_nonfinite(found: Iterable[Mapping[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per layer, the NaN/Inf at the lowest sample among the shards' findings."""
    first: dict[str, dict[str, Any]] = {}
    for shard in found:
        for name, where in shard.items():
            if name not in first or where["sample"] < first[name]["sample"]:
                first[name] = where
    return first


def _check_batch(raw: Mapping[str, torch.Tensor], labels: int, cache: FeatureCache, split: str, batch: int) -> None:
    """Each layer gives one row per label and the per-sample shape recorded from the first batch."""
    for name, h in raw.items():
        rows = h.shape[0] if h.dim() else 0  # a scalar output has no batch axis
        if rows != labels:
            raise ValueError(f"layer {name!r} gave {rows} rows for the {labels} labels of batch {batch} of the "
                             f"{split} split: x and y need one label per sample, and the tapped tensor must be "
                             "batch-first (pick another with select=)")
        expected = tuple(cache.layers[name]["shape"])
        if tuple(h.shape[1:]) != expected:
            raise ValueError(f"layer {name!r} gave per-sample shape {tuple(h.shape[1:])} in batch {batch} of the "
                             f"{split} split but {expected} in the first batch extracted into {cache.root}: every "
                             "sample must give one shape (resize inputs, use tokens= for sequences, or delete that "
                             "folder if it was made from differently shaped data)")


def _nonfinite(reduced: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
    """For each layer with a NaN or Inf among its stored features: the first offending row of the batch and
    what was found. One ``isfinite`` per layer and a single check per batch; the search runs only on a failure."""
    if not stored or bool(torch.stack([f.isfinite().all() for f in stored.values()]).all()):
        return {}
    found = {}
    for name, f in stored.items():
        bad = (~f.isfinite()).any(1).nonzero()
        if len(bad):
            row = int(bad[0])
            original = reduced[name][row]
            found[name] = (row, "NaN" if original.isnan().any() else "Inf" if not original.isfinite().all()
                           else f"a value beyond the range of {f.dtype} (extract with dtype='float32')")
    return found
