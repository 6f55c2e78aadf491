"""Tests for linprobe.training.sweeps: finding checkpoints, a killed sweep resuming to the same table, adding a
checkpoint later, refusing a folder of another sweep, and the ``linprobe sweep`` command."""
from __future__ import annotations

import csv
import functools
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linprobe.cli import main
from linprobe.data.datasets import ArrayDataset, load_digits, standard_splits, stratified_split
from linprobe.models import mnist_convnet
from linprobe.report.results import ProbeResult
from linprobe.training import sweeps as sweep_module
from linprobe.training.sweeps import CheckpointError, SweepError, find_checkpoints, parse_step, sweep

LAYERS = ["conv2_postpool", "fc1_postact"]
FAST = {"layers": LAYERS, "max_iter": 10, "progress": False}
CHECKPOINTS = 10


# ------------------------------------------------------------------------------ finding checkpoints


@pytest.mark.parametrize("name, step", [
    ("step_00500.pt", 500), ("ckpt-500.pth", 500), ("epoch=3-step=1200.ckpt", 1200), ("global_step42.bin", 42),
    ("model-7.pt", 7), ("step12.pt", 12),
])
def test_step_from_file_name(name, step):
    assert parse_step(name) == step


@pytest.mark.parametrize("name, found", [("model.pt", "none"), ("epoch3_iter500.pt", "3, 500")])
def test_file_name_without_one_step_is_refused_with_the_fix(name, found):
    with pytest.raises(CheckpointError, match="cannot tell the step") as e:
        parse_step(name)
    assert f"numbers found: {found}" in str(e.value) and "checkpoints.json" in str(e.value)


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_glob_and_folder_sort_by_step(tmp_path):
    touch(tmp_path, "step_10.pt", "step_2.pt", "step_1.pt", "notes.txt")
    expected = [(1, tmp_path / "step_1.pt"), (2, tmp_path / "step_2.pt"), (10, tmp_path / "step_10.pt")]
    assert find_checkpoints(tmp_path) == expected
    assert find_checkpoints(str(tmp_path / "step_*.pt")) == expected


@pytest.mark.parametrize("manifest", [
    ("checkpoints.json", json.dumps({"300": "b.pt", "100": "a.pt"})),
    ("checkpoints.json", json.dumps([{"step": 300, "path": "b.pt"}, {"step": 100, "path": "a.pt"}])),
    ("checkpoints.csv", "step,path\n300,b.pt\n100,a.pt\n"),
])
def test_manifest_maps_steps_to_files(tmp_path, manifest):
    touch(tmp_path, "a.pt", "b.pt")
    name, text = manifest
    (tmp_path / name).write_text(text)
    expected = [(100, tmp_path / "a.pt"), (300, tmp_path / "b.pt")]
    assert find_checkpoints(tmp_path / name) == expected
    assert find_checkpoints(tmp_path) == expected  # a folder with a manifest uses it


def test_manifest_naming_a_missing_file_is_refused(tmp_path):
    (tmp_path / "checkpoints.json").write_text(json.dumps({"1": "gone.pt"}))
    with pytest.raises(CheckpointError, match="missing checkpoint file.*gone.pt"):
        find_checkpoints(tmp_path)


def test_two_files_claiming_one_step_are_refused(tmp_path):
    touch(tmp_path, "step_5.pt", "ckpt-5.pth")
    with pytest.raises(CheckpointError, match="both claim step 5") as e:
        find_checkpoints(tmp_path)
    assert "ckpt-5.pth" in str(e.value) and "step_5.pt" in str(e.value) and "manifest" in str(e.value)


def test_nothing_to_sweep_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no file matches"):
        find_checkpoints(str(tmp_path / "*.pt"))
    with pytest.raises(CheckpointError, match="holds no checkpoint files"):
        find_checkpoints(tmp_path)


# ------------------------------------------------------------------------------ a saved run


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file: magic, big-endian dimensions, data."""
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A folder with real digits upsampled to 28x28 as IDX files (160 train, 30 test) and CHECKPOINTS checkpoints
    of the MNIST convnet, two SGD minibatches apart, named step_00000.pt, step_00002.pt, ..."""
    root = tmp_path_factory.mktemp("run")
    digits = load_digits()
    images = (F.interpolate(digits.x.float(), size=28, mode="bilinear") * 255).round() / 255
    train, test = stratified_split(ArrayDataset(images, digits.y), [160, 30], seed=0)
    for prefix, part in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", (part.x[:, 0] * 255).round().numpy().astype(np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", part.y.numpy().astype(np.uint8))
    x, y = train.x, train.y
    model = mnist_convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for k in range(CHECKPOINTS):
        torch.save(model.state_dict(), root / f"step_{2 * k:05d}.pt")
        for i in (2 * k, 2 * k + 1):
            batch = slice(32 * i % 128, 32 * i % 128 + 32)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad(), loss.backward(), opt.step()
    return root


