"""torch.distributed: two gloo processes on this machine give the single-process results (CPU; NCCL is untested)."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import one_thread
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import linprobe as lp
from linprobe import distributed
from linprobe.capture.cache import FeatureCache
from linprobe.cli import main
from linprobe.data.inputs import Split
from linprobe.fit.solvers import fit_logistic

pytestmark = pytest.mark.slow  # minutes in all: `pytest -m "not slow"` leaves it out

WORLD = 2
# 300 train rows in 5 batches (3 for rank 0, 2 for rank 1); valid's one batch leaves rank 1 without a shard;
# the conv layer (16 x 8 x 8 = 1024 features > 2 x 300 rows) is fitted in its row space.
OPTIONS = {"batch_size": 64, "l2_path": (1e0, 1e-1, 1e-2), "progress": False, "plot": False}


def tiny_net() -> nn.Module:
    """Conv, pool, two linear layers: 10 tappable layers of widths 64 to 1024 on 8 x 8 digits."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def _splits() -> dict[str, lp.ArrayDataset]:
    return lp.standard_splits("digits", limit=300)


def _odd(y: torch.Tensor) -> torch.Tensor:
    return y % 2


def _tasks(s: dict[str, lp.ArrayDataset]) -> dict[str, object]:
    """A second label set, a control task and a regression target (the mean ink): every kind of task, sharded."""
    ink = {name: data.x.flatten(1).mean(1) for name, data in s.items()}
    return {"odd": _odd, "control": lp.control_task(), "ink": lp.values(**ink)}


def _worker(rank: int, root: str) -> None:
    """One rank: probe with both work splits, then live probes in a DDP loop; saves what it got."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        s = _splits()
        by_rows = lp.probe(tiny_net(), s["train"], s["valid"], s["test"], cache_dir=f"{root}/two", tasks=_tasks(s),
                           **OPTIONS)
        by_layers = lp.probe(tiny_net(), s["train"], s["valid"], s["test"], cache_dir=f"{root}/two",
                             out_dir=f"{root}/two-layers", distribute="layers", tasks=_tasks(s), **OPTIONS)
        online, table = _online(s)
        X, y = _problem()
        rows = distributed.shard_range(len(y), rank, WORLD)
        fit = fit_logistic(X[rows.start:rows.stop], y[rows.start:rows.stop], 4, 1e-2, tol=1e-7, sharded=True)
        torch.save({"rows": (by_rows.to_csv(), by_rows.probes.state_dict()),
                    "layers": (by_layers.to_csv(), by_layers.probes.state_dict()),
                    "online": (online, table), "solver": (fit.weights.W, fit.weights.b)}, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    """301 rows (an uneven split) of a four-class problem that no hyperplane separates."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(301, 20, generator=g)
    return X, (X[:, :4] + torch.randn(301, 4, generator=g)).argmax(1)


