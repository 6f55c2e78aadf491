"""Probes: softmax(W h + b) on the frozen features of one layer, and a bank of them over many layers.

A ``LinearProbe`` holds everything needed to read a layer's raw output: the reduction, the
training-split standardisation and the weights. Its ``forward`` detaches its input, so no caller
can send a gradient into the model through it.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from linprobe.atomic import atomic_write_bytes, atomic_write_text
from linprobe.capture.reduce import Reduction, Standardizer, reduction_from_dict
from linprobe.fit.solvers import DEFAULT_L2_PATH, FitSettings, FittedPath, LinearWeights, PathResult, fit_paths
from linprobe.report.results import MAIN


class LinearProbe(nn.Module):
    """A linear map on one layer's (reduced, standardised) features: a multinomial logistic regression
    (``kind="classes"``, outputs are logits) or a ridge regression (``kind="values"``, outputs are predictions),
    fitted for the label set ``task``."""

    mean: torch.Tensor  # buffers (register_buffer), declared for the type checker
    std: torch.Tensor

    def __init__(self, layer: str, reduction: Reduction, in_features: int, num_classes: int, *,
                 kind: str = "classes", task: str = MAIN) -> None:
        super().__init__()
        self.layer, self.reduction, self.num_classes = layer, reduction, num_classes
        self.kind, self.task = kind, task
        self.weight = nn.Parameter(torch.zeros(in_features, num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.l2: float | None = None
        self.iterations: int | None = None  # of the chosen L2's fit, and whether it converged (None: not fitted here)
        self.converged: bool | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (predicted values for a regression probe) for a batch of raw layer outputs (B, ...); the input
        is detached first."""
        return self.logits(self.standardize(self.reduction(h.detach())))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Centre and scale reduced features with the training statistics."""
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for already reduced and standardised features (N, D)."""
        return x @ self.weight + self.bias

    @torch.no_grad()
    def fit(self, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor, *,
            l2_path: tuple[float, ...] = DEFAULT_L2_PATH, standardizer: Standardizer | None = None,
            init: LinearProbe | None = None, max_iter: int = 500, patience: int | None = 2,
            sharded: bool = False) -> PathResult:
        """Fit to convergence along the L2 path on reduced features; the L2 is chosen on valid only.

        ``init`` (a probe of the same layer, e.g. at the previous checkpoint) warm-starts the path: the
        problem is convex, so the optimum is the same and only the number of iterations changes.
        ``sharded``: the rows are this process's share of a torch.distributed job's (``fit_l2_path``); pass
        the ``standardizer`` of all the rows. ``finished.probe`` fits many layers at once (``solvers.fit_paths``)
        and hands each probe its result with :meth:`adopt`.
        """
        std = standardizer or Standardizer.fit([x_train])
        settings = FitSettings(l2_path=l2_path, max_iter=max_iter, patience=patience)
        path = fit_paths([std(x_train)], y_train, [std(x_valid)], y_valid, self.num_classes, settings,
                         inits=[init.weights() if init is not None else None], sharded=sharded)[0]
        self.adopt(path, std)
        return path

    @torch.no_grad()
    def adopt(self, path: FittedPath, standardizer: Standardizer) -> None:
        """Take the chosen probe of a fitted path, whose features were standardised with ``standardizer``."""
        self.mean.copy_(standardizer.mean), self.std.copy_(standardizer.std)
        self.weight.copy_(path.best.weights.W), self.bias.copy_(path.best.weights.b)
        self.l2, self.iterations, self.converged = path.best_l2, path.best.iterations, path.best.converged

    def weights(self) -> LinearWeights:
        """A detached copy of (W, b), in this probe's standardised feature space."""
        return LinearWeights(self.weight.detach().clone(), self.bias.detach().clone())

    def config(self) -> dict[str, Any]:
        """What is needed to rebuild this probe, JSON-ready."""
        return {"layer": self.layer, "reduction": self.reduction.to_dict(), "in_features": self.weight.shape[0],
                "num_classes": self.num_classes, "l2": self.l2, "kind": self.kind, "task": self.task}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LinearProbe:
        probe = cls(cfg["layer"], reduction_from_dict(cfg["reduction"]), cfg["in_features"], cfg["num_classes"],
                    kind=cfg.get("kind", "classes"), task=cfg.get("task", MAIN))
        probe.l2 = cfg["l2"]
        return probe


class ProbeBank(nn.Module):
    """Probes keyed by layer, iterable in execution order like a sequence of layers."""

    def __init__(self, probes: list[LinearProbe] | None = None) -> None:
        super().__init__()
        self.probes = nn.ModuleList(probes or [])

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self) -> Iterator[LinearProbe]:
        return cast(Iterator[LinearProbe], iter(self.probes))  # the ModuleList holds only LinearProbes

    def __getitem__(self, key: int | str) -> LinearProbe:
        if isinstance(key, int):
            return cast(LinearProbe, self.probes[key])
        for p in self:
            if p.layer == key:
                return p
        raise KeyError(f"no probe on layer {key!r}; probed layers: {self.layers}")

    @property
    def layers(self) -> list[str]:
        return [p.layer for p in self]

    def append(self, probe: LinearProbe) -> None:
        self.probes.append(probe)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits of every probe from a ``Taps.features``-like mapping of raw layer outputs."""
        return {p.layer: p(features[p.layer]) for p in self}

    def save(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``params.pt`` (atomically) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "config.json", json.dumps([p.config() for p in self], indent=1))
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        atomic_write_bytes(folder / "params.pt", buf.getvalue())
        return folder

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> ProbeBank:
        """Rebuild a bank written by ``save``."""
        folder = Path(folder)
        bank = cls([LinearProbe.from_config(c) for c in json.loads((folder / "config.json").read_text())])
        bank.load_state_dict(torch.load(folder / "params.pt", map_location=map_location, weights_only=True))
        return bank
