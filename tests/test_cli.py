from __future__ import annotations

import csv

import pytest
import torch

import linprobe as lp
from linprobe.cli import main


def test_layers_in_execution_order(capsys):
    assert main(["layers", "--model", "linprobe.models:mnist_convnet", "--input-shape", "1,28,28"]) == 0
    names = capsys.readouterr().out.split()
    assert names[:3] == ["input", "conv1_preact", "conv1_postact"] and names[-1] == "logits"
    assert names.count("input") == 1


@pytest.mark.parametrize("argv, message", [
    (["probe", "--model", "nodots", "--out", "x"], "package.module:function"),
    (["probe", "--model", "linprobe.models:nope", "--out", "x"], "cannot load model factory"),
    (["probe", "--model", "linprobe.models:mnist_convnet", "--data", "cifar", "--out", "x"], "unknown dataset spec 'cifar'"),
    (["probe", "--model", "linprobe.models:mnist_convnet", "--layers", "conv9", "--limit", "50", "--out", "x"],
     "closest: conv2_preact"),
    (["probe", "--model", "linprobe.models:mnist_convnet", "--checkpoint", "missing.pt", "--out", "x"], "does not exist"),
])
def test_bad_arguments_give_one_line_and_usage(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: linprobe") and message in err and "Traceback" not in err


def test_probe_command_writes_table_and_figure(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["probe", "--model", "linprobe.models:mnist_convnet", "--data", "mnist", "--limit", "300",
            "--layers", "input", "conv1_postact", "logits", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("layer")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["layer"] for r in rows} == {"input", "conv1_postact", "logits"}
    assert (out / "errors.png").exists() and (out / "probes" / "params.pt").exists()


def test_probe_command_takes_max_iter_and_names_unconverged_layers(tmp_path, capsys):
    argv = ["probe", "--model", "linprobe.models:mnist_convnet", "--data", "mnist", "--limit", "300",
            "--layers", "input", "--out", str(tmp_path / "run"), "--quiet", "--max-iter", "2"]
    with pytest.warns(UserWarning, match="max_iter=2"):
        assert main(argv) == 0
    assert "input: not converged: l2=" in capsys.readouterr().out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"linprobe {lp.__version__} (torch {torch.__version__})"
