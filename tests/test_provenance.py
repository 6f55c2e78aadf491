"""Every result says what produced it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import nn

import linprobe as lp


def test_results_json_records_versions_settings_time_and_commit(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    monkeypatch.chdir(tmp_path)
    g = np.random.default_rng(0)
    x, y = g.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 2
    lp.probe(nn.Sequential(nn.Linear(4, 3)), (x, y), (x, y), cache_dir=tmp_path / "run", seed=7, l2_path=(1.0, 0.1),
             max_iter=50, progress=False, plot=False)
    found = json.loads((tmp_path / "run" / "results.json").read_text())["meta"]["provenance"]
    assert found["torch"] == torch.__version__ and found["linprobe"] == lp.__version__
    assert found["settings"]["seed"] == 7 and found["settings"]["l2_path"] == [1.0, 0.1]
    assert found["settings"]["max_iter"] == 50 and found["settings"]["layers"] == "all"
    assert found["threads"] == torch.get_num_threads() and found["device"] == "cpu" and found["seconds"] > 0
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert found["git"]["commit"] == head.strip() and found["git"]["folder"] == str(Path.cwd())
    assert found["started"].endswith("+00:00") and isinstance(found["argv"], list)
