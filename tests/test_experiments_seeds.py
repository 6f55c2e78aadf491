"""Same seed, same bits: a reproduction does not depend on the global random state, and leaves it as it was.

Several seeds (``reproduce(..., seeds=k)``): each seed's run equals the single run with that seed bit for bit, the
combined spread is the per-seed numbers' spread, and the verdict over seeds follows the checks in each seed.
"""
from __future__ import annotations

import csv
import statistics
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import one_thread

import linprobe as lp
from linprobe.cli import main
from linprobe.experiments import mnist_convnet, reproduce, resnet
from linprobe.experiments.report import Check, Headline, HeadRefit, Summary, verdict
from linprobe.experiments.seeds import combine, combine_checks, over_seeds, seed_folder, setting, spreads
from linprobe.models import MNIST_CONVNET_PROBES

N = 10_000  # made-up numbers' test set: a difference of 0.3 points near 1.5% counts


# ------------------------------------------------------------------ made-up numbers: no training, no data


def _convnet(seed: int, *, agree: bool) -> Summary:
    """A convnet summary from made-up numbers that agree with the paper (training improves every layer, a kink)
    or contradict it (training improves nothing), shifted a little per seed."""
    shift = 0.001 * seed
    untrained = {name: 0.05 + 0.04 * k + shift for k, name in enumerate(MNIST_CONVNET_PROBES)} | {
        "input": 0.08, "conv1_postact": 0.05 + shift}
    trained = ({name: 0.015 + shift for name in MNIST_CONVNET_PROBES} | {"input": 0.08, "fc1_preact": 0.03 + shift}
               if agree else untrained)
    model = 0.014 + shift
    head = mnist_convnet.head_refit(trained, model, N, 50_000)
    return Summary("mnist-convnet", mnist_convnet.CLAIM, [], mnist_convnet.checks(untrained, trained, model, N),
                   headline=Headline("test", N, 0.9, {"untrained": untrained, "trained": trained}, model_error=model,
                                     head=head))


def test_combined_verdict_over_seeds_every_most_none(tmp_path: Path) -> None:
    assert combine({s: _convnet(s, agree=True) for s in range(3)}, tmp_path / "a").verdict == "reproduced"
    assert combine({s: _convnet(s, agree=False) for s in range(3)}, tmp_path / "b").verdict == "not"
    most = combine({s: _convnet(s, agree=s != 2) for s in range(3)}, tmp_path / "c")
    assert most.verdict == "partly"  # the core claim holds in 2 of 3 seeds
    assert most.checks[1].seeds == (2, 3) and not most.checks[1].passed and most.checks[1].mostly
    assert "holds in 2 of 3 seeds (core)" in most.markdown() and "seed 2 FAILS" in most.checks[1].evidence
    few = combine({s: _convnet(s, agree=s == 0) for s in range(3)}, tmp_path / "d")
    assert few.verdict == "not" and few.checks[1].seeds == (1, 3)  # in 1 of 3: not most
    assert combine({s: _convnet(s, agree=s == 0) for s in range(2)}, tmp_path / "e").verdict == "not"  # half


def test_verdict_rule_with_seed_counts() -> None:
    def check(held: int, of: int, *, core: bool = True) -> Check:
        return Check("c", held == of, "", core=core, seeds=(held, of))

    assert verdict([check(3, 3)]) == "reproduced"
    assert verdict([check(3, 3), check(0, 3, core=False)]) == "partly"
    assert verdict([check(2, 3)]) == "partly" and verdict([check(1, 3)]) == "not" and verdict([check(2, 4)]) == "not"
    assert Check("c", False, "", core=True).markdown().startswith("FAILS (core)")  # one run: unchanged
    assert check(0, 3).markdown().startswith("FAILS in every seed (0 of 3) (core)")
    with pytest.raises(ValueError, match="passes only in all"):
        Check("c", True, "", seeds=(2, 3))
    with pytest.raises(ValueError, match="claims"):
        combine_checks({0: [check(1, 1)], 1: [Check("other", True, "", core=True, seeds=(1, 1))]})


