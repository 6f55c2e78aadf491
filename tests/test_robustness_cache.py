"""Robustness, cache: killed extractions, damaged files, stale caches, a full disk, two writers."""
from __future__ import annotations

import errno
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import linprobe as lp
from linprobe.capture import cache as cache_module
from linprobe.capture.cache import CacheError, FeatureCache, ShardWriter, shard_name

FAST = {"l2_path": (1.0,), "progress": False}

SCRIPT = textwrap.dedent('''
    """The same model and data in the test and in a subprocess that the test kills mid-extraction."""
    import sys
    import time

    import torch
    from torch import nn

    import linprobe as lp


    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        x = torch.randn(40, 4)
        y = torch.arange(40) % 2
        x[:, 0] += 3 * y
        return model, (x[:24], y[:24]), (x[24:], y[24:])


    if __name__ == "__main__":
        model, train, valid = setup()
        model[0].register_forward_hook(lambda *a: time.sleep(0.3))  # slow enough to be killed mid-split
        lp.probe(model, train, valid, layers="all", cache_dir=sys.argv[1], batch_size=4, l2_path=(1.0,),
                 progress=False)
''')


def _fill(root: Path, n: int = 6) -> FeatureCache:
    """A cache with one complete split of two layers, written directly."""
    cache = FeatureCache(root, "k")
    cache.set_layers(["a", "b"], {"a": {"shape": [3], "reduction": {"kind": "none"}, "features": 3},
                                  "b": {"shape": [2], "reduction": {"kind": "none"}, "features": 2}})
    writer = cache.writer("train", n)
    writer.write({"a": torch.ones(n, 3), "b": torch.zeros(n, 2)}, torch.arange(n))
    cache.complete("train", "d", [writer.commit()])
    return cache


def test_a_killed_extraction_resumes_and_equals_an_uninterrupted_run(tmp_path) -> None:
    script = tmp_path / "killme.py"
    script.write_text(SCRIPT)
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(root.glob("features/*/valid/*.partial-*")):  # train is complete, valid half-written
        assert proc.poll() is None, f"the script ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "the script never started extracting valid"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    spec = importlib.util.spec_from_file_location("killme", script)
    killme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(killme)
    model, train, valid = killme.setup()
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    resumed = lp.probe(model, train, valid, layers="all", cache_dir=root, batch_size=4, **FAST)
    assert len(forwards) == 4  # valid only (16 samples in batches of 4): train was kept
    assert not list(root.glob("features/*/*/*.partial-*"))  # the dead process's partial shard is gone
    fresh = lp.probe(model, train, valid, layers="all", batch_size=4, **FAST)
    assert resumed.rows == fresh.rows


def test_a_truncated_npy_is_a_cache_error_that_says_what_to_delete(tmp_path) -> None:
    _fill(tmp_path)
    path = tmp_path / "train" / shard_name(0, 1) / "layer-a.npy"
    path.write_bytes(path.read_bytes()[:100])  # numpy itself refuses it, before any checksum
    with pytest.raises(CacheError, match=f"layer-a.npy cannot be read.*delete {tmp_path}"):
        FeatureCache(tmp_path, "k").features("train", "a")


def test_a_damaged_manifest_is_a_cache_error(tmp_path) -> None:
    _fill(tmp_path)
    (tmp_path / "manifest.json").write_text('{"version": 1, "key": ')
    with pytest.raises(CacheError, match=f"manifest.json cannot be read.*delete {tmp_path}"):
        FeatureCache(tmp_path, "k")


