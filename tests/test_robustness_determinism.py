"""Robustness, determinism: the same seed gives the same table, whatever the global random state.

Independence from the extraction batch size is tested in
test_finished.py::test_results_do_not_depend_on_extraction_batch_size.
"""
from __future__ import annotations

import torch
from torch import nn

import linprobe as lp


def _run(seed: int, global_seed: int) -> lp.ProbeResult:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(40) % 3
    x[:, 0] += y
    torch.manual_seed(global_seed)  # the caller's random state must not matter
    return lp.probe(model, (x[:24], y[:24]), (x[24:32], y[24:32]), (x[32:], y[32:]), layers=["0", "2"],
                    reduce={"0": "subset:8", "2": "project:4"}, seed=seed, l2_path=(1.0, 0.1), progress=False)


def test_same_seed_gives_identical_tables_twice() -> None:
    a, b = _run(seed=3, global_seed=0), _run(seed=3, global_seed=123)
    assert a.table() == b.table() and a.rows == b.rows and a.layers == b.layers
    c = _run(seed=4, global_seed=0)
    assert c.layers[0].reduction != a.layers[0].reduction  # the seed does choose the subset
