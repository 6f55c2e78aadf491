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
    (["probe", "--model", "linprobe.models:mnist_convnet", "--distribute", "checkpoints", "--out", "x"],
     "probe has one model: use rows"),
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


def test_probe_command_reads_the_users_own_arrays(tmp_path, capsys):
    import numpy as np
    g = np.random.default_rng(0)
    x, y = g.normal(size=(90, 5)).astype(np.float32), np.arange(90) % 3
    x[:, :3] += 3 * np.eye(3)[y]
    np.savez(tmp_path / "data.npz", x=x, y=y)
    np.savez(tmp_path / "splits.npz", x_train=x[:60], y_train=y[:60], x_valid=x[60:75], y_valid=y[60:75],
             x_test=x[75:], y_test=y[75:])
    for name in ("data.npz", "splits.npz"):
        out = tmp_path / name.replace(".", "_")
        assert main(["probe", "--model", "torch.nn:Identity", "--data", str(tmp_path / name), "--out", str(out),
                     "--quiet"]) == 0
        rows = list(csv.DictReader(open(out / "results.csv")))
        test = [r for r in rows if r["split"] == "test" and r["metric"] == "top1_error"]
        assert len(test) == 1 and float(test[0]["value"]) < 0.2
    assert sum(1 for r in csv.DictReader(open(tmp_path / "splits_npz" / "results.csv")) if r["split"] == "test") > 0
    assert main(["probe", "--model", "torch.nn:Identity", "--data", str(tmp_path / "none.npz"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "none.npz does not exist" in capsys.readouterr().err


def splits_for_cli() -> dict:
    """A data function for --data test_cli:splits_for_cli."""
    import numpy as np
    g = np.random.default_rng(1)
    x, y = g.normal(size=(90, 4)).astype(np.float32), np.arange(90) % 2
    x[:, 0] += 3 * y
    return {"train": (x[:60], y[:60]), "test": (x[60:], y[60:])}


def test_probe_command_takes_a_data_function(tmp_path):
    assert main(["probe", "--model", "torch.nn:Identity", "--data", "test_cli:splits_for_cli", "--out",
                 str(tmp_path), "--quiet"]) == 0
    rows = [r for r in csv.DictReader(open(tmp_path / "results.csv")) if r["metric"] == "top1_error"]
    assert {r["split"] for r in rows} == {"train", "valid", "test"} and float(rows[-1]["value"]) < 0.1


def test_verbose_says_each_step_on_stderr(tmp_path, capsys):
    import numpy as np
    x, y = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32), np.arange(40) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y)
    argv = ["probe", "--model", "torch.nn:Identity", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "o"),
            "--quiet"]
    assert main(["-v", *argv]) == 0
    err = capsys.readouterr().err
    assert "linprobe: extracting the train split (" in err and "linprobe: wrote the results of 1 layer(s)" in err
    assert main(argv) == 0  # the second run reads the cache back, and by default says nothing
    assert capsys.readouterr().err == ""


def test_a_run_writes_its_config_and_reruns_from_it_exactly(tmp_path, capsys):
    import numpy as np
    g = np.random.default_rng(2)
    x, y = g.normal(size=(80, 4)).astype(np.float32), np.arange(80) % 2
    x[:, 0] += 2 * y
    np.savez(tmp_path / "d.npz", x=x, y=y)
    first = tmp_path / "first"
    assert main(["probe", "--model", "torch.nn:Identity", "--data", str(tmp_path / "d.npz"), "--out", str(first),
                 "--seed", "3", "--max-iter", "40", "--quiet"]) == 0
    config = (first / "run.toml").read_text()
    assert 'seed = 3' in config and 'max-iter = 40' in config and 'model = "torch.nn:Identity"' in config
    again = tmp_path / "again"
    assert main(["probe", "--config", str(first / "run.toml"), "--out", str(again)]) == 0  # flags override the file
    assert (again / "results.csv").read_text() == (first / "results.csv").read_text()
    (tmp_path / "bad.toml").write_text('sede = 3\n')
    capsys.readouterr()
    assert main(["probe", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown key(s) ['sede']" in capsys.readouterr().err