def test_spread_table_csv_and_figure_from_made_up_numbers(tmp_path: Path) -> None:
    runs = {s: _convnet(s, agree=True) for s in (4, 5, 6)}
    summary = combine(runs, tmp_path)
    assert (tmp_path / "seeds.png").stat().st_size > 0 and summary.figures == ["seeds.png"]
    rows = list(csv.DictReader((tmp_path / "seeds.csv").open()))
    fc1 = {r["statistic"] + r["seed"]: float(r["error"]) for r in rows
           if (r["curve"], r["layer"]) == ("trained", "fc1_preact")}
    values = [0.034, 0.035, 0.036]
    assert [fc1["seed4"], fc1["seed5"], fc1["seed6"]] == pytest.approx(values)
    assert fc1["mean"] == pytest.approx(0.035) and fc1["sd"] == pytest.approx(statistics.stdev(values))
    assert (fc1["min"], fc1["max"]) == (pytest.approx(0.034), pytest.approx(0.036))
    table = summary.tables[1]
    head = [cell.strip() for cell in table.splitlines()[0].split("|")[1:-1]]
    assert head[:4] == ["trained: layer", "seed 4 (SE)", "seed 5 (SE)", "seed 6 (SE)"] and "| 3.4%-3.6%" in table
    text = summary.markdown()
    assert summary.name == "mnist-convnet over 3 seeds" and "seeds: 4, 5, 6" in text
    assert "Fig. 4b over 3 seeds, the probe at the head's input (fc1_postact)" in text
    assert "the model's own test error: seed 4 1.8% (SE 0.1)" in text
    with pytest.raises(ValueError, match="other curves"):
        spreads({0: runs[4].headline, 1: Headline("test", N, 0.9, {"trained": {}})})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="headline"):
        combine({0: Summary("x", "claim", [], [])}, tmp_path)


def test_head_refit_says_which_side_and_what_it_means() -> None:
    level = HeadRefit("pool", "test", 0.100, 0.101, N, probe_train=10_000, model_train=54_000)
    below = HeadRefit("pool", "test", 0.080, 0.100, N, probe_train=10_000, model_train=54_000)
    above = HeadRefit("fc1_postact", "test", 0.040, 0.020, 1000, probe_train=3500, model_train=3500)
    assert (level.side, below.side, above.side) == (0, -1, 1)
    assert "level within 2 SE" in level.discussion() and "10,000 training samples against the model's 54,000" in (
        level.discussion())
    assert "head is not at its optimum" in below.discussion() and "probe 8.0% (SE 0.3), model 10.0% (SE 0.3)" in (
        below.discussion())
    assert "held back by its L2" in above.discussion() and "the same 3,500 training samples" in above.discussion()


def test_cli_passes_seeds_and_rejects_zero(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    seen = {}

    def fake(name: str, out: Path, **kwargs: object) -> Summary:
        seen.update(kwargs, name=name)
        return Summary(name, "claim", [], [])

    monkeypatch.setattr("linprobe.experiments.reproduce", fake)
    assert main(["reproduce", "mnist-convnet", "--seeds", "3", "--out", str(tmp_path), "--quiet"]) == 0
    assert seen["seeds"] == 3 and seen["name"] == "mnist-convnet" and "seed-K" in capsys.readouterr().out
    assert main(["reproduce", "mnist-convnet", "--seeds", "0"]) != 0
    assert "--seeds: expected a positive integer" in capsys.readouterr().err


def test_full_runs_over_seeds_take_the_multi_seed_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[Path, int, bool, bool]] = []

    def fake(out: Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True,
             epochs: int | None = None, multi_seed: bool = False) -> Summary:
        calls.append((out, seed, quick, multi_seed))
        return _convnet(seed, agree=True)

    monkeypatch.setattr(mnist_convnet, "run", fake)
    summary = reproduce("mnist-convnet", tmp_path, seed=3, seeds=2, progress=False)
    assert calls == [(tmp_path / "seed-3", 3, False, True), (tmp_path / "seed-4", 4, False, True)]
    assert summary.verdict == "reproduced" and (tmp_path / "summary.md").read_text().startswith(
        "# mnist-convnet over 2 seeds") and (tmp_path / "seed-4" / "summary.md").is_file()
    calls.clear()
    reproduce("mnist-convnet", tmp_path / "q", quick=True, seeds=1, progress=False)
    reproduce("mnist-convnet", tmp_path / "m", seeds=1, multi_seed=False, progress=False)  # asked for the full one
    assert [c[2:] for c in calls] == [(True, False), (False, False)]
    with pytest.raises(ValueError, match="seeds must be"):
        reproduce("mnist-convnet", tmp_path, seeds=0)


