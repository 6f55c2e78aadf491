"""The data boundary: whatever a user passes as a split becomes one ``Split``, and each batch one ``Batch``.

A split may be an ``(x, y)`` pair of arrays or tensors, an ``ArrayDataset``, a torch ``Dataset`` or a
``DataLoader``. ``x`` is a tensor of any dtype (called as ``model(x)``), a tuple or list of them
(``model(*x)``) or a mapping (``model(**x)``, Hugging Face style). A dataset or loader yields
``(x, y)``, ``(x, y, ...)`` or one mapping holding the labels under ``labels_key``. Labels are one
class per sample ``(N,)``, or one per token ``(N, T)`` with ``-100`` for positions that carry none
(Hugging Face's convention): then every labelled token is a sample. A mapping input's
``attention_mask`` is the token mask used by ``tokens=``. Everything after this module takes a
``Split`` or a ``Batch``: the conversions happen here, once.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset, TensorDataset

from linprobe.data.datasets import IGNORE, ArrayDataset, sample_labels, tree_map, tree_tensors

_FINGERPRINT_SAMPLES = 64


@dataclass(frozen=True)
class InputSpec:
    """Where a batch keeps what is not a model input: the labels of a mapping batch, the token mask of a
    mapping input (None: no mask)."""

    labels_key: str = "labels"
    mask_key: str | None = "attention_mask"


@dataclass
class Batch:
    """One batch as the model takes it: ``inputs`` (called as ``model(x)``, ``model(*x)`` or ``model(**x)``),
    ``labels`` ``(B,)`` or per token ``(B, T)``, and the ``(B, T)`` token mask (True = a real token) or None."""

    inputs: Any
    labels: Tensor
    mask: Tensor | None = None

    @property
    def size(self) -> int:
        """Samples (sequences) in the batch."""
        return len(self.labels)

    @property
    def token_level(self) -> bool:
        """Whether each token is a sample (labels ``(B, T)``)."""
        return self.labels.dim() == 2

    @cached_property
    def token_index(self) -> Tensor | None:
        """For token-level labels, the ``(B, T)`` positions that are samples (label != -100); every hook of a
        forward reads it, so it is computed once per batch."""
        return self.labels != IGNORE if self.token_level else None

    @property
    def targets(self) -> Tensor:
        """The labels of the samples, one per row the taps give: per sample, or per labelled token in order."""
        return self.labels[self.token_index] if self.token_level else self.labels

    def call(self, model: torch.nn.Module) -> Any:
        """Run ``model`` on the inputs: ``model(**x)`` for a mapping, ``model(*x)`` for a tuple or list, else
        ``model(x)``."""
        if isinstance(self.inputs, Mapping):
            return model(**self.inputs)
        if isinstance(self.inputs, (tuple, list)):
            return model(*self.inputs)
        return model(self.inputs)

    def to(self, device: torch.device, float_dtype: torch.dtype | None = None) -> Batch:
        """On ``device``, floating inputs in the model's floating dtype (integer inputs such as token ids kept)."""
        def move(t: Tensor) -> Tensor:
            if float_dtype is not None and t.is_floating_point():
                return t.to(device, float_dtype, non_blocking=True)
            return t.to(device, non_blocking=True)
        mask = None if self.mask is None else self.mask.to(device)
        return Batch(tree_map(move, self.inputs), self.labels, mask)

    def head(self, k: int) -> Batch:
        """The first ``k`` samples (every tensor whose first axis is the batch is cut)."""
        b = self.size
        cut = tree_map(lambda t: t[:k] if t.dim() and len(t) == b else t, self.inputs)
        return Batch(cut, self.labels[:k], None if self.mask is None else self.mask[:k])


def make_batch(x: Any, y: Any, spec: InputSpec) -> Batch:
    """A ``Batch`` from model inputs and labels, the token mask taken from a mapping input's ``spec.mask_key``."""
    labels = sample_labels(y)
    rows = {len(t) for t in tree_tensors(x) if t.dim()}
    if rows and rows != {len(labels)}:
        raise ValueError(f"a batch has inputs of {sorted(rows)} rows but {len(labels)} labels: x and y need one "
                         "label per sample")
    mask = None
    if isinstance(x, Mapping) and spec.mask_key is not None and spec.mask_key in x:
        mask = torch.as_tensor(x[spec.mask_key]).bool()
        if mask.shape[0] != len(labels) or mask.dim() != 2:
            raise ValueError(f"{spec.mask_key!r} has shape {tuple(mask.shape)} for {len(labels)} labels: a token "
                             "mask is (batch, tokens), 1 for real tokens and 0 for padding")
    if labels.dim() == 2 and mask is not None and mask.shape != labels.shape:
        raise ValueError(f"token labels of shape {tuple(labels.shape)} but a token mask of shape {tuple(mask.shape)}: "
                         "per-token labels need one label (or -100) per token position")
    return Batch(x, labels, mask)


