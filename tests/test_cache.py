from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from linprobe.capture.cache import CacheError, FeatureCache, shard_name


def _fill(cache: FeatureCache, split: str, n: int = 10, *, rank: int = 0, world: int = 1, dtype: str = "float32"):
    cache.set_layers(["a", "b"], {"a": {"shape": [3], "reduction": {"kind": "none"}, "features": 3},
                                  "b": {"shape": [2], "reduction": {"kind": "none"}, "features": 2}})
    index = torch.arange(rank, n * world, world)[:n]
    feats = {"a": index[:, None].float().repeat(1, 3) / 7, "b": -index[:, None].float().repeat(1, 2)}
    writer = cache.writer(split, n, dtype=dtype, rank=rank, world=world)
    for i in range(0, n, 4):  # batch by batch
        writer.write({k: v[i:i + 4] for k, v in feats.items()}, index[i:i + 4])
    return writer, feats


def test_round_trip_and_manifest(tmp_path):
    cache = FeatureCache(tmp_path, "k1")
    writer, feats = _fill(cache, "train")
    assert not cache.is_complete("train", "d1")
    cache.complete("train", "d1", [writer.commit()])
    again = FeatureCache(tmp_path, "k1")
    assert again.is_complete("train", "d1") and not again.is_complete("train", "other-data")
    np.testing.assert_array_equal(again.features("train", "a"), feats["a"].numpy())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 10 and manifest["order"] == ["a", "b"]
    assert set(manifest["splits"]["train"]["shards"][0]["sha256"]) == {"layer-a.npy", "layer-b.npy", "index.npy"}


def test_float16_storage(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    writer, feats = _fill(cache, "train", dtype="float16")
    cache.complete("train", "d", [writer.commit()])
    x = cache.features("train", "a")
    assert x.dtype == np.float16
    np.testing.assert_allclose(x.astype(np.float32), feats["a"].numpy(), rtol=1e-3)


def test_interrupted_shard_is_never_complete(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    writer, _ = _fill(cache, "train")  # not committed: the process "died" here
    assert not (tmp_path / "train" / shard_name(0, 1)).exists()
    assert not FeatureCache(tmp_path, "k").is_complete("train", "d")
    with pytest.raises(CacheError, match="not \\(completely\\) extracted"):
        FeatureCache(tmp_path, "k").features("train", "a")
    writer.abort()
    assert not list((tmp_path / "train").iterdir())


def test_short_extraction_is_refused(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    cache.set_layers(["a"], {"a": {"shape": [1], "reduction": {"kind": "none"}, "features": 1}})
    writer = cache.writer("train", 5)
    writer.write({"a": torch.zeros(3, 1)}, torch.arange(3))
    with pytest.raises(CacheError, match="wrote 3 of 5"):
        writer.commit()


def test_modified_file_fails_checksum(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    writer, _ = _fill(cache, "train")
    cache.complete("train", "d", [writer.commit()])
    path = tmp_path / "train" / shard_name(0, 1) / "layer-a.npy"
    arr = np.load(path, mmap_mode="r+")
    arr[0, 0] += 1
    arr.flush()
    with pytest.raises(CacheError, match="checksum.*delete"):
        FeatureCache(tmp_path, "k").features("train", "a")


def test_other_key_is_never_reused(tmp_path):
    FeatureCache(tmp_path, "k1").set_layers([], {})
    with pytest.raises(CacheError, match="different model"):
        FeatureCache(tmp_path, "k2")


def test_shards_of_several_ranks_combine_in_dataset_order(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    shards, parts = [], []
    for rank in range(2):
        writer, feats = _fill(cache, "train", n=5, rank=rank, world=2)
        shards.append(writer.commit())
        parts.append(feats["a"])
    cache.complete("train", "d", shards)
    x = FeatureCache(tmp_path, "k").features("train", "a")
    np.testing.assert_array_equal(x[:, 0], np.arange(10, dtype=np.float32) / np.float32(7))


def test_rows_of_strided_shards_read_only_what_is_asked(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    cache.complete("train", "d", [_fill(cache, "train", n=5, rank=rank, world=2)[0].commit() for rank in range(2)])
    cache = FeatureCache(tmp_path, "k")
    whole = cache.features("train", "b")
    for rows in (slice(3, 8), slice(0, 0), slice(6, None), slice(None)):
        np.testing.assert_array_equal(cache.features("train", "b", rows=rows), whole[rows])