def _online(s: dict[str, lp.ArrayDataset]) -> tuple[dict[str, torch.Tensor], str]:
    """Train the net with DDP on this rank's half of train, live probes alongside; their weights and valid table."""
    model = tiny_net()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    rows = distributed.shard_range(len(s["train"]), distributed.rank(), distributed.world_size())
    with lp.OnlineProbes(model, ["1", "4", "6"], num_classes=10, lr=1e-2) as probes:
        for batch in Split.of(s["train"]).shard(rows).batches(30):
            loss = F.cross_entropy(ddp(batch.inputs), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            probes.step(batch.labels)
        return probes.state_dict(), probes.evaluate(s["valid"]).to_csv()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The two-process job and the same probe in this single process."""
    root = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(root),), nprocs=WORLD)
    s = _splits()
    with one_thread():  # as each rank
        single = lp.probe(tiny_net(), s["train"], s["valid"], s["test"], cache_dir=root / "one", tasks=_tasks(s),
                          **OPTIONS)
    return {"root": root, "ranks": [torch.load(root / f"rank{r}.pt") for r in range(WORLD)], "single": single}


def _rows(text: str) -> list[tuple[str, str, str, float]]:
    return [(f"{r['task']}/{r['layer']}", r["split"], r["metric"], float(r["value"]))
            for r in csv.DictReader(io.StringIO(text))]


def _cache(folder: Path) -> FeatureCache:
    (root,) = (folder / "features").iterdir()
    return FeatureCache(root, root.name)


def test_unknown_work_split_is_refused() -> None:
    with pytest.raises(ValueError, match="distribute must be 'rows' or 'layers'"):
        lp.probe(tiny_net(), (torch.zeros(4, 1, 8, 8), [0, 1, 0, 1]), (torch.zeros(2, 1, 8, 8), [0, 1]),
                 distribute="checkpoints")


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shard_ranges_cover_every_row_once(world: int) -> None:
    for n in range(40):
        for block in (1, 3, 64):
            shares = [distributed.shard_range(n, r, world, block) for r in range(world)]
            assert [i for share in shares for i in share] == list(range(n))
            assert all(share.start % block == 0 for share in shares if len(share))
            assert len(shares[0]) or n == 0  # rank 0 always has rows, so it can choose the reductions


def test_shards_of_a_split_cover_it_in_order_and_keep_a_loaders_batching() -> None:
    x, y = torch.arange(11.0)[:, None], torch.arange(11) % 3
    for data in ((x, y), DataLoader(TensorDataset(x, y), batch_size=4)):
        split = Split.of(data)
        size = split.batch_size(4)
        shards = [split.shard(distributed.shard_range(len(split), r, 3, size)) for r in range(3)]
        assert [len(b) for b in shards] == [4, 4, 3] and [b.batch_size(4) for b in shards] == [4] * 3
        got = [b for shard in shards for b in shard.batches(size)]
        assert torch.cat([b.inputs for b in got])[:, 0].tolist() == list(range(11))
        assert torch.equal(torch.cat([b.labels for b in got]), y)
    with pytest.raises(ValueError, match="batch_sampler cannot be split"):
        loader = DataLoader(TensorDataset(x, y), batch_sampler=[[0, 1], [2]])
        Split.of(loader).shard(range(0, 2))


def test_two_rank_cache_equals_one_rank_cache_bit_for_bit(runs: dict) -> None:
    two, one = _cache(runs["root"] / "two"), _cache(runs["root"] / "one")
    assert len(two.manifest["splits"]["train"]["shards"]) == 2 and len(two.manifest["splits"]["valid"]["shards"]) == 1
    assert two.layers == one.layers
    for split in ("train", "valid", "test"):
        for layer in one.manifest["order"]:
            assert np.array_equal(two.features(split, layer), one.features(split, layer))
            assert np.array_equal(two.features(split, layer, rows=slice(10, 50)), one.features(split, layer)[10:50])


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool(torch.linalg.vector_norm(a - b) <= rel * torch.linalg.vector_norm(b) + 1e-6)


def test_sharded_solver_matches_single_process_fit(runs: dict) -> None:
    """Equal to the float32 resolution of the objective: asked for 1e-7, both fits stop where the loss no longer
    resolves progress (a float64 max gradient of ~4e-6 on this problem), which leaves ~1e-4 in the unpenalised bias."""
    X, y = _problem()
    want = fit_logistic(X, y, 4, 1e-2, tol=1e-7).weights
    for W, b in (r["solver"] for r in runs["ranks"]):
        assert _close(W, want.W, 1e-4) and _close(b, want.b, 1e-3)


def test_row_sharded_probe_matches_single_process(runs: dict) -> None:
    """The same L2s and errors; weights equal to the solver's tolerance (a max gradient of 1e-5, so ~1e-5 / l2 in a
    weight and more in the unpenalised bias: the summation order differs between one and two processes, as it does
    between thread counts); the solver itself agrees to 1e-4 at a tight tolerance (test above)."""
    single = runs["single"]
    table, params = runs["ranks"][0]["rows"]
    for key, value in single.probes.state_dict().items():
        assert _close(params[key], value, 2e-2), key
    for got, want in zip(_rows(table), _rows(single.to_csv()), strict=True):
        rel = {"cross_entropy": 2e-3, "r2": 1e-4, "mse": 1e-4}.get(got[2], 0.0)  # sums in another order
        assert got[:3] == want[:3] and got[3] == pytest.approx(want[3], rel=rel, abs=1e-6), got


def test_layer_split_gives_the_single_process_table(runs: dict) -> None:
    table, params = runs["ranks"][0]["layers"]
    assert _rows(table) == _rows(runs["single"].to_csv())
    assert all(torch.equal(params[k], v) for k, v in runs["single"].probes.state_dict().items())
    assert (runs["root"] / "two-layers" / "results.csv").read_text() == table


def test_every_rank_returns_the_same_result(runs: dict) -> None:
    first, second = runs["ranks"]
    for part in ("rows", "layers"):
        assert first[part][0] == second[part][0]
        assert all(torch.equal(v, second[part][1][k]) for k, v in first[part][1].items())


def test_live_probes_in_a_ddp_loop_stay_in_sync(runs: dict) -> None:
    first, second = (r["online"] for r in runs["ranks"])
    assert first[0].keys() == second[0].keys() and len(first[0]) > 0
    assert all(torch.equal(v, second[0][k]) for k, v in first[0].items())
    assert first[1] == second[1]


def test_torchrun_cli_matches_one_process(tmp_path: Path) -> None:
    args = ["probe", "--model", "test_distributed:tiny_net", "--data", "digits", "--limit", "100", "--batch-size",
            "32", "--layers", "0", "4", "6", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "linprobe", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    caches = _cache(tmp_path / "two"), _cache(tmp_path / "one")
    for layer in caches[1].manifest["order"]:
        assert np.array_equal(caches[0].features("train", layer), caches[1].features("train", layer))
    two, one = (_rows((tmp_path / f / "results.csv").read_text()) for f in ("two", "one"))
    assert [r[:3] for r in two] == [r[:3] for r in one]
    # the default path reaches l2 = 1e-5, where the optimum is flat and loosely determined: errors within a sample
    sample = {split: 1.01 / caches[1].manifest["splits"][split]["rows"] for split in ("train", "valid", "test")}
    assert all(abs(a[3] - b[3]) <= sample[a[1]] for a, b in zip(two, one) if a[2] == "top1_error")


def _sweep_worker(rank: int, root: str) -> None:
    """One rank of a sweep whose checkpoints are shared out between the ranks."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store-sweep", rank=rank, world_size=WORLD)
    try:
        s = _splits()
        lp.sweep(tiny_net, f"{root}/ckpt", s["train"], s["valid"], out=f"{root}/two-sweep", layers=["4", "6"],
                 distribute="checkpoints", figures=False, progress=False, l2_path=(1e-1,))
    finally:
        dist.destroy_process_group()


