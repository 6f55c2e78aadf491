"""Label sets: what a probe is fitted to, kept apart from the features it reads.

One extraction serves any number of tasks: the data's own labels (the task ``"main"``) and those given by
``probe(..., tasks={name: spec})``, where a spec is

* :func:`labels` (classes) or :func:`values` (regression targets, one or several outputs) per split,
* a function of the main labels (``lambda y: y // 5``),
* :func:`control_task`: Hewitt & Liang's control task, a fixed random label per input type (a token id, an input, or
  a key you give), drawn with the controlled task's class distribution,
* :func:`shuffled_labels`: the controlled task's labels permuted within each split.

Each task gets its own probes, fitted with the same solver and L2 path, and its own rows in the results table
(the ``task`` column); a control or shuffled task also gets ``selectivity = its error - the controlled task's
error`` per layer and split. Targets are resolved here, once, before any forward pass, so a bad label set fails
before slow work.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from linprobe.data.datasets import IGNORE, as_labels, tree_tensors
from linprobe.data.inputs import Batch, Split
from linprobe.report.results import MAIN

Kind = Literal["classes", "values"]
_SPLITS = ("train", "valid", "test")
_KEY_BATCH = 4096


@dataclass(frozen=True)
class PerSplit:
    """Targets given per split: ``kind="classes"`` (whole numbers >= 0) or ``"values"`` (regression targets,
    ``(N,)`` or ``(N, K)``). Each split holds one target per sample, or per row a probe gets (a labelled token);
    per-token class labels may also be ``(N, T)`` with -100 exactly where the main labels have it."""

    kind: Kind
    splits: Mapping[str, Any]


@dataclass(frozen=True)
class Derived:
    """Class labels computed from another task's labels by ``fn`` (a tensor in, a tensor of the same length out)."""

    fn: Callable[[Tensor], Any]
    of: str = MAIN


@dataclass(frozen=True)
class Control:
    """Hewitt & Liang's control task for the classification task ``of``: every input type gets one fixed random
    class, drawn with ``of``'s training class distribution. The type of a row is ``key`` per split (any integers),
    or by default the token id of a per-token sample, else the whole input of a sample (identical inputs share a
    label, in every split)."""

    of: str = MAIN
    seed: int = 0
    key: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Shuffled:
    """The labels of task ``of`` permuted within each split (seeded): the baseline of no relation at all."""

    of: str = MAIN
    seed: int = 0


TaskSpec = PerSplit | Derived | Control | Shuffled | Callable[[Tensor], Any]


def labels(train: Any, valid: Any, test: Any = None) -> PerSplit:
    """Another set of class labels for the same samples, one array per split."""
    return PerSplit("classes", {"train": train, "valid": valid, "test": test})


def values(train: Any, valid: Any, test: Any = None) -> PerSplit:
    """Regression targets for the same samples, ``(N,)`` or ``(N, K)`` per split: a ridge probe per layer, its L2
    chosen on valid MSE, reported as ``mse`` and ``r2``."""
    return PerSplit("values", {"train": train, "valid": valid, "test": test})


def control_task(of: str = MAIN, *, seed: int = 0, key: Mapping[str, Any] | None = None) -> Control:
    """Hewitt & Liang's control task for ``of`` (see :class:`Control`); its rows carry ``selectivity``."""
    return Control(of, seed, key)


def shuffled_labels(of: str = MAIN, *, seed: int = 0) -> Shuffled:
    """The labels of ``of`` shuffled within each split; its rows carry ``selectivity``."""
    return Shuffled(of, seed)


