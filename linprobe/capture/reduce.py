"""Feature reductions for big layers (paper section 3.4) and standardisation with training statistics.

A reduction maps a batch of layer outputs (B, ...) to a (B, D) float32 matrix. Its random parts
(subset indices, projection seed) are fixed when it is made and saved with the results, so the
same features are probed at every checkpoint.
"""
from __future__ import annotations

import functools
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_FEATURE_BUDGET = 8192
MAX_PROJECTION_BYTES = 2**30
_SUMMED_BLOCK = 9  # pooling blocks up to 3x3 are summed slice by slice; larger ones go to adaptive pooling
"""The largest random projection matrix (float32) a ``Project`` may build; bigger layers need a subset or pooling."""


@dataclass(frozen=True)
class Reduction(ABC):
    """A per-layer map from (B, *shape) outputs to (B, D) float32 features."""

    kind: ClassVar[str]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.apply(h.float()).reshape(h.shape[0], -1)

    @abstractmethod
    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """Reduce a float batch; the result is flattened by ``__call__``."""

    @abstractmethod
    def out_features(self, shape: Sequence[int]) -> int:
        """Number of features produced for one sample of the given shape."""

    def describe(self) -> str:
        """A short human-readable account, shown in result tables."""
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``reduction_from_dict`` inverts it."""
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class Flatten(Reduction):
    """No reduction: every feature of the layer."""

    kind: ClassVar[str] = "none"

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def out_features(self, shape: Sequence[int]) -> int:
        return math.prod(shape)


@dataclass(frozen=True)
class Pool(Reduction):
    """Average pooling per channel of a (C, H, W) or (C, L) map to ``size`` (1: one number per channel); with
    ``tokens`` a (T, D) sequence is pooled along its tokens instead, each of the D features kept."""

    size: tuple[int, ...] = (1,)
    tokens: bool = False

    kind: ClassVar[str] = "pool"

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 4:
            return _pool2d(h, _pair(self.size))
        if h.dim() == 3 and self.tokens:
            return F.adaptive_avg_pool1d(h.transpose(1, 2), self.size[0]).transpose(1, 2)
        if h.dim() == 3:
            return F.adaptive_avg_pool1d(h, self.size[0])
        raise ValueError(f"pooling needs a (C, H, W) or (C, L) output, got per-sample shape {tuple(h.shape[1:])}; "
                         "use 'subset:K' or 'project:K' for this layer")

    def out_features(self, shape: Sequence[int]) -> int:
        if len(shape) not in (2, 3):
            raise ValueError(f"pooling needs a (C, H, W) or (C, L) output, got per-sample shape {tuple(shape)}")
        if self.tokens and len(shape) == 2:
            return shape[1] * self.size[0]
        return shape[0] * math.prod(_pair(self.size) if len(shape) == 3 else self.size[:1])

    def describe(self) -> str:
        return ("pool tokens " if self.tokens else "pool ") + "x".join(map(str, self.size))

    def to_dict(self) -> dict[str, Any]:
        """As ``Reduction.to_dict``; ``tokens`` only when set, so maps saved before it existed read the same."""
        d = super().to_dict()
        if not self.tokens:
            del d["tokens"]
        return d


def _pool2d(h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average pooling of (B, C, H, W) to ``size``: small whole blocks summed in two stages, the columns of a
    block then its rows (on CPU several times faster than ``adaptive_avg_pool2d``, which matters on every
    training step: 28x28 -> 14x14 of a 32x32 batch in 0.33 ms against 2.6), else adaptive pooling."""
    (kh, rh), (kw, rw) = divmod(h.shape[2], size[0]), divmod(h.shape[3], size[1])
    if rh or rw or kh * kw > _SUMMED_BLOCK or kh * kw == 1:
        return F.adaptive_avg_pool2d(h, size)
    b, c, rows = h.shape[0], h.shape[1], h.shape[2]
    h = h.contiguous()
    cols = _sum_over(h.view(b, c, rows, size[1], kw), dim=4)  # (B, C, H, W / kw)
    return _sum_over(cols.view(b, c, size[0], kh, size[1]), dim=3).div_(kh * kw)