def splits(run: Path) -> dict:
    return standard_splits(f"idx:{run}")


def read_table(folder: Path) -> list[dict[str, str]]:
    with (folder / "results.csv").open() as f:
        return list(csv.DictReader(f))


def recorded(out: Path) -> list[Path]:
    return sorted((out / "steps").glob(f"*/{sweep_module.RECORD}"))


def sweep_argv(run: Path, out: Path) -> list[str]:
    return ["sweep", "--model", "linprobe.models:mnist_convnet", "--checkpoints", str(run / "*.pt"),
            "--data", f"idx:{run}", "--layers", *LAYERS, "--max-iter", "10", "--out", str(out), "--quiet",
            "--no-figures"]


def test_killed_sweep_resumes_to_the_same_table(run, tmp_path, capsys):
    """A sweep killed (SIGKILL) after a few checkpoints, then rerun, gives the table of an uninterrupted sweep:
    recorded steps are read back, not recomputed, and the warm-start chain goes through the saved probes."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(sweep_argv(run, whole)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as in here
    killed = subprocess.Popen([sys.executable, "-m", "linprobe", *sweep_argv(run, resumed)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(recorded(resumed)) < 3 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = {p: p.stat().st_mtime_ns for p in recorded(resumed)}
    assert 3 <= len(before) < CHECKPOINTS, killed.stderr.read().decode()
    assert main(sweep_argv(run, resumed)) == 0
    assert len(recorded(resumed)) == CHECKPOINTS and f"({CHECKPOINTS} checkpoints)" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # done steps were not probed again
    a, b = read_table(whole), read_table(resumed)
    assert [(r["step"], r["layer"], r["split"], r["metric"]) for r in a] == [
        (r["step"], r["layer"], r["split"], r["metric"]) for r in b]
    assert {r["step"] for r in a} == {str(2 * k) for k in range(CHECKPOINTS)}
    np.testing.assert_allclose([float(r["value"]) for r in b], [float(r["value"]) for r in a], rtol=0, atol=1e-6)


def test_checkpoint_added_later_costs_only_its_own_probe(run, tmp_path, monkeypatch):
    data = splits(run)
    for k in (0, 6, 12, 18):  # copies, whose files this test may touch
        shutil.copy2(run / f"step_{k:05d}.pt", tmp_path)
    chosen = find_checkpoints(tmp_path)
    out = tmp_path / "sweep"
    first = sweep(mnist_convnet, chosen[:2] + chosen[3:], data["train"], data["valid"], out=out, figures=False, **FAST)
    assert first.steps == [0, 6, 18]
    caches = set((out / "features").iterdir())
    records = {p: p.stat().st_mtime_ns for p in recorded(out)}
    calls, real_probe = [], sweep_module.probe
    counted = functools.wraps(real_probe)(lambda *a, **k: calls.append(k["step"]) or real_probe(*a, **k))
    monkeypatch.setattr(sweep_module, "probe", counted)
    second = sweep(mnist_convnet, chosen, data["train"], data["valid"], out=out, **FAST)
    assert calls == [12] and second.steps == [0, 6, 12, 18]
    assert {Path(f).name for f in second.meta["figures"].values()} >= {"heatmap.png", "animation.gif", "diagnostics.md"}
    assert all(Path(f).is_file() for f in second.meta["figures"].values())
    assert len(set((out / "features").iterdir()) - caches) == 1  # one new feature cache: step 12's
    assert all(p.stat().st_mtime_ns == t for p, t in records.items())
    assert [r for r in second.rows if r.step != 12] == first.rows
    assert ProbeResult.load(out).rows == second.rows  # the combined table on disk

    os.utime(chosen[0][1], ns=(time.time_ns(), time.time_ns()))  # a replaced checkpoint is probed again
    calls.clear()
    with pytest.warns(UserWarning, match="checkpoint of step 0 .* changed"):
        sweep(mnist_convnet, chosen, data["train"], data["valid"], out=out, figures=False, **FAST)
    assert calls == [0]


def test_folder_of_another_sweep_is_refused(run, tmp_path):
    data = splits(run)
    chosen = find_checkpoints(run)[:1]
    out = tmp_path / "sweep"
    sweep(mnist_convnet, chosen, data["train"], data["valid"], out=out, figures=False, **FAST)
    with pytest.raises(SweepError, match=r"other settings \(layers: .*another output folder"):
        sweep(mnist_convnet, chosen, data["train"], data["valid"], out=out, figures=False, **{**FAST, "layers": "all"})
    with pytest.raises(SweepError, match=r"data: "):
        sweep(mnist_convnet, chosen, data["valid"], data["train"], out=out, figures=False, **FAST)
    with pytest.raises(SweepError, match=r"model: "):
        sweep("linprobe.models:small_resnet", chosen, data["train"], data["valid"], out=out, figures=False, **FAST)
    with pytest.raises(TypeError, match="cache_dir"):
        sweep(mnist_convnet, chosen, data["train"], data["valid"], out=out, cache_dir=out, **FAST)


@pytest.mark.parametrize("extra, message", [
    (["--checkpoints", "nowhere/*.pt"], "no file matches 'nowhere/*.pt'"),
    (["--checkpoints", "dup"], "both claim step 5"),
    (["--checkpoints", "dup", "--model", "linprobe.models:nope"], "cannot load model factory"),
    (["--checkpoints", "bad"], "cannot tell the step of checkpoint 'final.pt'"),
])
def test_sweep_command_wrong_arguments_exit_2_with_one_line(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    touch(tmp_path / "dup", "step_5.pt", "ckpt-5.pth")
    touch(tmp_path / "bad", "final.pt")
    assert main(["sweep", "--model", "linprobe.models:mnist_convnet", "--out", "x", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: linprobe sweep") and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_sweep_command_without_checkpoints_shows_usage(capsys):
    assert main(["sweep", "--model", "linprobe.models:mnist_convnet", "--out", "x"]) == 2
    assert "the following arguments are required: --checkpoints" in capsys.readouterr().err


# ------------------------------------------------------------------------------ loading checkpoints


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},  # a LightningModule's self.model
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # saved from DistributedDataParallel
    lambda sd: {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},  # saved from torch.compile
    lambda sd: {"state_dict": {**{f"net.{k}": v for k, v in sd.items()}, "loss.weight": torch.ones(1)}},
])
def test_checkpoints_under_a_common_prefix_load_exactly(wrap, tmp_path):
    saved = mnist_convnet(seed=1)
    torch.save(wrap(saved.state_dict()), tmp_path / "step_1.pt")
    model = mnist_convnet(seed=0)
    sweep_module.load_checkpoint(model, tmp_path / "step_1.pt", "convnet")
    for (name, a), b in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_model_names_the_keys(tmp_path):
    torch.save({"model.other.weight": torch.zeros(2)}, tmp_path / "step_1.pt")
    with pytest.raises(CheckpointError, match=r"(?s)cannot load checkpoint .*step_1\.pt.* into convnet: .*Missing key"):
        sweep_module.load_checkpoint(mnist_convnet(seed=0), tmp_path / "step_1.pt", "convnet")


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is not None, reason="safetensors is installed")
def test_a_safetensors_checkpoint_without_the_package_says_what_to_install(tmp_path):
    (tmp_path / "step_1.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="pip install safetensors"):
        sweep_module.load_checkpoint(mnist_convnet(seed=0), tmp_path / "step_1.safetensors", "convnet")


def test_the_sweep_puts_each_loaded_model_on_its_device(tmp_path):
    torch.save(mnist_convnet(seed=1).state_dict(), tmp_path / "step_1.pt")
    name, load = sweep_module._model_loader(functools.partial(mnist_convnet, seed=0), device="meta")
    assert {p.device.type for p in load(tmp_path / "step_1.pt").parameters()} == {"meta"}
    assert name == "linprobe.models:mnist_convnet(seed=0)"  # a partial is named without its address


@pytest.mark.parametrize("device, message", [("nonsense", "expected a torch device such as cpu"),
                                             ("cuda", "CUDA is not available on this machine")])
def test_device_option_is_checked_up_front(device, message, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["probe", "--model", "linprobe.models:mnist_convnet", "--out", "x", "--device", device]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_lists_safetensors_checkpoints_too(tmp_path):
    touch(tmp_path, "step_20.safetensors", "step_3.pt", "readme.md")
    assert find_checkpoints(tmp_path) == [(3, tmp_path / "step_3.pt"), (20, tmp_path / "step_20.safetensors")]


def test_a_sweep_fits_every_task_and_refuses_other_labels_on_resume(run, tmp_path):
    from linprobe.fit.tasks import control_task

    data = splits(run)
    chosen = find_checkpoints(run)[:2]
    out = tmp_path / "sweep"
    tasks = {"odd": lambda y: y % 2, "control": control_task()}
    result = sweep(mnist_convnet, chosen, data["train"], data["valid"], out=out, figures=False, tasks=tasks, **FAST)
    steps = [step for step, _ in chosen]
    for task in ("main", "odd", "control"):
        assert sorted({r.step for r in result.rows if r.task == task}) == steps
    assert set(result.errors("valid", "selectivity", steps[-1], task="control")) == set(LAYERS)
    again = sweep(mnist_convnet, chosen, data["train"], data["valid"], out=out, figures=False, tasks=tasks, **FAST)
    assert [(r.task, r.value) for r in again.rows] == [(r.task, r.value) for r in result.rows]  # read back
    other = ArrayDataset(data["train"].x, (data["train"].y + 1) % 10)
    with pytest.raises(SweepError, match=r"targets: "):  # the same inputs with other labels: not this sweep
        sweep(mnist_convnet, chosen, other, data["valid"], out=out, figures=False, tasks=tasks, **FAST)
