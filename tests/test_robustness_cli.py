"""Robustness, command line: every wrong argument gives the usage and one line, --help works on every command."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from linprobe import cli
from linprobe.cli import main

MODEL = "linprobe.models:mnist_convnet"


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: command"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["layers"], "the following arguments are required: --model"),
    (["layers", "--model", MODEL, "--input-shape", "1,x,28"], "comma-separated positive integers"),
    (["layers", "--model", MODEL, "--input-shape", "1,3,3"], "cannot run on an input of shape (1, 3, 3)"),
    (["layers", "--model", "linprobe.cli:load_model"], "cannot be called without arguments"),
    (["layers", "--model", "linprobe.cli:UsageError"], "returned UsageError, not a torch.nn.Module"),
    (["probe", "--model", MODEL], "the following arguments are required: --out"),
    (["probe", "--model", MODEL, "--out", "x", "--budget", "0"], "--budget: expected a positive integer, got '0'"),
    (["probe", "--model", MODEL, "--out", "x", "--batch-size", "-4"], "--batch-size: expected a positive integer"),
    (["probe", "--model", MODEL, "--out", "x", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["probe", "--model", MODEL, "--out", "x", "--checkpoint", "junk.pt"], "cannot load checkpoint 'junk.pt'"),
    (["probe", "--model", MODEL, "--out", "x", "--checkpoint", "other.pt"], "Missing key(s) in state_dict"),
    (["reproduce"], "name an experiment, or pass --list"),
    (["reproduce", "nope"], "unknown experiment 'nope'"),
    (["reproduce", "toy", "--steps", "0"], "--steps: expected a positive integer"),
    (["reproduce", "depth", "--depths", "0"], "--depths: expected a positive integer"),
    (["reproduce", "toy", "--depths", "8"], "experiment 'toy' takes no option(s) ['depths']"),
])
def test_wrong_arguments_give_the_usage_and_one_line(argv, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")  # a state dict of another model
    assert main(argv) == 2
    err = capsys.readouterr().err
    command = argv[0] if argv and argv[0] in ("layers", "probe", "reproduce") else ""
    assert err.startswith(f"usage: linprobe {command}".rstrip()) and "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"linprobe {command}".rstrip() + ": error: ") and message in last
    assert err.count(": error: ") == 1


@pytest.mark.parametrize("argv", [["--help"], ["layers", "--help"], ["probe", "--help"], ["reproduce", "-h"]])
def test_help_on_every_command(argv, capsys) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: linprobe") and "options:" in out


def test_an_unexpected_failure_is_one_line_with_status_1_and_traceback_on_request(monkeypatch, capsys) -> None:
    def boom(args: object) -> None:
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(cli, "_run", boom)
    assert main(["layers", "--model", MODEL]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "linprobe layers: error: RuntimeError: first line second line (rerun with --traceback for details)"
    with pytest.raises(RuntimeError, match="first line"):
        main(["--traceback", "layers", "--model", MODEL])


def test_interrupted_command_exits_130(monkeypatch, capsys) -> None:
    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert main(["probe", "--model", MODEL, "--out", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_the_installed_entry_point_prints_no_traceback(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "linprobe", "layers", "--model", "nodots"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == ("linprobe layers: error: --model must look like package.module:function, "
                                            "got 'nodots'")