def _split_batch(raw: Any, spec: InputSpec) -> Batch:
    """A ``Batch`` from what a dataset or loader yields: ``(x, y, ...)`` or a mapping holding the labels."""
    if isinstance(raw, Mapping):
        if spec.labels_key not in raw:
            raise TypeError(f"a batch is a mapping with keys {sorted(raw)} but no {spec.labels_key!r}: put the labels "
                            f"there or pass labels_key= naming the key that holds them")
        return make_batch({k: v for k, v in raw.items() if k != spec.labels_key}, raw[spec.labels_key], spec)
    if isinstance(raw, (tuple, list)) and len(raw) >= 2:
        return make_batch(raw[0], raw[1], spec)
    raise TypeError(f"each batch must be (x, y, ...) or a mapping holding {spec.labels_key!r}, got "
                    f"{type(raw).__name__}; make the dataset return (x, y) pairs or give the DataLoader a collate_fn "
                    "that does")


class Split:
    """One split of data, normalised once: its length, fingerprint, batches (model call, labels, token mask) and
    shards. Build it with ``Split.of(data)``; every later stage takes this object."""

    def __init__(self, source: ArrayDataset | Dataset[Any] | DataLoader[Any], spec: InputSpec) -> None:
        self.source = source
        self.spec = spec
        self._fingerprint: str | None = None
        self._rows: int | None = None
        self._targets: Tensor | None = None

    @classmethod
    def of(cls, data: Any, spec: InputSpec | None = None, name: str = "data") -> Split:
        """Normalise user data (see the module docstring); a ``Split`` is returned as is."""
        if isinstance(data, Split):
            return data
        spec = spec or InputSpec()
        if isinstance(data, (Dataset, DataLoader)):
            return cls(data, spec)
        if _is_frame(data):
            raise TypeError(f"the {name} split is a {type(data).__name__}: pass (features, labels), e.g. "
                            "(df.drop(columns='label'), df['label'])")
        if isinstance(data, (tuple, list)) and len(data) == 2:
            return cls(ArrayDataset(*data), spec)
        raise TypeError(f"cannot use {type(data).__name__} as the {name} split; pass an (x, y) pair of arrays or "
                        "tensors (x may be a dict of them), an ArrayDataset, or a torch Dataset or DataLoader "
                        "yielding (x, y) or a dict holding 'labels'")

    def __len__(self) -> int:
        """Samples (sequences) in the split."""
        target = self.source.dataset if isinstance(self.source, DataLoader) else self.source
        try:
            return len(cast(Sized, target))  # a Dataset need not be Sized: the TypeError below
        except TypeError:
            raise TypeError(f"cannot tell how many samples {type(target).__name__} holds (it has no __len__); "
                            "pass a map-style Dataset or an ArrayDataset") from None

    def batch_size(self, default: int) -> int:
        """The batch size extraction uses: a DataLoader's own, else ``default``."""
        return (self.source.batch_size or default) if isinstance(self.source, DataLoader) else default

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Batches in dataset order, the same on every pass (the labels are read in a pass of their own): in-memory
        data sliced, a DataLoader's own batching (a shuffling one read in order), other datasets batched by a
        DataLoader of ``batch_size``."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if isinstance(self.source, ArrayDataset):
            return (make_batch(x, y, self.spec) for x, y in self.source.slices(batch_size))
        if isinstance(self.source, TensorDataset) and len(self.source.tensors) >= 2:
            x, y = self.source.tensors[:2]
            return (make_batch(x[i:i + batch_size], y[i:i + batch_size], self.spec)
                    for i in range(0, len(y), batch_size))
        loader = self.source if isinstance(self.source, DataLoader) else DataLoader(self.source, batch_size=batch_size)
        if loader.batch_size is not None and not isinstance(loader.sampler, SequentialSampler):
            loader = _in_order(loader, loader.dataset)
        return (_split_batch(raw, self.spec) for raw in loader)

    def rows(self, batch_size: int) -> int:
        """Rows the split gives a probe: its samples, or its labelled tokens for per-token labels (counted from the
        labels for in-memory data, else by one pass over the batches, only when the first batch's labels are per
        token)."""
        if self._rows is None:
            if isinstance(self.source, ArrayDataset):
                labels = self.source.y
                self._rows = len(labels) if labels.dim() == 1 else int((labels != IGNORE).sum())
            else:
                first = next(iter(self.batches(batch_size)), None)
                per_token = first is not None and first.token_level
                self._rows = sum(len(b.targets) for b in self.batches(batch_size)) if per_token else len(self)
        return self._rows

    def fingerprint(self) -> str:
        """A 16-hex-digit digest of what extraction reads: the inputs and, for per-token labels, which tokens are
        samples, but not the label values (another label set over the same inputs reuses the features). In-memory
        data is hashed in full; other datasets by class name, length and their first 64 samples (a change further
        in goes unnoticed)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(repr(self.spec).encode())
            tensors = _in_memory(self.source)
            if tensors is None:
                data = self.source.dataset if isinstance(self.source, DataLoader) else self.source
                digest.update(f"{type(data).__qualname__}:{len(self)}".encode())
                first = next(iter(Split(data, self.spec).batches(_FINGERPRINT_SAMPLES)), None)
                tensors = [] if first is None else tree_tensors(first.inputs) + _sample_mask(first.labels)
            for t in tensors:
                _hash_tensor(digest, t)
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def targets(self, batch_size: int = 4096) -> Tensor:
        """The label of every row a probe gets, in dataset order (per sample, or per labelled token): read from
        in-memory data directly, else by one pass over the data without the model."""
        if self._targets is None:
            parts = [b.targets for b in self.batches(max(len(self), 1) if _in_memory(self.source) else batch_size)]
            self._targets = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return self._targets

    def labelled_tokens(self) -> Tensor | None:
        """For in-memory per-token labels ``(N, T)``, which tokens are samples; None otherwise."""
        data = self.source.dataset if isinstance(self.source, DataLoader) else self.source
        return data.y != IGNORE if isinstance(data, ArrayDataset) and data.y.dim() == 2 else None

    def shard(self, rows: range) -> Split:
        """The samples at ``rows``. A DataLoader keeps its batch size, collate function and workers; its sampler is
        replaced by the rows in order."""
        src = self.source
        if isinstance(src, ArrayDataset):
            return Split(src.subset(torch.arange(rows.start, rows.stop)), self.spec)
        if isinstance(src, DataLoader):
            if src.batch_size is None:
                raise ValueError("a DataLoader with a batch_sampler cannot be split across processes; pass its "
                                 "dataset and a batch_size instead")
            return Split(_in_order(src, Subset(src.dataset, rows)), self.spec)
        return Split(Subset(src, rows), self.spec)

    def check_finite(self, name: str) -> None:
        """Refuse in-memory floating inputs holding NaN or Inf, before any forward (every layer would be invalid)."""
        if not isinstance(self.source, ArrayDataset):
            return
        for t in tree_tensors(self.source.x):
            if t.is_floating_point():
                bad = (~torch.isfinite(t.reshape(len(t), -1))).any(1).nonzero()
                if len(bad):
                    i = int(bad[0])
                    raise ValueError(f"the {name} split's inputs hold NaN or Inf (first at sample {i}): every layer "
                                     "would be invalid; clean or impute the data first")


def _in_order(loader: DataLoader[Any], dataset: Dataset[Any]) -> DataLoader[Any]:
    """A loader over ``dataset`` in order, with ``loader``'s batch size, collate function and workers."""
    return DataLoader(dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def _in_memory(source: Any) -> list[Tensor] | None:
    """What the fingerprint hashes of in-memory data (an ArrayDataset or TensorDataset, or a DataLoader over one):
    every input tensor in full and which tokens are samples; None for other data."""
    data = source.dataset if isinstance(source, DataLoader) else source
    if isinstance(data, ArrayDataset):
        return tree_tensors(data.x) + _sample_mask(data.y)
    if isinstance(data, TensorDataset):
        return [data.tensors[0], *data.tensors[2:]] + _sample_mask(data.tensors[1])
    return None


def _sample_mask(labels: Tensor) -> list[Tensor]:
    """For per-token labels ``(N, T)``, which tokens are samples (what the features' rows depend on); nothing for
    one label per sample."""
    return [labels != IGNORE] if labels.dim() == 2 else []


def _is_frame(obj: Any) -> bool:
    """Whether ``obj`` is a pandas DataFrame (without importing pandas)."""
    return type(obj).__name__ == "DataFrame" and hasattr(obj, "to_numpy")


def _hash_tensor(digest: Any, t: Tensor) -> None:
    """Feed a tensor's dtype, shape and raw bytes into ``digest``."""
    t = t.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; it is a buffer on every version
    digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]


def as_splits(splits: Mapping[str, Any], spec: InputSpec | None = None) -> dict[str, Split]:
    """Each named split normalised (None entries dropped)."""
    return {name: Split.of(data, spec, name) for name, data in splits.items() if data is not None}