@dataclass
class Targets:
    """One task resolved: its kind, the target of every row per split (classes encoded as 0..K-1 in the order
    of ``classes``), and the task it is a baseline of (control and shuffled tasks)."""

    name: str
    kind: Kind
    splits: dict[str, Tensor]
    classes: list[int] = field(default_factory=list)
    baseline_of: str | None = None

    @property
    def outputs(self) -> int:
        """The probe's outputs: the number of classes, or of regression targets."""
        if self.kind == "classes":
            return len(self.classes)
        y = self.splits["train"]
        return 1 if y.dim() == 1 else y.shape[1]

    def chance_error(self) -> float | None:
        """The error of always predicting the most frequent training class (None for regression)."""
        if self.kind != "classes":
            return None
        counts = torch.bincount(self.splits["train"], minlength=len(self.classes))
        return 1.0 - counts.max().item() / max(len(self.splits["train"]), 1)

    def describe(self) -> dict[str, Any]:
        """What the results record about the task."""
        out: dict[str, Any] = {"kind": self.kind, "outputs": self.outputs}
        if self.kind == "classes":
            out.update(classes=self.classes, chance_error=self.chance_error())
        if self.baseline_of is not None:
            out["baseline_of"] = self.baseline_of
        return out


def resolve(specs: Mapping[str, TaskSpec] | None, splits: Mapping[str, Split], batch_size: int) -> list[Targets]:
    """Every task's targets on every split, the main task first: checked and encoded before any forward pass."""
    specs = dict(specs or {})
    if MAIN in specs:
        raise ValueError(f"the task name {MAIN!r} is the data's own labels; give your label set another name")
    main = {name: split.targets(batch_size) for name, split in splits.items()}
    for name, y in main.items():
        if not len(y):
            raise ValueError(f"the {name} data yielded no batch (a DataLoader with drop_last and fewer samples than "
                             "its batch size?) or holds no labelled token (every label -100): probing needs samples "
                             "in every split")
    done = {MAIN: _classes(MAIN, main)}
    for name, spec in specs.items():
        if not isinstance(name, str) or not name or any(c in name for c in "/\\,\n"):
            raise ValueError(f"task name {name!r} must be a non-empty string without '/', '\\\\', ',' or newlines")
        done[name] = _resolve_one(name, spec, splits, done, main, batch_size)
    return list(done.values())


def _resolve_one(name: str, spec: TaskSpec, splits: Mapping[str, Split], done: Mapping[str, Targets],
                 main: Mapping[str, Tensor], batch_size: int) -> Targets:
    if isinstance(spec, PerSplit):
        given = {s: _given(name, s, spec.splits.get(s), splits[s], main[s], spec.kind) for s in splits}
        return _classes(name, given) if spec.kind == "classes" else _values(name, given)
    if isinstance(spec, (Derived, Control, Shuffled)):
        base = _base(name, spec.of, done)
        if isinstance(spec, Derived):
            return _classes(name, {s: _derived(name, spec.fn, base, s) for s in splits})
        if isinstance(spec, Shuffled):
            return _encoded(name, {s: _shuffle(y, spec.seed, i) for i, (s, y) in enumerate(base.splits.items())},
                            base.classes, spec.of)
        keys = {s: _keys(name, s, splits[s], spec.key, batch_size) for s in splits}
        return _encoded(name, _control(base, keys, spec.seed), base.classes, spec.of)
    if callable(spec):
        return _resolve_one(name, Derived(spec), splits, done, main, batch_size)
    raise TypeError(f"task {name!r} is a {type(spec).__name__}; give linprobe.labels(...), linprobe.values(...), "
                    "linprobe.control_task(...), linprobe.shuffled_labels(...) or a function of the main labels")


def _base(name: str, of: str, done: Mapping[str, Targets]) -> Targets:
    """The classification task ``of`` that task ``name`` is built from (named earlier in ``tasks``)."""
    if of not in done:
        raise ValueError(f"task {name!r} is built from task {of!r}, which is not defined before it; known: "
                         f"{list(done)}")
    if done[of].kind != "classes":
        raise ValueError(f"task {name!r} needs class labels but task {of!r} holds regression values")
    return done[of]


