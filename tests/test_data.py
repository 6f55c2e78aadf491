"""Tests for linprobe.data.datasets and the Split boundary of linprobe.data.inputs: loaders on real and synthetic data, stratified
splits, batching and fingerprints."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from linprobe.data.datasets import (
    ArrayDataset,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_mnist,
    standard_splits,
    stratified_split,
)
from linprobe.data import datasets as data
from linprobe.data.inputs import Batch, InputSpec, Split

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    """Write ``array`` as an IDX file (magic, big-endian dims, big-endian data), gzipped when ``gz``."""
    payload = (bytes([0, 0, IDX_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + array.tobytes())
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_idx_folder(root: Path, *, gz: bool, with_test: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A small MNIST-format folder: 30 train and 12 test uint8 images of 5x4 with labels in 0..2."""
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (30, 5, 4), dtype=np.uint8), rng.integers(0, 3, 30, dtype=np.uint8))}
    if with_test:
        arrays["test"] = (rng.integers(0, 256, (12, 5, 4), dtype=np.uint8), rng.integers(0, 3, 12, dtype=np.uint8))
    prefix = {"train": "train", "test": "t10k"}
    for split, (images, labels) in arrays.items():
        write_idx(root / f"{prefix[split]}-images-idx3-ubyte", images, gz=gz)
        write_idx(root / f"{prefix[split]}-labels-idx1-ubyte", labels, gz=gz)
    return arrays


def labelled(counts: list[int]) -> ArrayDataset:
    """A dataset whose x holds each sample's id, with ``counts[c]`` samples of class c."""
    y = np.repeat(np.arange(len(counts)), counts)
    return ArrayDataset(np.arange(len(y), dtype=np.float32)[:, None], y)


def ids(part: ArrayDataset) -> np.ndarray:
    """The sample ids a part of a ``labelled`` dataset holds."""
    return part.x[:, 0].numpy().astype(np.int64)


