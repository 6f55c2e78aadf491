"""Provenance: what produced a result (versions, machine, settings, command line, time, git commit), stored in
``results.json`` so that a table can be traced and rerun."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch


def provenance(settings: Mapping[str, Any], *, started: float, device: torch.device | str) -> dict[str, Any]:
    """The record of one run: ``settings`` are the arguments that shape its numbers (made JSON-ready), ``started``
    its ``time.time()`` at the start."""
    from linprobe import __version__

    return {
        "linprobe": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
        "threads": torch.get_num_threads(), "settings": json.loads(json.dumps(dict(settings), default=_name)),
        "argv": list(sys.argv), "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3), "git": git_state(Path.cwd()),
    }


def _name(value: Any) -> str:
    """A readable stand-in for what JSON cannot hold (a module type, a function, a dataclass)."""
    return getattr(value, "__qualname__", None) or repr(value)


def git_state(folder: Path) -> dict[str, Any] | None:
    """The commit checked out in ``folder`` and whether the work tree differs from it; None outside a git
    checkout or without git."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip()), "folder": str(folder)}