def _data(n: int = 12, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % 2
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += 3 * y
    return x, y


@pytest.mark.parametrize("change", ["model", "layers", "reduction", "data"])
def test_a_cache_made_for_something_else_is_never_reused(change: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    train, valid = _data(), _data(seed=1)
    options = {"layers": ["0"], "reduce": "none"}
    lp.probe(model, train, valid, cache_dir=tmp_path, **options, **FAST)
    assert len(forwards) == 3  # a discovering forward (4 samples), then one per split
    if change == "model":
        with torch.no_grad():
            model[0].weight[0, 0] += 1
    elif change == "layers":
        options["layers"] = ["0", "1"]
    elif change == "reduction":
        options["reduce"] = "subset:3"
    else:
        train = (train[0] + 1, train[1])
    lp.probe(model, train, valid, cache_dir=tmp_path, **options, **FAST)
    folders = list((tmp_path / "features").iterdir())
    assert len(folders) == (1 if change == "data" else 2)
    assert len(forwards) == (4 if change == "data" else 6)  # only the changed split, or everything again
    if change == "data":
        cached = FeatureCache(folders[0], folders[0].name).features("train", "0")
        np.testing.assert_allclose(cached, model[0](train[0]).detach().numpy(), rtol=1e-6)


def test_disk_full_mid_write_removes_the_partial_shard_and_says_so(tmp_path, monkeypatch) -> None:
    real_write, writes = ShardWriter.write_layer, []

    def write_then_fail(self: ShardWriter, *args: object) -> None:
        writes.append(1)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, *args)

    monkeypatch.setattr(ShardWriter, "write_layer", write_then_fail)
    with pytest.raises(CacheError, match=f"disk full while writing the train features into {tmp_path}/features/"):
        lp.probe(nn.Identity(), _data(), _data(seed=1), layers="input", cache_dir=tmp_path, batch_size=4, **FAST)
    (folder,) = (tmp_path / "features").iterdir()
    assert not list(folder.glob("train/*"))  # neither a partial nor a complete-looking shard
    assert not FeatureCache(folder, folder.name).manifest["splits"]


def test_disk_full_when_reserving_space_fails_before_any_write(tmp_path, monkeypatch) -> None:
    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(CacheError, match="disk full"):
        lp.probe(nn.Identity(), _data(), _data(seed=1), layers="input", cache_dir=tmp_path, **FAST)
    assert not list(tmp_path.glob("features/*/train/*"))


def test_a_second_writer_of_the_same_folder_gets_a_clear_error(tmp_path) -> None:
    with FeatureCache(tmp_path, "k").locked():
        with pytest.raises(CacheError, match=f"in use by another process \\(pid {os.getpid()}.*another cache_dir"):
            with FeatureCache(tmp_path, "k").locked():
                pass
    with FeatureCache(tmp_path, "k").locked():  # released on exit
        pass


def test_probe_refuses_a_cache_folder_another_process_holds(tmp_path) -> None:
    x, y = _data()
    lp.probe(nn.Identity(), (x, y), (x, y), layers="input", cache_dir=tmp_path, **FAST)
    (folder,) = (tmp_path / "features").iterdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(folder / ".lock")!r}, "r+")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(CacheError, match="in use by another process"):
            lp.probe(nn.Identity(), (x, y), (x, y), layers="input", cache_dir=tmp_path, **FAST)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not hasattr(os, "posix_fallocate") or not os.path.isdir("/proc/self/fd"), reason="Linux only")
def test_disk_full_for_the_fits_scratch_copy_is_a_clear_error_that_leaves_nothing(tmp_path, monkeypatch) -> None:
    """Extraction succeeds; reserving the fit's scratch file fails: a CacheError saying so, no scratch file left."""
    real = os.posix_fallocate

    def no_space_for_scratch(fd: int, offset: int, length: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".fit-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(cache_module.os, "posix_fallocate", no_space_for_scratch, raising=False)
    with pytest.raises(CacheError, match=r"disk full: the fit's standardised copy of the layers .* free some space"):
        lp.probe(nn.Identity(), _data(), _data(seed=1), layers="input", cache_dir=tmp_path, **FAST)
    assert not list(tmp_path.rglob(".fit-*"))
    assert list(tmp_path.glob("features/*/train/*"))  # the extracted features are kept for the next run
