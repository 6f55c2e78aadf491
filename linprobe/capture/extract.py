"""Feature extraction: one forward pass per batch feeds every tap, reduced and written to the cache."""
from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from linprobe import distributed
from linprobe.capture.cache import CacheError, FeatureCache, ShardWriter
from linprobe.capture.reduce import Reduction, reduction_from_dict
from linprobe.capture.taps import Plan, Taps, discovery_batch
from linprobe.data.datasets import tree_tensors
from linprobe.data.inputs import Batch, Split


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def model_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the model's first floating parameter or buffer (floating inputs are cast to it)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def prepared(batch: Batch, model: nn.Module) -> Batch:
    """A batch on the model's device, its floating inputs in the model's floating dtype."""
    return batch.to(model_device(model), model_float_dtype(model))


ChooseReductions = Callable[[Mapping[str, torch.Tensor], Plan], dict[str, Reduction]]


def discover(taps: Taps, split: Split, batch_size: int, name: str = "train") -> dict[str, torch.Tensor]:
    """The discovering forward on the first few samples of ``split``: what runs, with which per-sample shapes
    (``taps.plan``); returns those samples' features, token-reduced but not reduced."""
    first = next(iter(split.batches(split.batch_size(batch_size))), None)
    if first is None:
        raise ValueError(f"the {name} data yielded no batch (a DataLoader with drop_last and fewer samples than its "
                         "batch size?): probing needs samples in every split")
    taps.plan, taps.reductions = None, {}
    batch = prepared(discovery_batch(first), taps.model)
    try:
        return taps.run(batch)
    except (RuntimeError, TypeError, IndexError) as e:  # the data does not fit the model: say so before slow work
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                           for t in tree_tensors(batch.inputs))
        raise ValueError(f"{type(taps.model).__name__} cannot run on the {name} data (a batch of inputs {shapes}): "
                         f"{' '.join(str(e).split())}; check that the data fit the model") from e


def extract_split(taps: Taps, split: Split, cache: FeatureCache, name: str, *, reductions: ChooseReductions,
                  batch_size: int = 256, dtype: str = "float32", progress: bool = True) -> float:
    """Run the (frozen) model over ``split`` once and write every capture's reduced features to ``cache``.

    Before the first split a discovering forward on a few samples makes the taps' plan and ``reductions`` chooses
    each capture's reduction (recording both in the cache); later splits and resumed runs take them from the
    cache. Every forward reduces inside the hooks and writes each capture to the shard as soon as it is reduced
    (the taps' ``sink``), so a batch holds one capture at a time, and stops after the deepest capture. Every
    batch is checked: one row per label, the shapes of the first batch,
    finite values (a layer with a NaN or Inf is recorded in the split's ``nonfinite`` entry with its first batch
    and sample).

    Under torch.distributed each rank extracts its own contiguous whole batches of ``split``
    (``distributed.shard_range``) into its own shard; rank 0 makes the plan and reductions first and records
    every rank's shard in the manifest, which every rank then holds. Returns the throughput of the whole split
    in samples per second.
    """
    rank, world = distributed.rank(), distributed.world_size()
    n, size = len(split), split.batch_size(batch_size)
    rows = distributed.shard_range(n, rank, world, size)
    start = time.perf_counter()
    if not cache.layers:
        if rank == 0:
            reductions(discover(taps, split, batch_size, name), cast(Plan, taps.plan))  # discover sets the plan
        cache.manifest = distributed.broadcast_object(cache.manifest)
    taps.plan = Plan.from_dict(cache.manifest["plan"])
    taps.reductions = {n: reduction_from_dict(cache.layers[n]["reduction"]) for n in cache.manifest["order"]}
    shard = None
    if len(rows) or world == 1:  # a rank left without rows (fewer batches than ranks) writes no shard
        local = split.shard(rows) if world > 1 else split
        shard = _extract_shard(taps, local, cache, name, rows, batch_size=size, dtype=dtype,
                               progress=progress and rank == 0)
    seconds = time.perf_counter() - start
    shards = [s for s in distributed.all_gather_object(shard) if s is not None]
    if rank == 0:
        cache.complete(name, split.fingerprint(), [s for s, _ in shards], seconds=seconds,
                       nonfinite=_first_nonfinite(found for _, found in shards))
    cache.manifest = distributed.broadcast_object(cache.manifest)
    return n / max(time.perf_counter() - start, 1e-9)