def test_setting_picks_quick_full_or_multi_seed() -> None:
    def pick(quick: bool, multi_seed: bool, epochs: int | None = None) -> resnet.Settings:
        return setting(quick=resnet.QUICK, full=resnet.FULL, seeds=resnet.SEEDS, quick_run=quick,
                       multi_seed=multi_seed, epochs=epochs)

    assert pick(True, True) == resnet.QUICK and pick(False, False) == resnet.FULL and pick(False, True) == resnet.SEEDS
    assert pick(False, True, 4) == replace(resnet.SEEDS, epochs=4)
    assert resnet.SEEDS == replace(resnet.FULL, epochs=3)  # fewer epochs, the same data, probes and L2 path
    assert mnist_convnet.SEEDS == replace(mnist_convnet.FULL, monitor=False)  # the full run without the Monitor


def test_an_experiment_without_headline_numbers_stops_after_its_first_seed(tmp_path: Path) -> None:
    calls = []

    def run_one(folder: Path, seed: int) -> Summary:
        calls.append(seed)
        return Summary("x", "claim", [], [])

    with pytest.raises(ValueError, match="no headline numbers"):
        over_seeds(run_one, tmp_path, seeds=3)
    assert calls == [0]


# ------------------------------------------------------------------ quick runs (minutes)


@pytest.fixture(scope="module")
def convnet_seeds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Summary]]:
    """Two quick convnet seeds, 0 and 1, run under the global generator's state 1."""
    out = tmp_path_factory.mktemp("convnet-seeds")
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        yield out, reproduce("mnist-convnet", out, quick=True, progress=False, seeds=2)


@pytest.mark.slow  # minutes in all: `pytest -m "not slow"` leaves it out
def test_mnist_convnet_is_bit_identical_whatever_the_global_rng(tmp_path: Path,
                                                               convnet_seeds: tuple[Path, Summary]) -> None:
    with one_thread():
        torch.manual_seed(2)  # dropout draws from the global generator: seeded by reproduce, not by the caller
        before = torch.random.get_rng_state()
        summary = reproduce("mnist-convnet", tmp_path, quick=True, progress=False)
        assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is untouched
    for name in ("results.csv", "untrained/results.csv", "trained/results.csv", "monitor/results.csv"):
        assert (tmp_path / name).read_bytes() == (seed_folder(convnet_seeds[0], 0) / name).read_bytes(), name
    count = next(f for f in summary.findings if f.startswith("layers improved by training"))
    improved = int(count.split(": ")[1].split(" of ")[0])
    assert count.endswith("of 9 (the input cannot change)") and 0 <= improved <= 9
    assert any(f.startswith("Fig. 4b, the probe at the head's input (fc1_postact)") for f in summary.findings)


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


def _assert_spread_is_the_seeds(out: Path, seeds: list[int], curves: dict[str, dict[str, list[float]]]) -> None:
    """seeds.csv holds each seed's numbers and their mean, SD, min and max."""
    rows = list(csv.DictReader((out / "seeds.csv").open()))
    for label, layers in curves.items():
        for layer, values in layers.items():
            got = {r["statistic"] + r["seed"]: float(r["error"]) for r in rows
                   if (r["curve"], r["layer"]) == (label, layer)}
            assert [got[f"seed{s}"] for s in seeds] == values  # exactly the per-seed numbers
            assert got["mean"] == pytest.approx(statistics.fmean(values), abs=1e-15)
            assert got["sd"] == pytest.approx(statistics.stdev(values), abs=1e-15)
            assert (got["min"], got["max"]) == (min(values), max(values))


