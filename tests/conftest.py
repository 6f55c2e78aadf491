"""Shared fixtures: small models and data that make tests fast and deterministic."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from linprobe.data.datasets import ArrayDataset, load_digits, stratified_split
from linprobe.experiments import reproduce
from linprobe.experiments.report import Summary
from linprobe.report.results import LayerInfo, ProbeResult


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside: small matmuls crawl when a busy core is shared, and the thread count
    changes the float summation order (the last bits) against single-threaded worker processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quick_run(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, Summary]]:
    """One quick run of experiment ``name`` on one thread, for a module's tests to share."""
    out = tmp_path_factory.mktemp(name)
    with one_thread():
        yield out, reproduce(name, out, quick=True, progress=False)


class Block(nn.Module):
    """Linear + ReLU, so names like ``layer1.relu`` exist."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(x))


class SmallNet(nn.Module):
    """Conv stem then two blocks and a head: exercises pooling, nesting and execution order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(16, 10)  # registered first, runs last: registration order != execution order
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.flatten = nn.Flatten()
        self.layer1 = Block(4 * 8 * 8, 32)
        self.layer2 = Block(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.flatten(self.act(self.conv(x))))))


@pytest.fixture
def small_net() -> SmallNet:
    return SmallNet()


@pytest.fixture(scope="session")
def digits_splits() -> list[ArrayDataset]:
    """scikit-learn digits (1,797 real 8x8 images), stratified 60/20/20."""
    return stratified_split(load_digits(), [0.6, 0.2, 0.2], seed=0)


def rippling_result(centres: dict[str, float], steps: list[int], *, n: int = 1000, first: float = 0.8,
                    last: float = 0.1, chance: float = 0.9) -> ProbeResult:
    """A made-up result on ``n`` test samples: each layer's error falls from ``first`` to ``last`` along a logistic
    curve in log(1 + step) centred on ``log(1 + centres[layer])``, with per-sample predictions that give exactly
    those errors (the first ``round(error * n)`` samples wrong), so the ripple's bootstrap has something to resample.
    An ``"input"`` entry gets a flat error."""
    result = ProbeResult([LayerInfo(name, (4,), 4, 4, {"kind": "none"}, chance) for name in centres])
    targets = (np.arange(n) % 10).astype(np.int16)
    result.meta["samples"] = {"test": n}
    for step in steps:
        result.predictions[f"{step}/main/test/:targets"] = targets
        for name, centre in centres.items():
            shift = math.log1p(step) - math.log1p(centre)
            error = first if name == "input" else last + (first - last) / (1 + math.exp(4 * shift))
            wrong = round(error * n)
            result.predictions[f"{step}/main/test/{name}"] = np.where(np.arange(n) < wrong, (targets + 1) % 10,
                                                                      targets).astype(np.int16)
            result.add(step, name, "test", {"top1_error": wrong / n})
    return result