def _sum_over(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.sum(dim)`` for a short ``dim``, as a chain of element-wise adds (CPU reductions over a tiny inner
    dimension are slow); a dimension of 1 comes back as a view."""
    parts = x.unbind(dim)
    if len(parts) == 1:
        return parts[0]
    out = parts[0] + parts[1]
    for part in parts[2:]:
        out += part
    return out


@dataclass(frozen=True)
class Subset(Reduction):
    """A fixed, seeded random subset of the flattened features (the paper's Inception v3 recipe)."""

    indices: tuple[int, ...]
    in_features: int
    seed: int

    kind: ClassVar[str] = "subset"

    @classmethod
    def random(cls, in_features: int, k: int, seed: int) -> Subset:
        """``k`` distinct indices drawn with a private generator, sorted for sequential reads."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(in_features, generator=g)[: min(k, in_features)].sort().values
        return cls(tuple(idx.tolist()), in_features, seed)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(h.shape[0], -1)
        _check_width(flat.shape[1], self.in_features, self)
        return flat[:, _index_tensor(self.indices, flat.device)]

    def out_features(self, shape: Sequence[int]) -> int:
        return len(self.indices)

    def describe(self) -> str:
        return f"subset {len(self.indices)}/{self.in_features}"


@dataclass(frozen=True)
class Project(Reduction):
    """A seeded Gaussian random projection to ``out_dim`` features (Johnson-Lindenstrauss scaling).

    A deviation from the paper: its section 3.4 would *learn* the mapping to fewer features; a fixed random one
    keeps the probe convex and the same features at every checkpoint, at the price of some information."""

    in_features: int
    out_dim: int
    seed: int

    kind: ClassVar[str] = "project"

    def __post_init__(self) -> None:
        size = self.in_features * self.out_dim * 4
        if size > MAX_PROJECTION_BYTES:
            raise ValueError(f"project {self.in_features}->{self.out_dim} needs a {size / 2**30:.1f} GiB random matrix "
                             f"(limit {MAX_PROJECTION_BYTES / 2**30:.0f} GiB); use 'subset:K' or 'pool' for this layer")

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(h.shape[0], -1)
        _check_width(flat.shape[1], self.in_features, self)
        return flat @ _projection(self.in_features, self.out_dim, self.seed, flat.device)

    def out_features(self, shape: Sequence[int]) -> int:
        return self.out_dim

    def describe(self) -> str:
        return f"project {self.in_features}->{self.out_dim}"


_KINDS: dict[str, type[Reduction]] = {c.kind: c for c in (Flatten, Pool, Subset, Project)}


def reduction_from_dict(d: Mapping[str, Any]) -> Reduction:
    """Rebuild a reduction saved by ``Reduction.to_dict`` (lists back to tuples)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "kind"}
    return _KINDS[d["kind"]](**fields)


def layer_seed(seed: int, layer: str) -> int:
    """A per-layer seed, stable across runs and processes, so layers get different subsets."""
    return (seed * 1_000_003 + zlib.crc32(layer.encode())) % 2**31


def auto_reduction(shape: Sequence[int], *, budget: int = DEFAULT_FEATURE_BUDGET, seed: int = 0,
                   layout: str = "channels_first") -> Reduction:
    """The default policy: keep layers within ``budget`` features whole; pool feature maps by the
    smallest integer factor that fits (per-channel averages at most); otherwise a random subset. A
    (T, D) output laid out as tokens x features is pooled along its tokens, never across its features."""
    if budget < 1:
        raise ValueError(f"feature budget must be a positive number of features, got {budget}")
    n = math.prod(shape)
    if n <= budget:
        return Flatten()
    if len(shape) == 2 and layout == "tokens":
        width = shape[1]
        if width > budget:
            return Subset.random(n, budget, seed)
        return Pool((budget // width,), tokens=True)  # the most token groups whose features fit the budget
    if len(shape) in (2, 3) and shape[0] <= budget:
        spatial = shape[1:]
        for factor in range(2, max(spatial) + 1):
            size = tuple(math.ceil(s / factor) for s in spatial)
            if shape[0] * math.prod(size) <= budget:
                return Pool(size)
    return Subset.random(n, budget, seed)


def parse_reduction(spec: str | Reduction, shape: Sequence[int], *, budget: int = DEFAULT_FEATURE_BUDGET,
                    seed: int = 0, layout: str = "channels_first") -> Reduction:
    """A reduction from ``"auto"``, ``"none"``, ``"pool"``, ``"pool:K"``, ``"subset:K"``, ``"project:K"`` or an instance."""
    if isinstance(spec, Reduction):
        return spec
    kind, _, arg = spec.partition(":")
    n = math.prod(shape)
    k = int(arg) if arg.isdigit() and int(arg) > 0 else None
    if kind == "auto" and not arg:
        return auto_reduction(shape, budget=budget, seed=seed, layout=layout)
    if kind == "none" and not arg:
        return Flatten()
    if kind == "pool" and (k or not arg):
        if len(shape) == 2 and layout == "tokens":
            return Pool((k or 1,), tokens=True)
        return Pool((k,) * max(len(shape) - 1, 1) if k else (1,))
    if kind == "subset" and k:
        return Subset.random(n, k, seed)
    if kind == "project" and k:
        return Project(n, k, seed)
    raise ValueError(f"unknown reduction {spec!r}: use 'auto', 'none', 'pool', 'pool:K', 'subset:K' or 'project:K' "
                     "(K a positive integer)")


ReduceSpec = str | Reduction | Mapping[str, str | Reduction]


def resolve_reductions(spec: ReduceSpec, shapes: Mapping[str, Sequence[int]], *, budget: int = DEFAULT_FEATURE_BUDGET,
                       seed: int = 0, layouts: Mapping[str, str] | None = None) -> dict[str, Reduction]:
    """One reduction per layer from a global spec or a per-layer mapping (unlisted layers: ``"auto"``);
    ``layouts`` says which (T, D) outputs are tokens x features rather than channels x length. A global
    ``"pool"`` leaves flat layers as they are; an error names the layer."""
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(shapes)
        if unknown:
            raise ValueError(f"reduce names layers that are not probed: {sorted(unknown)}; probed: {list(shapes)}")
    per_layer = spec if isinstance(spec, Mapping) else dict.fromkeys(shapes, spec)
    out: dict[str, Reduction] = {}
    for name, shape in shapes.items():
        wanted = per_layer.get(name, "auto")
        if not isinstance(spec, Mapping) and len(shape) == 1 and str(wanted).startswith("pool"):
            out[name] = Flatten()  # one pooling spec for every layer: a flat layer has nothing to pool
            continue
        try:
            r = parse_reduction(wanted, shape, budget=budget, seed=layer_seed(seed, name),
                                layout=(layouts or {}).get(name, "channels_first"))
            r.out_features(shape)  # validates the reduction against the layer's shape now, not mid-extraction
        except ValueError as e:
            raise ValueError(f"layer {name!r} (per-sample shape {tuple(shape)}): {e}") from None
        out[name] = r
    return out


@dataclass
class Standardizer:
    """Per-feature centring and scaling with statistics of the training split only.

    Features that are constant (to float32 precision) get scale 1, so they become zeros instead
    of a division by zero. Scales are floored at 1% of the layer's typical (RMS) scale: a unit that
    fired on a handful of training samples would otherwise be multiplied by thousands on new data.
    """

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, chunks: Iterable[np.ndarray | torch.Tensor]) -> Standardizer:
        """Streamed mean and standard deviation in float64 (Chan's pairwise update), chunk by chunk."""
        n = 0
        mean: torch.Tensor | None = None
        m2: torch.Tensor | None = None
        for chunk in chunks:
            x = torch.as_tensor(np.array(chunk, dtype=np.float64))
            k, mu = x.shape[0], x.mean(0)
            c2 = ((x - mu) ** 2).sum(0)
            if mean is None or m2 is None:  # both None before the first chunk
                n, mean, m2 = k, mu, c2
                continue
            delta = mu - mean
            mean = mean + delta * k / (n + k)
            m2 = m2 + c2 + delta**2 * n * k / (n + k)
            n += k
        if mean is None or m2 is None:
            raise ValueError("cannot standardise an empty training split")
        return cls.from_moments(n, mean, m2)

    @classmethod
    def identity(cls, features: int) -> Standardizer:
        """Mean 0, scale 1: the features as they are."""
        return cls(torch.zeros(features), torch.ones(features))

    @classmethod
    def from_moments(cls, n: int, mean: torch.Tensor, m2: torch.Tensor) -> Standardizer:
        """From the row count, float64 mean and summed squared deviations (e.g. combined over processes)."""
        std = (m2 / max(n, 1)).sqrt()
        constant = std <= 1e-6 * mean.abs() + 1e-12
        floor = 0.01 * std[~constant].square().mean().sqrt() if (~constant).any() else torch.tensor(1.0)
        return cls(mean.float(), torch.where(constant, torch.ones_like(std), std.clamp_min(floor)).float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.to(x.device)) / self.std.to(x.device)

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise a float32 matrix in place (the same numbers as calling it), saving a copy of a whole layer."""
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def _check_width(got: int, expected: int, r: Reduction) -> None:
    if got != expected:
        raise ValueError(f"{r.describe()} was made for {expected} features but the layer now has {got}: "
                         "the layer changed shape; delete the saved reductions to re-draw them")


@functools.lru_cache(maxsize=64)
def _index_tensor(indices: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=16)
def _projection(d_in: int, d_out: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_in, d_out, generator=g) / math.sqrt(d_out)).to(device)
