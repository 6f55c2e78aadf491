"""The feature cache on disk (paper appendix B): extract once, read back many times.

Layout of one cache folder::

    manifest.json                      what is here, and whether each split is complete
    <split>/rank000-of-001/layer-<name>.npy   (N, D) features of one layer, float32 or float16
    <split>/rank000-of-001/index.npy   the dataset index of each of those rows

Labels are not stored: they are what a run fits, not what it extracts, so any number of label sets reuse one
extraction (``Split.targets``), and a split is complete for its inputs whatever its labels.

Each shard is written batch by batch into ``<shard>.partial-<pid>`` (its space reserved up front,
so a full disk fails at the start) and renamed into place only once complete, and the manifest is
replaced atomically after that, so an interrupted extraction is never read as complete. A writer
holds ``.lock`` (``FeatureCache.locked``): a second process gets a clear error, and the partial
folders of a killed one are removed. Under torch.distributed each rank writes its own shard (contiguous
dataset rows), rank 0 holds the lock and records every shard in the manifest, and readers combine the
shards in dataset order, whole or only the rows one rank needs (``features(..., rows=...)``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linprobe import distributed
from linprobe.atomic import atomic_write_text

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT_VERSION = 2  # 2: no labels in the cache


class CacheError(RuntimeError):
    """The cache is missing, incomplete, corrupted or was made for something else."""


def shard_name(rank: int, world: int) -> str:
    """Folder name of one process's shard of a split."""
    return f"rank{rank:03d}-of-{world:03d}"


def _layer_file(layer: str) -> str:
    return f"layer-{layer.replace(os.sep, '_')}.npy"


def open_reserved(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    """A new memory-mapped .npy with its disk space reserved: a full disk is an OSError (ENOSPC) here, not a
    crash (SIGBUS) when a page of the map is first written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):  # Linux; elsewhere space is taken as pages are written
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    return array


class ShardWriter:
    """Writes one shard of a split row block by row block into .npy files (space reserved up front).

    Rows are appended with plain file writes, not through a writable memory map: the written pages then sit
    in the OS page cache, which is not this process's memory (a map's dirty pages would count in its RSS
    until the shard is complete: gigabytes for a wide model)."""

    def __init__(self, folder: Path, widths: Mapping[str, int], n: int, dtype: np.dtype) -> None:
        self.final = folder
        self.tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        self.n, self.pos = n, 0
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files: dict[str, Any] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.hashes: dict[str, Any] = {}
        self.rows: dict[str, int] = {}
        try:
            for name, width in widths.items():
                self._open(_layer_file(name), (n, width), dtype)
            self._open("index.npy", (n,), np.dtype(np.int64))
        except BaseException:
            self.abort()
            raise

    def _open(self, file: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Create one .npy with its disk space reserved (a full disk fails here) and open it after its header."""
        reserved = open_reserved(self.tmp / file, shape, dtype)
        offset = reserved.offset
        del reserved
        handle = open(self.tmp / file, "r+b")  # noqa: SIM115 - closed by commit / abort
        handle.seek(offset)
        self.files[file], self.dtypes[file], self.hashes[file] = handle, np.dtype(dtype), hashlib.sha256()
        self.rows[file] = 0

    def write(self, features: Mapping[str, torch.Tensor], index: torch.Tensor) -> None:
        """Append one batch: features (B, D) per layer and the dataset index (B,) of each row."""
        for name, block in features.items():
            self.write_layer(name, block)
        self.write_rows(index)

    def write_layer(self, name: str, block: torch.Tensor) -> None:
        """Append one batch's (B, D) features of one layer (the batch's rows are closed by ``write_rows``)."""
        self._append(_layer_file(name), block, len(block))

    def write_rows(self, index: torch.Tensor) -> None:
        """Close one batch: the dataset index (B,) of each row; every layer must have got B rows."""
        b = len(index)
        self._append("index.npy", index, b)
        self.pos += b
        short = [f for f, rows in self.rows.items() if rows != self.pos]
        if short:
            raise CacheError(f"{short[0]} has {self.rows[short[0]]} rows after a batch that closed at {self.pos}: "
                             "every layer must give one row per sample")

    def _append(self, file: str, block: torch.Tensor, rows: int) -> None:
        if self.rows[file] + rows > self.n:
            raise CacheError(f"more samples than announced ({self.rows[file] + rows} > {self.n}): the data changed "
                             "length")
        data = np.ascontiguousarray(block.detach().cpu().numpy().astype(self.dtypes[file], copy=False))
        self.files[file].write(data.data)
        self.hashes[file].update(data.data)
        self.rows[file] += rows

    def commit(self) -> dict[str, Any]:
        """Flush, check the row count, and move the shard into place; returns its manifest entry."""
        if self.pos != self.n:
            raise CacheError(f"extraction wrote {self.pos} of {self.n} samples (a DataLoader with drop_last?); "
                             "probe data must cover every sample")
        self._close()
        shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.tmp, self.final)
        return {"name": self.final.name, "rows": self.n,
                "sha256": {f: h.hexdigest() for f, h in self.hashes.items()}}

    def abort(self) -> None:
        """Drop a half-written shard."""
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


