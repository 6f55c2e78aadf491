"""Same seed, same bits: a reproduction does not depend on the global random state, and leaves it as it was."""
from __future__ import annotations

import pytest
import torch
from conftest import one_thread

from linprobe.experiments import reproduce

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m "not slow"` leaves it out


def test_mnist_convnet_is_bit_identical_whatever_the_global_rng(tmp_path):
    outputs = []
    with one_thread():
        for state in (1, 2):  # dropout draws from the global generator: seeded by reproduce, not by the caller
            torch.manual_seed(state)
            before = torch.random.get_rng_state()
            summary = reproduce("mnist-convnet", tmp_path / str(state), quick=True, progress=False)
            assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is untouched
            outputs.append((tmp_path / str(state) / "results.csv").read_bytes())
    assert outputs[0] == outputs[1]
    count = next(f for f in summary.findings if f.startswith("layers improved by training"))
    improved = int(count.split(": ")[1].split(" of ")[0])
    assert count.endswith("of 9 (the input cannot change)") and 0 <= improved <= 9


def test_depth_sweep_is_bit_identical_with_the_same_seed(tmp_path):
    depths = (8, 32)  # two of the quick sweep's depths: the same code, half the time
    outputs = []
    with one_thread():
        for state in (1, 2):
            torch.manual_seed(state)
            out = tmp_path / str(state)
            reproduce("depth", out, quick=True, progress=False, depths=depths)
            outputs.append([(out / "depths.csv").read_bytes(),
                            *((out / f"depth{d}" / "results.csv").read_bytes() for d in depths)])
    assert outputs[0] == outputs[1]
    assert outputs[0][0].count(b"\n") == 1 + len(depths)  # a header and one row per depth