def _extract_shard(taps: Taps, split: Split, cache: FeatureCache, name: str, rows: range, *, batch_size: int,
                   dtype: str, progress: bool) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Extract ``split`` (the dataset's ``rows``) into this rank's shard; returns its manifest entry and the first
    NaN/Inf of each layer (batch and sample numbered within the whole split)."""
    storage = getattr(torch, dtype)
    rank, world = distributed.rank(), distributed.world_size()
    first_batch = rows.start // batch_size
    writer: ShardWriter | None = None
    nonfinite: dict[str, dict[str, Any]] = {}
    seq = rows.start  # the dataset index of the batch's first sample
    now: dict[str, Any] = {}  # the batch being extracted, for the sink

    def sink(layer: str, reduced: torch.Tensor) -> None:
        """Check one capture of the current batch and write it to the shard at once."""
        batch = now["batch"]
        _check_layer(layer, reduced, now["rows"], cache, name, now["number"])
        stored = reduced.to(storage)
        found = _nonfinite(reduced, stored)
        if found is not None and layer not in nonfinite:
            row, what = found
            nonfinite[layer] = {"batch": now["number"], "sample": seq + _sample_of(batch, row), "value": what}
        assert writer is not None  # made before the first forward
        writer.write_layer(layer, stored)

    taps.stop_early, taps.sink = True, sink
    try:
        writer = cache.writer(name, split.rows(batch_size), dtype=dtype, rank=rank, world=world)
        bar = tqdm(total=len(rows), desc=f"extract {name}", unit="sample", disable=not progress, leave=False)
        for number, batch in enumerate(split.batches(batch_size), start=first_batch):
            targets = batch.targets
            now.update(batch=batch, rows=len(targets), number=number)
            taps.run(prepared(batch, taps.model))
            writer.write_rows(_dataset_index(batch, seq))
            seq += batch.size
            bar.update(batch.size)
        bar.close()
        if writer.pos == 0 and seq == rows.start:
            raise ValueError(f"the {name} data yielded no batch (a DataLoader with drop_last and fewer samples than "
                             "its batch size?): probing needs samples in every split")
        if writer.pos == 0:
            raise ValueError(f"the {name} split holds no labelled token (every label is -100)")
        return {**writer.commit(), "start": rows.start}, nonfinite
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CacheError(f"disk full while writing the {name} features into {cache.root}: free some space or "
                             "pass a cache_dir on a bigger disk (nothing half-written was kept)") from e
        raise
    finally:
        taps.stop_early, taps.sink = False, None


def _dataset_index(batch: Batch, first: int) -> torch.Tensor:
    """The dataset index of each row: the sample's, or for per-token labels the index of the token's sequence."""
    index = torch.arange(first, first + batch.size)
    if not batch.token_level:
        return index
    return index[:, None].expand_as(batch.labels)[batch.token_index]


def _sample_of(batch: Batch, row: int) -> int:
    """The sample (sequence) within the batch that a row comes from."""
    return int(_dataset_index(batch, 0)[row])


def _first_nonfinite(found: Iterable[Mapping[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per layer, the NaN/Inf at the lowest sample among the shards' findings."""
    first: dict[str, dict[str, Any]] = {}
    for shard in found:
        for name, where in shard.items():
            if name not in first or where["sample"] < first[name]["sample"]:
                first[name] = where
    return first


def _check_layer(name: str, h: torch.Tensor, labels: int, cache: FeatureCache, split: str, batch: int) -> None:
    """A layer gives one row per label and the width recorded from the first batch."""
    rows = h.shape[0] if h.dim() else 0  # a scalar output has no batch axis
    if rows != labels:
        raise ValueError(f"layer {name!r} gave {rows} rows for the {labels} labels of batch {batch} of the "
                         f"{split} split: x and y need one label per sample, and the tapped tensor must be "
                         "batch-first (pick another with select=)")
    expected = cache.layers[name]["features"]
    if h.shape[1] != expected:
        raise ValueError(f"layer {name!r} gave {h.shape[1]} features in batch {batch} of the {split} split but "
                         f"{expected} in the first batch extracted into {cache.root}: every sample must give one "
                         "shape (resize inputs, use tokens= for sequences, or delete that folder if it was made "
                         "from differently shaped data)")


def _nonfinite(reduced: torch.Tensor, stored: torch.Tensor) -> tuple[int, str] | None:
    """The first row of one layer's batch holding a NaN or Inf in its stored features, and what was found; None
    when all are finite (one ``isfinite`` per layer and batch; the search runs only on a failure)."""
    if bool(stored.isfinite().all()):
        return None
    row = int((~stored.isfinite()).any(1).nonzero()[0])
    original = reduced[row]
    return row, ("NaN" if original.isnan().any() else "Inf" if not original.isfinite().all()
                 else f"a value beyond the range of {stored.dtype} (extract with dtype='float32')")
