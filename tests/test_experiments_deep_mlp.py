"""The deep-MLP experiment (002 Figs. 6-8), quick setting: files written and each variant's claim."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import linprobe as lp
from linprobe.experiments import reproduce
from linprobe.experiments.deep_mlp import QUICK, block_means, range_mean, train_minibatches

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m "not slow"` leaves it out

Run = Callable[[str], Path]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small matmuls crawl on two threads when the second core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The output folder of one quick run per variant, made on first use and shared by the tests."""
    outs: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in outs:
            outs[variant] = tmp_path_factory.mktemp(variant)
            reproduce("deep-mlp", outs[variant], quick=True, progress=False, variant=variant)
        return outs[variant]

    return get


def test_train_minibatches_runs_exactly_the_count() -> None:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    data = lp.ArrayDataset(torch.randn(250, 4), torch.arange(250) % 3)  # 3 minibatches of at most 120 per epoch
    train_minibatches(model, data, optimizer, count=7, seed=0)
    assert len(steps) == 7


def test_layer_summaries() -> None:
    errors = {"input": 0.0, **{f"layer{k}": k / 100 for k in range(1, 33)}}
    assert block_means(errors, block=16, depth=32) == pytest.approx({"1-16": 0.085, "17-32": 0.245})
    assert range_mean(errors, 30, 32) == pytest.approx(0.31)
    assert range_mean(errors, 0, 0) == 0.0


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="variant"):
        reproduce("deep-mlp", tmp_path, quick=True, progress=False, variant="residual")


@pytest.mark.parametrize("variant", ["plain", "aux", "skip"])
def test_writes_results_figures_and_summary(quick_run: Run, variant: str) -> None:
    out = quick_run(variant)
    figures = [f"errors_step{s}.png" for s in QUICK.steps] + ["heatmap.png", "animation.gif", "diagnostics.md"]
    for name in ["results.csv", "results.json", "summary.md", *figures]:
        assert (out / name).stat().st_size > 0, name
    result = lp.ProbeResult.load(out)
    assert result.steps == list(QUICK.steps)
    every = QUICK.probe_every
    assert result.names == ["input", *(f"layer{k}" for k in range(every, QUICK.depth + 1, every))]
    text = (out / "summary.md").read_text()
    assert "## Checks" in text and "holds (core)" in text and "FAILS (core)" not in text
    assert f"001 Fig. 4b (probe error beside the model's own): layer{QUICK.depth}'s probe" in text  # computed note


def last_quarter(errors: dict[str, float]) -> float:
    """Mean error of the deepest quarter of the quick model's layers."""
    return range_mean(errors, QUICK.depth * 3 // 4 + 1, QUICK.depth)


def test_plain_deep_layers_stay_near_chance(quick_run: Run) -> None:
    result = lp.ProbeResult.load(quick_run("plain"))
    before, after = result.errors("test", step=0), result.errors("test")
    assert last_quarter(after) > 0.7
    assert last_quarter(after) > last_quarter(before) - 0.05  # training did not help them


def test_aux_heads_make_deep_layers_useful(quick_run: Run) -> None:
    result = lp.ProbeResult.load(quick_run("aux"))
    before, after = result.errors("test", step=0), result.errors("test")
    assert last_quarter(after) < 0.4
    assert last_quarter(after) < last_quarter(before) - 0.1


def test_skip_leaves_the_layers_below_it_behind(quick_run: Run) -> None:
    result = lp.ProbeResult.load(quick_run("skip"))
    before, after = result.errors("test", step=0), result.errors("test")
    skip, below = QUICK.skip_to, QUICK.skip_to - QUICK.probe_every
    assert before[f"layer{skip}"] < before[f"layer{below}"] - 0.2  # the second bump: the skip layer sees the input
    assert range_mean(after, 1, skip - 1) > range_mean(after, skip, QUICK.depth) + 0.2


def test_diagnostics_name_the_dead_segment_of_skip_and_none_for_aux(quick_run: Run) -> None:
    every, skip = QUICK.probe_every, QUICK.skip_to
    text = (quick_run("skip") / "diagnostics.md").read_text()
    assert f"dead segment: layer{every}-layer{skip - every} " in text
    assert "dead segment" not in (quick_run("aux") / "diagnostics.md").read_text()