_VERIFIED: set[tuple[str, int, int, str]] = set()


def _verify(path: Path, arr: np.ndarray, digest: str, root: Path) -> None:
    """Check a file against its manifest checksum, once per process while its size and mtime stay the same."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, digest)
    if key in _VERIFIED:
        return
    if hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest() != digest:
        raise CacheError(f"{path} does not match its checksum (truncated or modified); delete {root} and extract again")
    _VERIFIED.add(key)


class FeatureCache:
    """One cache folder for one (model, layers, reductions) key: read, write and validate splits."""

    def __init__(self, root: str | Path, key: str) -> None:
        self.root = Path(root)
        self.key = key
        self.manifest = self._load_manifest()

    def _load_manifest(self) -> dict[str, Any]:
        """The manifest on disk, checked to belong to this key; a fresh one when there is none or it is of an older
        format (its splits are then extracted again)."""
        path = self.root / MANIFEST
        fresh = {"version": FORMAT_VERSION, "key": self.key, "layers": {}, "order": [], "splits": {}}
        try:
            manifest = json.loads(path.read_text()) if path.exists() else fresh
        except (ValueError, OSError) as e:
            raise CacheError(f"{path} cannot be read ({e}); delete {self.root} and extract again") from None
        if manifest.get("key") != self.key:
            raise CacheError(f"{self.root} holds features of a different model, layer set or reduction "
                             f"(key {manifest.get('key')} != {self.key}); delete the folder or choose another")
        return manifest if manifest.get("version") == FORMAT_VERSION else fresh

    @contextmanager
    def locked(self) -> Iterator[FeatureCache]:
        """Hold the folder's lock while this process uses it: a second process gets a clear error at once.

        On entry the manifest is read again (a previous holder may have changed it) and partial shards
        left by a killed process are removed; the lock dies with its process, so it never goes stale.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                raise CacheError(f"{self.root} is in use by another process (pid {holder}, holding "
                                 f"{self.root / LOCK}); wait for it to finish or pass another cache_dir") from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.manifest = self._load_manifest()
            for partial in self.root.glob("*/*.partial-*"):
                shutil.rmtree(partial, ignore_errors=True)
            yield self
        finally:
            os.close(fd)

    @contextmanager
    def locked_by_job(self) -> Iterator[FeatureCache]:
        """``locked`` for every rank of a torch.distributed job: rank 0 holds the lock until every rank is done,
        and the others start from its manifest once it has removed stale partial shards."""
        with self.locked() if distributed.rank() == 0 else nullcontext(self):
            distributed.barrier()
            self.manifest = distributed.broadcast_object(self.manifest)
            yield self
            distributed.barrier()

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """Per-layer metadata: raw shape, reduction (as a dict) and stored width."""
        layers: dict[str, dict[str, Any]] = self.manifest["layers"]
        return layers

    def set_layers(self, order: list[str], layers: Mapping[str, dict[str, Any]],
                   plan: Mapping[str, Any] | None = None) -> None:
        """Record the layer metadata and the taps' plan once (later splits must reuse the same captures and
        reductions)."""
        self.manifest["order"], self.manifest["layers"] = list(order), dict(layers)
        if plan is not None:
            self.manifest["plan"] = dict(plan)
        self._save()

    def is_complete(self, split: str, data_fingerprint: str) -> bool:
        """True when ``split`` was fully extracted from the same data."""
        entry = self.manifest["splits"].get(split)
        return bool(entry and entry["complete"] and entry["data"] == data_fingerprint
                    and all((self.root / split / s["name"]).is_dir() for s in entry["shards"]))

    def writer(self, split: str, n: int, *, dtype: str = "float32", rank: int = 0, world: int = 1) -> ShardWriter:
        """A writer for this process's shard of ``split`` (``n`` rows)."""
        widths = {name: meta["features"] for name, meta in self.layers.items()}
        return ShardWriter(self.root / split / shard_name(rank, world), widths, n, np.dtype(dtype))

    def complete(self, split: str, data_fingerprint: str, shards: list[dict[str, Any]], **stats: Any) -> None:
        """Mark ``split`` complete with its shards; the manifest is replaced atomically."""
        self.manifest["splits"][split] = {"complete": True, "data": data_fingerprint, "shards": shards,
                                          "rows": sum(s["rows"] for s in shards), **stats}
        self._save()

    def _save(self) -> None:
        atomic_write_text(self.root / MANIFEST, json.dumps(self.manifest, indent=1))

    def _entry(self, split: str) -> dict[str, Any]:
        entry: dict[str, Any] | None = self.manifest["splits"].get(split)
        if not entry or not entry["complete"]:
            raise CacheError(f"split {split!r} is not (completely) extracted in {self.root}")
        return entry

    def _read(self, split: str, file: str, verify: bool, rows: slice | None = None) -> np.ndarray:
        """One file's ``rows`` (in dataset order; all by default) gathered from the shards that hold them.

        Only those shards are read (and checksummed); one shard read whole stays memory-mapped.
        """
        shards = self._entry(split)["shards"]
        order = self._order(split)
        where = np.arange(sum(s["rows"] for s in shards))[rows or slice(None)]  # positions in the shards, end to end
        if order is not None:
            where = order[where]
        bounds = np.cumsum([0] + [s["rows"] for s in shards])
        parts = []
        for shard, start, stop in zip(shards, bounds, bounds[1:]):
            take = np.flatnonzero((where >= start) & (where < stop))
            if len(take):
                path = self.root / split / shard["name"] / file
                arr = self._open(path)
                if verify:
                    _verify(path, arr, shard["sha256"][file], self.root)
                parts.append((take, arr, start))
        if len(parts) == 1 and order is None and len(parts[0][1]) == len(where):
            return parts[0][1]
        like = parts[0][1] if parts else self._open(self.root / split / shards[0]["name"] / file)
        out = np.empty((len(where), *like.shape[1:]), dtype=like.dtype)
        for take, arr, start in parts:
            out[take] = arr[where[take] - start]
        return out

    def _order(self, split: str) -> np.ndarray | None:
        """Position in the shards (concatenated in manifest order) of each dataset row; None when already in order."""
        index = np.concatenate([self._open(self.root / split / s["name"] / "index.npy")
                                for s in self._entry(split)["shards"]])
        return None if np.array_equal(index, np.arange(len(index))) else np.argsort(index, kind="stable")

    def _open(self, path: Path) -> np.ndarray:
        """Memory-map one cached array; a file numpy cannot read (truncated header or data) is a CacheError."""
        try:
            array: np.ndarray = np.load(path, mmap_mode="r")
            return array
        except (ValueError, OSError, EOFError) as e:
            raise CacheError(f"{path} cannot be read ({e}): truncated or modified; "
                             f"delete {self.root} and extract again") from None

    def features(self, split: str, layer: str, *, verify: bool = True, rows: slice | None = None) -> np.ndarray:
        """The (N, D) features of ``layer`` on ``split``, or only ``rows`` of them (memory-mapped when one shard
        holds them all)."""
        if layer not in self.layers:
            raise CacheError(f"layer {layer!r} is not in the cache; cached: {list(self.layers)}")
        return self._read(split, _layer_file(layer), verify, rows)