class ItemDataset(Dataset):
    """A plain map-style dataset of (x, y) samples, to exercise the generic DataLoader path."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


# ArrayDataset

def test_array_dataset_converts_and_indexes() -> None:
    ds = ArrayDataset(np.arange(12, dtype=np.uint8).reshape(4, 3), np.array([0, 2, 1, 2], dtype=np.int32))
    assert ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64  # x keeps its dtype (token ids stay integers)
    assert len(ds) == 4 and ds.num_classes == 3
    x, y = ds[1]
    assert x.tolist() == [3, 4, 5] and y.item() == 2
    sub = ds.subset(np.array([3, 0]))
    assert sub.x[:, 0].tolist() == [9, 0] and sub.y.tolist() == [2, 0] and sub.x.dtype == torch.uint8
    assert ds.subset(torch.tensor([True, False, False, True])).y.tolist() == [0, 2]


def test_array_dataset_keeps_float_dtypes_and_input_trees() -> None:
    assert ArrayDataset(np.zeros((2, 3)), [0, 1]).x.dtype == torch.float64
    assert ArrayDataset(torch.zeros(2, 3, dtype=torch.float16), [0, 1]).x.dtype == torch.float16
    tree = ArrayDataset({"ids": np.arange(6).reshape(3, 2), "extra": (np.ones((3, 1)), np.zeros((3, 4)))}, [0, 1, 0])
    assert tree.x["ids"].dtype == torch.int64 and isinstance(tree.x["extra"], tuple)
    x, y = tree[2]
    assert x["ids"].tolist() == [4, 5] and x["extra"][1].shape == (4,) and y.item() == 0
    sub = tree.subset(np.array([1]))
    assert sub.x["ids"].tolist() == [[2, 3]] and sub.x["extra"][0].shape == (1, 1)
    with pytest.raises(ValueError, match="different numbers of rows"):
        ArrayDataset({"a": np.zeros((3, 1)), "b": np.zeros((2, 1))}, [0, 1, 0])


def test_array_dataset_slices() -> None:
    ds = ArrayDataset({"ids": torch.arange(10)[:, None]}, torch.arange(10) % 3)
    got = list(ds.slices(4))
    assert [len(y) for _, y in got] == [4, 4, 2]
    assert torch.equal(torch.cat([x["ids"] for x, _ in got]), ds.x["ids"])
    assert torch.equal(torch.cat([y for _, y in got]), ds.y)


def test_array_dataset_per_token_labels() -> None:
    y = np.array([[0, 2, -100], [1, -100, -100]])
    ds = ArrayDataset(np.zeros((2, 3), dtype=np.int64), y)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == y.tolist()
    with pytest.raises(ValueError, match=">= 0"):
        ArrayDataset(np.zeros((2, 3)), np.array([[0, -1, 1], [1, 1, 0]]))  # only -100 means "no label"


def test_array_dataset_length_mismatch() -> None:
    with pytest.raises(ValueError, match="x has 3 samples but y has 2"):
        ArrayDataset(np.zeros((3, 2)), np.zeros(2))


def test_array_dataset_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="y must be 1-D"):
        ArrayDataset(np.zeros((3, 2)), np.zeros((3, 1, 1)))
    with pytest.raises(ValueError, match=r"labels of shape \(3, 1\): pass y\[:, 0\]"):
        ArrayDataset(np.zeros((3, 2)), np.zeros((3, 1)))  # a column of labels is refused, not read as one token
    with pytest.raises(ValueError, match=">= 0"):
        ArrayDataset(np.zeros((2, 2)), np.array([0, -1]))


# loaders

def test_load_mnist() -> None:
    ds = load_mnist()
    assert ds.x.shape == (5000, 1, 28, 28) and ds.x.dtype == torch.float32
    assert ds.x.min().item() == 0.0 and ds.x.max().item() == 1.0
    assert ds.num_classes == 10
    assert torch.bincount(ds.y).tolist() == [500] * 10


def test_load_digits() -> None:
    ds = load_digits()
    assert ds.x.shape == (1797, 1, 8, 8)
    assert ds.x.min().item() == 0.0 and ds.x.max().item() == 1.0
    assert ds.num_classes == 10


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_round_trips(tmp_path: Path, gz: bool) -> None:
    arrays = make_idx_folder(tmp_path, gz=gz)
    loaded = load_idx(tmp_path)
    assert set(loaded) == {"train", "test"}
    for split, (images, labels) in arrays.items():
        ds = loaded[split]
        assert ds.x.shape == (len(images), 1, 5, 4) and ds.x.dtype == torch.float32
        assert 0.0 <= ds.x.min().item() and ds.x.max().item() <= 1.0
        np.testing.assert_array_equal(np.rint(ds.x[:, 0].numpy() * 255).astype(np.uint8), images)
        np.testing.assert_array_equal(ds.y.numpy(), labels)


def test_load_idx_reads_header_dtype_and_partial_folder(tmp_path: Path) -> None:
    images = np.arange(6 * 2 * 3, dtype=np.uint8).reshape(6, 2, 3)
    labels = np.array([7, 0, 70000, 1, 2, 3], dtype=">i4")  # 0x0C: big-endian int32 labels, not bytes
    write_idx(tmp_path / "train-images-idx3-ubyte", images, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=True)
    loaded = load_idx(tmp_path)
    assert list(loaded) == ["train"]
    assert loaded["train"].y.tolist() == [7, 0, 70000, 1, 2, 3]
    assert loaded["train"].x.shape == (6, 1, 2, 3)


def test_load_idx_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_idx(tmp_path / "absent")


def test_load_idx_empty_folder_lists_expected_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no IDX files.*train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        load_idx(tmp_path)


def test_load_idx_unpaired_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 2, 2), np.uint8), gz=False)
    with pytest.raises(FileNotFoundError, match="not train-labels-idx1-ubyte"):
        load_idx(tmp_path)


def test_load_idx_corrupt_files(tmp_path: Path) -> None:
    make_idx_folder(tmp_path, gz=False, with_test=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_idx(tmp_path)
    labels.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_idx(tmp_path)


def test_load_fashion_mnist() -> None:
    if not data.FASHION_MNIST_ROOT.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    loaded = load_fashion_mnist()
    assert len(loaded["train"]) == 60000 and len(loaded["test"]) == 10000
    assert loaded["train"].x.shape[1:] == (1, 28, 28)
    assert loaded["train"].num_classes == 10
    assert torch.bincount(loaded["test"].y).tolist() == [1000] * 10


def test_load_fashion_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_ROOT", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist()


def test_load_dataset_specs(tmp_path: Path) -> None:
    assert list(load_dataset("digits")) == ["all"]
    make_idx_folder(tmp_path, gz=True)
    assert len(load_dataset(f"idx:{tmp_path}")["test"]) == 12
    with pytest.raises(ValueError, match="unknown dataset spec 'cifar'.*mnist, digits, fashion-mnist, idx:DIR"):
        load_dataset("cifar")


# splits

def test_stratified_split_disjoint_proportional_seeded() -> None:
    ds = labelled([50, 30, 20])
    parts = stratified_split(ds, [0.5, 0.3, 0.2], seed=3)
    assert [len(p) for p in parts] == [50, 30, 20]
    all_ids = np.concatenate([ids(p) for p in parts])
    assert sorted(all_ids.tolist()) == list(range(100))
    for part, fraction in zip(parts, [0.5, 0.3, 0.2]):
        counts = torch.bincount(part.y, minlength=3).numpy()
        assert np.abs(counts - fraction * np.array([50, 30, 20])).max() <= 1
        np.testing.assert_array_equal(part.y.numpy(), ds.y.numpy()[ids(part)])
    again = stratified_split(ds, [0.5, 0.3, 0.2], seed=3)
    assert all(np.array_equal(ids(a), ids(b)) for a, b in zip(parts, again))
    other = stratified_split(ds, [0.5, 0.3, 0.2], seed=4)
    assert not np.array_equal(ids(parts[0]), ids(other[0]))


def test_stratified_split_integer_counts_leave_rest_out() -> None:
    parts = stratified_split(labelled([40, 40]), [10, 6])
    assert [len(p) for p in parts] == [10, 6]
    assert torch.bincount(parts[0].y).tolist() == [5, 5] and torch.bincount(parts[1].y).tolist() == [3, 3]
    assert not set(ids(parts[0])) & set(ids(parts[1]))


def test_stratified_split_errors() -> None:
    ds = labelled([5, 5])
    with pytest.raises(ValueError, match="part 1 of the split would get 0 samples"):
        stratified_split(ds, [0.9, 0.01])
    with pytest.raises(ValueError, match="sum to 1.2 > 1"):
        stratified_split(ds, [0.6, 0.6])
    with pytest.raises(ValueError, match="ask for 11 samples but the data has only 10"):
        stratified_split(ds, [6, 5])


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(lambda c: sum(c) >= 30),
       fractions=st.lists(st.floats(0.2, 1.0), min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_stratified_split_shares_are_rounded_proportions(counts: list[int], fractions: list[float], seed: int) -> None:
    fractions = [f / max(1.0, sum(fractions)) for f in fractions]
    ds = labelled(counts)
    parts = stratified_split(ds, fractions, seed=seed)
    assert len(np.unique(np.concatenate([ids(p) for p in parts]))) == sum(len(p) for p in parts)
    for part in parts:
        share = np.array(counts) * len(part) / len(ds)
        got = torch.bincount(part.y, minlength=len(counts)).numpy()
        assert ((got == np.floor(share)) | (got == np.ceil(share))).all()


def test_standard_splits_without_test_part() -> None:
    splits = standard_splits("digits", seed=1)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [1258, 180, 359]
    assert sum(len(s) for s in splits.values()) == 1797
    limited = standard_splits("digits", seed=1, limit=100)
    assert [len(limited[k]) for k in ("train", "valid", "test")] == [100, 14, 29]


def test_standard_splits_keeps_shipped_test(tmp_path: Path) -> None:
    arrays = make_idx_folder(tmp_path, gz=False)
    splits = standard_splits(f"idx:{tmp_path}", valid_fraction=0.2)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [24, 6, 12]
    np.testing.assert_array_equal(splits["test"].y.numpy(), arrays["test"][1])
    with pytest.raises(ValueError, match="sum to less than 1"):
        standard_splits("digits", valid_fraction=0.5, test_fraction=0.5)


# Split: normalising, batching, lengths and fingerprints

def test_split_of_normalises_every_kind_of_split() -> None:
    ds = labelled([2, 2])
    assert Split.of(ds).source is ds
    split = Split.of(ds)
    assert Split.of(split) is split
    pair = Split.of((np.zeros((3, 2)), [0, 1, 1]))
    assert isinstance(pair.source, ArrayDataset) and pair.source.y.tolist() == [0, 1, 1]
    loader = DataLoader(ds, batch_size=2)
    assert Split.of(loader).source is loader
    with pytest.raises(TypeError, match=r"cannot use ndarray as the valid split; pass an \(x, y\) pair"):
        Split.of(np.zeros(3), name="valid")


def test_split_batches_slice_array_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = ArrayDataset(torch.randn(10, 3), torch.arange(10) % 4)
    monkeypatch.setattr(ArrayDataset, "__getitem__", lambda self, i: pytest.fail("per-sample __getitem__ was called"))
    batches = list(Split.of(ds).batches(4))
    assert all(isinstance(b, Batch) and b.mask is None for b in batches)
    assert [b.size for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b.inputs for b in batches]), ds.x)
    assert torch.equal(torch.cat([b.labels for b in batches]), ds.y)


def test_split_batches_same_over_tensor_dataset_loader_and_generic_dataset() -> None:
    x, y = torch.randn(11, 2, 2), torch.arange(11, dtype=torch.int32) % 3
    expected = list(Split.of(TensorDataset(x, y)).batches(5))
    assert all(b.labels.dtype == torch.int64 for b in expected)
    for source in (DataLoader(TensorDataset(x, y), batch_size=5), ItemDataset(x, y), (x, y)):
        got = list(Split.of(source).batches(5))
        assert len(got) == len(expected) == 3
        for g, e in zip(got, expected):
            assert torch.equal(g.inputs, e.inputs) and torch.equal(g.labels, e.labels)
            assert g.labels.dtype == torch.int64


def test_split_batches_of_mapping_batches() -> None:
    ids, mask = torch.arange(12).view(4, 3), torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": i % 2} for i in range(4)]
    (batch,) = Split.of(DataLoader(rows, batch_size=4)).batches(99)  # the loader's own batching
    assert set(batch.inputs) == {"input_ids", "attention_mask"} and batch.labels.tolist() == [0, 1, 0, 1]
    assert torch.equal(batch.mask, mask.bool())
    renamed = [{"x": ids[i], "target": i % 2} for i in range(4)]
    (batch,) = Split.of(DataLoader(renamed, batch_size=4), InputSpec(labels_key="target")).batches(4)
    assert list(batch.inputs) == ["x"] and batch.mask is None and batch.labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(TypeError, match="no 'labels'"):
        next(iter(Split.of(DataLoader(renamed, batch_size=4)).batches(4)))


def test_split_batches_reject_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        Split.of(labelled([1, 1])).batches(0)


def test_split_length() -> None:
    ds = labelled([3, 4])
    assert len(Split.of(ds)) == 7 and len(Split.of(DataLoader(ds, batch_size=2))) == 7

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(TypeError, match="Stream.*no __len__"):
        len(Split.of(Stream()))


def test_split_batch_size_and_rows() -> None:
    ds = labelled([3, 4])
    assert Split.of(ds).batch_size(64) == 64 and Split.of(DataLoader(ds, batch_size=2)).batch_size(64) == 2
    assert Split.of(ds).rows(3) == 7
    tokens = ArrayDataset(np.zeros((3, 4), dtype=np.int64), np.array([[0, 1, -100, -100], [1] * 4, [-100] * 4]))
    assert len(Split.of(tokens)) == 3 and Split.of(tokens).rows(2) == 6  # labelled tokens, not sequences


def test_fingerprint_tracks_content() -> None:
    x, y = torch.randn(20, 3), torch.arange(20) % 5
    fp = Split.of(ArrayDataset(x, y)).fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert Split.of(ArrayDataset(x.clone(), y.clone())).fingerprint() == fp
    assert Split.of((x, y)).fingerprint() == fp
    changed = y.clone()
    changed[13] = 0
    assert Split.of(ArrayDataset(x, changed)).fingerprint() == fp  # labels are fitted, not extracted
    moved = x.clone()
    moved[13, 0] += 1
    assert Split.of(ArrayDataset(moved, y)).fingerprint() != fp
    assert Split.of(ArrayDataset(x.reshape(20, 3, 1), y)).fingerprint() != fp
    assert Split.of(ArrayDataset(x.double(), y)).fingerprint() != fp  # x keeps its dtype, so the dtype counts


def test_fingerprint_of_in_memory_data_is_the_same_whatever_its_wrapper() -> None:
    x, y = torch.randn(20, 3), torch.arange(20) % 5
    fp = Split.of(ArrayDataset(x, y)).fingerprint()
    assert Split.of(TensorDataset(x, y)).fingerprint() == fp
    assert Split.of(DataLoader(ArrayDataset(x, y), batch_size=7, shuffle=True)).fingerprint() == fp


def test_fingerprint_of_tensor_dataset_and_loader_hash_every_sample() -> None:
    x, y = torch.randn(100, 3), torch.arange(100) % 5
    late = x.clone()
    late[90, 2] = 4
    assert Split.of(TensorDataset(late, y)).fingerprint() != Split.of(TensorDataset(x, y)).fingerprint()
    assert (Split.of(DataLoader(ArrayDataset(late, y), batch_size=8)).fingerprint()
            != Split.of(DataLoader(ArrayDataset(x, y), batch_size=8)).fingerprint())


def test_fingerprint_of_token_labels_tracks_which_tokens_are_samples_not_their_values() -> None:
    ids, y = torch.arange(12).view(3, 4), torch.tensor([[1, 2, -100, 0], [0, 0, 1, -100], [2, -100, -100, 1]])
    fp = Split.of((ids, y)).fingerprint()
    assert Split.of((ids, y.masked_fill(y == 2, 1))).fingerprint() == fp
    assert Split.of((ids, y.masked_fill(y == 2, -100))).fingerprint() != fp


def test_fingerprint_of_generic_dataset_uses_first_samples() -> None:
    x, y = torch.randn(100, 3), torch.arange(100) % 5
    fp = Split.of(ItemDataset(x, y)).fingerprint()
    assert Split.of(ItemDataset(x.clone(), y.clone())).fingerprint() == fp
    assert Split.of(DataLoader(ItemDataset(x, y), batch_size=7, shuffle=True)).fingerprint() == fp  # by its dataset
    early, late = x.clone(), x.clone()
    early[3, 0], late[90, 0] = 4, 4
    assert Split.of(ItemDataset(early, y)).fingerprint() != fp
    assert Split.of(ItemDataset(late, y)).fingerprint() == fp  # the documented limitation: only the first 64 are hashed


def test_split_shard() -> None:
    x, y = torch.arange(10.0)[:, None], torch.arange(10) % 2
    for source in ((x, y), TensorDataset(x, y), ItemDataset(x, y)):
        shard = Split.of(source).shard(range(3, 8))
        assert len(shard) == 5
        assert torch.cat([b.inputs for b in shard.batches(2)])[:, 0].tolist() == [3, 4, 5, 6, 7]
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    shard = Split.of(loader).shard(range(2, 9))
    assert shard.batch_size(64) == 3 and [b.size for b in shard.batches(64)] == [3, 3, 1]
    assert torch.cat([b.labels for b in shard.batches(64)]).tolist() == (y[2:9]).tolist()



def test_split_shard_of_no_rows_is_empty() -> None:
    x, y = torch.arange(10.0)[:, None], torch.arange(10) % 2
    assert len(Split.of(TensorDataset(x, y)).shard(range(5, 5))) == 0
    assert len(Split.of((x, y)).shard(range(5, 5))) == 0


def test_batch_calls_the_model_as_its_inputs_say() -> None:
    seen = []

    def model(*args: torch.Tensor, **kwargs: torch.Tensor) -> None:
        seen.append((len(args), sorted(kwargs)))

    y = torch.tensor([0, 1])
    for inputs in (torch.zeros(2, 3), (torch.zeros(2, 3), torch.ones(2)), {"a": torch.zeros(2), "b": torch.ones(2)}):
        Batch(inputs, y).call(model)
    assert seen == [(1, []), (2, []), (0, ["a", "b"])]


def test_group_split_keeps_every_group_on_one_side_and_sizes_close() -> None:
    from linprobe.data.datasets import group_split

    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 60, (1000,), generator=g)  # 60 sources of about 17 samples
    data = ArrayDataset(torch.arange(1000)[:, None].float(), torch.arange(1000) % 4)
    parts = group_split(data, (0.6, 0.2, 0.2), groups, seed=1)
    seen = [set(groups[p.x[:, 0].long()].tolist()) for p in parts]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])  # no group on two sides
    assert sum(len(p) for p in parts) == 1000
    assert all(abs(len(p) - 1000 * f) <= 40 for p, f in zip(parts, (0.6, 0.2, 0.2)))  # within about two groups
    again = group_split(data, (0.6, 0.2, 0.2), groups, seed=1)
    assert all(torch.equal(a.x, b.x) for a, b in zip(parts, again))
    with pytest.raises(ValueError, match="one group id per sample"):
        group_split(data, (0.5, 0.5), groups[:10])
