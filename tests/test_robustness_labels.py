"""Robustness, labels: lengths, floats, negatives, non-contiguous classes, one class, imbalance, one-hot."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import linprobe as lp
from linprobe.data.datasets import ArrayDataset, as_labels
from linprobe.data.inputs import Split
from linprobe.fit.metrics import balanced_error


def _data(y: torch.Tensor, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that separate the classes of ``y`` along the first axis."""
    x = torch.randn(len(y), 3, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += torch.as_tensor(y, dtype=torch.float32)
    return x, y


def _short_labels(x: torch.Tensor, y: torch.Tensor, short_batches: set[int]) -> DataLoader:
    """Batches of four whose labels lose their last entry in the batches numbered ``short_batches`` (told from the
    samples' positions, so every pass over the loader gives the same batches)."""
    def collate(b: list) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.stack([s[1] for s in b])
        return torch.stack([s[0] for s in b]), labels[:-1] if int(b[0][2]) // 4 in short_batches else labels

    return DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=4, collate_fn=collate)


def test_labels_of_another_length_than_the_batch_are_refused() -> None:
    x, y = _data(torch.arange(8) % 2)
    with pytest.raises(ValueError, match="a batch has inputs of \\[4\\] rows but 3 labels"):
        lp.probe(nn.Identity(), _short_labels(x, y, {1}), (x, y), layers="input", progress=False)


def test_labels_of_another_length_than_the_first_batch_are_refused() -> None:
    x, y = _data(torch.arange(8) % 2)
    with pytest.raises(ValueError, match="one label per sample"):
        lp.probe(nn.Identity(), _short_labels(x, y, {0, 1}), (x, y), layers="input", progress=False)


def test_whole_float_labels_are_accepted_fractional_ones_refused() -> None:
    assert ArrayDataset(np.zeros((3, 1)), np.array([0.0, 2.0, 1.0])).y.tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="whole numbers.*got 0.5 at sample 1"):
        ArrayDataset(np.zeros((3, 1)), np.array([0.0, 0.5, 1.0]))
    loader = TensorDataset(torch.zeros(3, 1), torch.tensor([1.0, 2.7, 0.0]))  # sliced, not via ArrayDataset
    with pytest.raises(ValueError, match="got 2.7"):
        list(Split.of(loader).batches(2))
    with pytest.raises(ValueError, match="got nan"):
        as_labels([0.0, float("nan")])


def test_negative_labels_are_refused_on_every_path() -> None:
    with pytest.raises(ValueError, match=">= 0, got minimum -1"):
        list(Split.of(DataLoader(TensorDataset(torch.zeros(2, 1), torch.tensor([0, -1])))).batches(2))
    with pytest.raises(ValueError, match=">= 0, got minimum -1"):
        list(Split.of(DataLoader([{"x": torch.zeros(1), "labels": -1}])).batches(2))  # a mapping batch
    tokens = torch.tensor([[0, -100], [-1, 1]])  # -100 is "no label"; any other negative is an error
    with pytest.raises(ValueError, match=">= 0, got minimum -1"):
        ArrayDataset(torch.zeros(2, 2, dtype=torch.long), tokens)


def test_one_hot_labels_are_an_error_that_says_argmax() -> None:
    with pytest.raises(ValueError, match=r"shape \(4, 3\) look one-hot: pass y.argmax\(1\)"):
        ArrayDataset(np.zeros((4, 2)), np.eye(3)[[0, 1, 2, 1]])
    with pytest.raises(ValueError, match="one class index per sample"):
        ArrayDataset(np.zeros((2, 2)), np.ones((2, 2, 2)))
    # 2-D labels that are not one-hot (multi-label rows included) are now read as one class per token
    assert ArrayDataset(np.zeros((2, 2)), np.ones((2, 2))).y.tolist() == [[1, 1], [1, 1]]
    with pytest.raises(ValueError, match="encode them first"):
        as_labels(np.array(["cat", "dog"]))


@pytest.fixture(scope="module")
def unbalanced_result() -> lp.ProbeResult:
    """Labels {3, 7}, nine 3s for each 7, probed on the input."""
    y = torch.tensor(([3] * 9 + [7]) * 4)
    return lp.probe(nn.Identity(), _data(y), _data(y, seed=1), _data(y, seed=2), layers="input", l2_path=(1.0,),
                    progress=False, plot=False)


def test_non_contiguous_labels_are_mapped_and_reported(unbalanced_result: lp.ProbeResult) -> None:
    assert unbalanced_result.meta["classes"] == [3, 7]
    assert unbalanced_result.probes["input"].num_classes == 2  # not eight, so no top-5 error either
    assert {r.metric for r in unbalanced_result.rows} == {"l2", "top1_error", "cross_entropy", "balanced_error",
                                                          "macro_f1", "auroc"}
    assert unbalanced_result.layers[0].chance_error == pytest.approx(0.1)


def test_unbalanced_classes_report_balanced_error(unbalanced_result: lp.ProbeResult) -> None:
    for split in ("train", "valid", "test"):
        assert 0 <= unbalanced_result.value("input", split, "balanced_error") <= 1
    majority = torch.tensor([[1.0, 0.0]] * 10)
    y = torch.tensor([0] * 9 + [1])
    assert balanced_error(majority, y) == pytest.approx(0.5)  # top-1 error would say 0.1


def test_a_single_training_class_is_an_error() -> None:
    x, y = _data(torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"single class \(\[1\]\).*at least two"):
        lp.probe(nn.Identity(), (x, y), (x, y), layers="input", progress=False)


def test_fewer_training_samples_than_classes_names_the_missing_ones() -> None:
    train, valid = _data(torch.tensor([0, 1, 2])), _data(torch.arange(5))
    message = r"class\(es\) \[3, 4\] occur in the valid split but not in train \(which has 3 classes\)"
    with pytest.raises(ValueError, match=message):
        lp.probe(nn.Identity(), train, valid, layers="input", progress=False)