def _given(name: str, split: str, data: Any, source: Split, main: Tensor, kind: Kind) -> Tensor:
    """A split's given targets, one per row the probes get."""
    if data is None:
        raise ValueError(f"task {name!r} has no targets for the {split} split; give one array per split")
    t = data if isinstance(data, Tensor) else torch.as_tensor(np.asarray(data))
    rows = len(main)
    if kind == "classes" and t.dim() == 2 and t.shape[0] == len(source) and t.shape[0] != rows:
        per_token = source.labelled_tokens()
        if per_token is None or t.shape != per_token.shape or not torch.equal(t != IGNORE, per_token):
            raise ValueError(f"task {name!r}: the {split} labels of shape {tuple(t.shape)} must mark with -100 "
                             "exactly the tokens the main labels leave out (or give one label per labelled token)")
        t = t[per_token]
    if len(t) != rows:
        raise ValueError(f"task {name!r} has {len(t)} targets for the {split} split, which gives the probes {rows} "
                         "rows (one per sample, or per labelled token): give one target per row")
    if kind == "classes":
        return as_labels(t)
    t = t.to(torch.float32)
    if t.dim() not in (1, 2):
        raise ValueError(f"task {name!r}: regression targets must be (N,) or (N, K), got shape {tuple(t.shape)}")
    bad = (~t.isfinite()).reshape(len(t), -1).any(1).nonzero()
    if len(bad):
        raise ValueError(f"task {name!r}: the {split} targets hold NaN or Inf (first at row {int(bad[0])}); drop or "
                         "impute those samples")
    return t


def _derived(name: str, fn: Callable[[Tensor], Any], base: Targets, split: str) -> Tensor:
    """``fn`` of the base task's labels (in their original values) on one split."""
    original = torch.tensor(base.classes)[base.splits[split]]
    out = fn(original)
    t = out if isinstance(out, Tensor) else torch.as_tensor(np.asarray(out))
    if len(t) != len(original):
        raise ValueError(f"task {name!r}: its function gave {len(t)} labels for the {len(original)} of the {split} "
                         "split; it must map a tensor of labels to one label each")
    return as_labels(t)


def _classes(name: str, given: Mapping[str, Tensor]) -> Targets:
    """Class labels encoded as 0..K-1 over the classes found in train; a class missing from train is an error."""
    classes = given["train"].unique()
    if len(classes) < 2:
        raise ValueError(f"task {name!r}: the train split holds a single class ({classes.tolist()}): a probe needs at "
                         "least two classes to tell apart; check the labels or the split")
    encoded = {}
    for split, y in given.items():
        missing = y[~torch.isin(y, classes)].unique().tolist()
        if missing:
            raise ValueError(f"task {name!r}: class(es) {missing} occur in the {split} split but not in train (which "
                             f"has {len(classes)} classes): a probe cannot learn them; use a stratified split "
                             "(linprobe.data.datasets.stratified_split) with enough training samples for every class")
        encoded[split] = torch.searchsorted(classes, y)
    return Targets(name, "classes", encoded, classes.tolist())


def _values(name: str, given: Mapping[str, Tensor]) -> Targets:
    shapes = {split: tuple(y.shape[1:]) for split, y in given.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"task {name!r}: the splits' targets have different widths {shapes}")
    return Targets(name, "values", dict(given))


def _encoded(name: str, codes: Mapping[str, Tensor], classes: list[int], of: str) -> Targets:
    """A baseline task over ``of``'s classes (codes already 0..K-1)."""
    return Targets(name, "classes", dict(codes), list(classes), baseline_of=of)


def _shuffle(y: Tensor, seed: int, which: int) -> Tensor:
    """``y`` permuted by a generator seeded with ``seed`` and the split's position (never the global RNG)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + which)
    return y[torch.randperm(len(y), generator=g)]


def _control(base: Targets, keys: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """A class per key, the same for a key in every split: the key's seeded hash as a uniform draw, mapped through
    the base task's training class distribution."""
    counts = torch.bincount(base.splits["train"], minlength=len(base.classes)).double()
    cdf = (counts / counts.sum()).cumsum(0)
    cdf[-1] = 1.0
    out = {}
    for split, key in keys.items():
        u = (_srl(_mix(_mix(key) ^ _mix(torch.full_like(key, seed))), 11).double() / 2.0**53)
        out[split] = torch.searchsorted(cdf, u, right=True).clamp_max(len(base.classes) - 1)
    return out