@pytest.mark.slow
def test_mnist_convnet_two_seeds_equal_single_runs_and_combine(tmp_path: Path,
                                                              convnet_seeds: tuple[Path, Summary]) -> None:
    multi, summary = convnet_seeds
    with one_thread():
        reproduce("mnist-convnet", tmp_path, quick=True, seed=1, progress=False)
    for name in ("results.csv", "untrained/results.csv", "trained/results.csv"):
        assert (seed_folder(multi, 1) / name).read_bytes() == (tmp_path / name).read_bytes(), name
    results = {s: lp.ProbeResult.load(seed_folder(multi, s)) for s in (0, 1)}
    assert results[0].errors("test") != results[1].errors("test")  # another seed, other numbers
    _assert_spread_is_the_seeds(multi, [0, 1], {
        "untrained": {k: [results[s].errors("test", step=0)[k] for s in (0, 1)] for k in MNIST_CONVNET_PROBES},
        "trained": {k: [results[s].errors("test")[k] for s in (0, 1)] for k in MNIST_CONVNET_PROBES}})
    _assert_counts_are_the_seeds(multi, [0, 1], summary)
    assert (multi / "seeds.png").stat().st_size > 0
    text = (multi / "summary.md").read_text()
    assert "# mnist-convnet over 2 seeds" in text and "seeds: 0, 1" in text and "| untrained: layer" in text
    assert (seed_folder(multi, 0) / "monitor").is_dir()  # quick runs keep their setting, the Monitor too


def _assert_counts_are_the_seeds(out: Path, seeds: list[int], summary: Summary) -> None:
    """Each combined check holds in as many seeds as the seeds' own summaries say; the verdict follows."""
    per_seed = [[line for line in (seed_folder(out, s) / "summary.md").read_text().splitlines()
                 if line.startswith(("- holds", "- FAILS"))] for s in seeds]
    assert [c.seeds for c in summary.checks] == [
        (sum(lines[k].startswith("- holds") for lines in per_seed), len(seeds)) for k in range(len(summary.checks))]
    assert summary.verdict == verdict(summary.checks)


@pytest.fixture(scope="module")
def resnet_seeds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Summary]]:
    """Two quick resnet seeds, 1 and 2, and the single quick run with seed 2 beside them."""
    out = tmp_path_factory.mktemp("resnet-seeds")
    with one_thread():
        summary = reproduce("resnet", out / "multi", quick=True, seed=1, seeds=2, progress=False)
        reproduce("resnet", out / "single2", quick=True, seed=2, progress=False)
    yield out, summary


@pytest.mark.slow
def test_resnet_seeds_equal_single_runs_and_spread(resnet_seeds: tuple[Path, Summary]) -> None:
    out, summary = resnet_seeds
    multi = out / "multi"
    assert not seed_folder(multi, 0).exists() and seed_folder(multi, 1).is_dir()
    for name in ("results.csv", "table_4a.md", "head/results.csv"):
        assert (seed_folder(multi, 2) / name).read_bytes() == (out / "single2" / name).read_bytes(), name
    results = {s: lp.ProbeResult.load(seed_folder(multi, s)) for s in (1, 2)}
    errors = {s: resnet.paper_errors(results[s]) for s in (1, 2)}
    _assert_spread_is_the_seeds(multi, [1, 2], {"trained": {k: [errors[s][k] for s in (1, 2)] for k in errors[1]}})
    _assert_counts_are_the_seeds(multi, [1, 2], summary)
    text = (multi / "summary.md").read_text()
    assert "# resnet over 2 seeds" in text and "Fig. 4b over 2 seeds, the probe at the head's input (pool)" in text
    assert "the model's own valid error: seed 1" in text


@pytest.mark.slow
def test_resnet_summary_discusses_the_head_refit(resnet_seeds: tuple[Path, Summary]) -> None:
    folder = seed_folder(resnet_seeds[0] / "multi", 1)
    head = lp.ProbeResult.load(folder / "head")
    assert head.names == [resnet.HEAD_INPUT] and head.layers[0].features_out == 256  # every channel's average
    text = (folder / "summary.md").read_text()
    probe = head.value(resnet.HEAD_INPUT, "test")
    assert "Fig. 4b, the probe at the head's input (pool) against the model itself on test: probe " in text
    assert f"probe {probe:.1%} (SE" in text and "2 SE of the gap" in text and "a ReLU and the average pool" in text

