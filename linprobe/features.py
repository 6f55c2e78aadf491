"""Bring your own features: probe activations you already have (``output_hidden_states``, a TransformerLens
cache, nnsight, saved arrays) with the same solver, results, figures and files as ``linprobe.probe``.

The arrays are fed through a stand-in model whose submodules are named after the layers and return their
input unchanged, so token masks, per-token labels, reductions, the cache and the fit are ``probe``'s own.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from linprobe.capture.taps import INPUT
from linprobe.data.inputs import InputSpec
from linprobe.finished import probe
from linprobe.report.results import ProbeResult

MASK = "attention_mask"


class FeatureSource(nn.Module):
    """A stand-in model: one identity submodule per layer name (dotted names nest), called in the given order on
    the matching keyword argument."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        for name in self.names:
            parent: nn.Module = self
            for part in name.split("."):
                if not hasattr(parent, part) or not isinstance(getattr(parent, part), nn.Module):
                    parent.add_module(part, nn.Identity())
                parent = getattr(parent, part)

    def forward(self, **features: torch.Tensor) -> None:
        for name in self.names:
            self.get_submodule(name)(features[name])


def probe_features(train: Any, valid: Any, test: Any = None, **options: Any) -> ProbeResult:
    """Probe every layer of features you already have, like ``linprobe.probe`` probes a model's.

    Each split is ``(features, labels)`` or ``(features, labels, mask)``: ``features`` maps layer name to an
    array or tensor ``(N, ...)`` (a sequence of arrays, e.g. ``output_hidden_states``, is named ``"0"``, ``"1"``,
    ...); ``labels`` is ``(N,)``, or ``(N, T)`` per token with -100 for unlabelled tokens; ``mask`` ``(N, T)``
    marks real tokens for ``tokens=`` (by default the masked mean of ``(N, T, D)`` features). ``options`` are
    ``probe``'s (``cache_dir``, ``out_dir``, ``reduce``, ``l2_path``, ``tokens``, ...), except ``layers``.
    """
    if "layers" in options or "inputs" in options:
        raise TypeError("probe_features() probes every layer it is given: choose layers by passing only those "
                        "arrays (no layers= or inputs=)")
    splits = {name: _as_pair(name, part) for name, part in (("train", train), ("valid", valid), ("test", test))
              if part is not None}
    names = [n for n in splits["train"][0] if n != MASK]
    for name, (features, _) in splits.items():
        if [n for n in features if n != MASK] != names:
            raise ValueError(f"the {name} split has layers {list(features)} but train has {names}: give every split "
                             "the same layers in the same order")
    source = FeatureSource(names)
    pairs = [splits[name] for name in ("train", "valid", "test") if name in splits]
    return probe(source, *pairs, layers=names, inputs=InputSpec(labels_key="labels", mask_key=MASK), **options)


def _as_pair(split: str, part: Any) -> tuple[dict[str, Any], Any]:
    """``(features, labels[, mask])`` as model inputs (the layers and the mask by keyword) and labels."""
    if not isinstance(part, (tuple, list)) or len(part) not in (2, 3):
        raise TypeError(f"the {split} split must be (features, labels) or (features, labels, mask), got "
                        f"{type(part).__name__}")
    features, labels = part[0], part[1]
    if isinstance(features, Mapping):
        named = {str(k): v for k, v in features.items()}
    elif isinstance(features, Sequence) and not isinstance(features, str):
        named = {str(i): v for i, v in enumerate(features)}
    else:
        raise TypeError(f"the {split} split's features must map layer names to arrays (or be a sequence of arrays), "
                        f"got {type(features).__name__}")
    bad = [n for n in named if n in (INPUT, MASK) or not all(p.isidentifier() or p.isdigit() for p in n.split("."))]
    if bad:
        raise ValueError(f"layer name(s) {bad} cannot be used: names are dotted identifiers or numbers, and 'input' "
                         f"and {MASK!r} are reserved; rename them")
    if len(part) == 3:
        named[MASK] = part[2]
    return named, labels