def test_sweep_split_by_checkpoints_matches_one_process(tmp_path: Path) -> None:
    """Each rank probes its own share of five checkpoints alone; the table equals a one-process sweep's up to
    the warm starts (a rank's first checkpoint starts cold), i.e. within the solver's tolerance."""
    (tmp_path / "ckpt").mkdir()
    for step in range(5):
        net = tiny_net()
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1 + 0.1 * step)
        torch.save(net.state_dict(), tmp_path / "ckpt" / f"step_{step}.pt")
    mp.spawn(_sweep_worker, args=(str(tmp_path),), nprocs=WORLD)
    s = _splits()
    with one_thread():
        one = lp.sweep(tiny_net, tmp_path / "ckpt", s["train"], s["valid"], out=tmp_path / "one-sweep",
                       layers=["4", "6"], figures=False, progress=False, l2_path=(1e-1,))
    two = lp.ProbeResult.load(tmp_path / "two-sweep")
    assert two.steps == one.steps == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "two-sweep" / "steps").iterdir()) == ["0", "1", "2", "3", "4"]
    a, b = _rows(two.to_csv()), _rows(one.to_csv())
    assert [r[:3] for r in a] == [r[:3] for r in b]
    assert all(abs(x[3] - y[3]) <= 1.01 / 60 for x, y in zip(a, b) if x[2] == "top1_error")  # a valid sample