def _keys(name: str, split: str, source: Split, given: Mapping[str, Any] | None, batch_size: int) -> Tensor:
    """The input type of every row of one split: given, a token id, or a digest of the sample's inputs."""
    rows = len(source.targets(batch_size))
    if given is not None:
        if split not in given:
            raise ValueError(f"task {name!r}: key= has no entry for the {split} split; give one key array per split")
        key = torch.as_tensor(np.asarray(given[split]))
        if key.dim() != 1 or len(key) != rows or key.is_floating_point():
            raise ValueError(f"task {name!r}: the {split} keys must be {rows} integers (one per row the probes get), "
                             f"got shape {tuple(key.shape)} of {key.dtype}")
        return key.long()
    parts = [_batch_keys(name, b) for b in source.batches(batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _batch_keys(name: str, batch: Batch) -> Tensor:
    """A batch's row types: the token ids at its labelled tokens, else a digest of each sample's input tensors."""
    if batch.token_level:
        ids = [t for t in tree_tensors(batch.inputs) if t.shape == batch.labels.shape and not t.is_floating_point()]
        if not ids:
            raise ValueError(f"control task {name!r}: per-token labels but no integer input of their shape to read "
                             "token ids from; pass key={'train': ..., 'valid': ...} with one type per labelled token")
        return ids[0][batch.token_index].long()
    h = torch.zeros(batch.size, dtype=torch.long)
    for t in tree_tensors(batch.inputs):
        if t.dim() and len(t) == batch.size:
            h = _mix(h ^ _digest_rows(t))
    return h


def _digest_rows(t: Tensor) -> Tensor:
    """A 64-bit digest of each row's bytes: the words weighted by fixed odd multipliers, summed (wrapping)."""
    raw = t.detach().cpu().contiguous().reshape(len(t), -1).view(torch.uint8)
    pad = (-raw.shape[1]) % 8
    words = torch.nn.functional.pad(raw, (0, pad)).view(torch.int64) if len(raw) else raw.new_zeros(0, 1).long()
    multipliers = _mix(torch.arange(words.shape[1], dtype=torch.long) + 0x632BE5AB) | 1
    return _mix((words * multipliers).sum(1) ^ words.shape[1])


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` keeps the sign)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = x ^ _srl(x, 30)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = x ^ _srl(x, 27)
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ _srl(x, 31)


def describe_spec(spec: TaskSpec) -> str:
    """A task as the provenance records it: what kind it is and what it is built from (not its arrays)."""
    if isinstance(spec, PerSplit):
        return f"{spec.kind} given per split"
    if isinstance(spec, Control):
        return f"control task of {spec.of} (seed {spec.seed}, {'given keys' if spec.key is not None else 'auto keys'})"
    if isinstance(spec, Shuffled):
        return f"{spec.of} shuffled (seed {spec.seed})"
    fn, of = (spec.fn, spec.of) if isinstance(spec, Derived) else (spec, MAIN)
    return f"{getattr(fn, '__qualname__', type(fn).__name__)} of {of}"


def targets_fingerprint(tasks: list[Targets]) -> str:
    """A 16-hex-digit digest of every task's name, kind, classes and targets: what a probe is fitted to (the
    split fingerprints cover only what is extracted)."""
    digest = hashlib.sha256()
    for t in tasks:
        digest.update(json.dumps([t.name, t.kind, t.classes, t.baseline_of]).encode())
        for split, y in sorted(t.splits.items()):
            digest.update(f"{split}{y.dtype}{tuple(y.shape)}".encode())
            data = y.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(memoryview(data))  # type: ignore[arg-type]  # numpy's stubs: a buffer only on 3.12+
    return digest.hexdigest()[:16]


def baselines(tasks: list[Targets]) -> dict[str, str]:
    """Each control or shuffled task and the task it is a baseline of."""
    return {t.name: t.baseline_of for t in tasks if t.baseline_of is not None}

