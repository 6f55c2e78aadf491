"""Robustness, property-based: reductions, the cache round trip and label handling on random inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from linprobe.capture.cache import FeatureCache
from linprobe.capture.reduce import parse_reduction, reduction_from_dict
from linprobe.data.datasets import as_labels
from linprobe.fit.tasks import _classes

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
specs = st.sampled_from(["auto", "none", "pool", "pool:2", "subset:5", "project:3"])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool])


@FUZZ
@given(shape=shapes, spec=specs, dtype=dtypes, batch=st.integers(1, 5), budget=st.integers(1, 40),
       seed=st.integers(0, 9))
def test_reductions_agree_with_out_features_and_are_deterministic(shape, spec, dtype, batch, budget, seed) -> None:
    try:
        r = parse_reduction(spec, shape, budget=budget, seed=seed)
        width = r.out_features(shape)
    except ValueError as e:
        assert "pooling needs" in str(e) and len(shape) == 1  # the one refused case: pooling a vector
        return
    h = (torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    out = r(h)
    assert out.shape == (batch, width) and out.dtype == torch.float32
    assert spec != "auto" or width <= budget  # the automatic policy always keeps to the budget
    assert reduction_from_dict(r.to_dict()) == r == parse_reduction(spec, shape, budget=budget, seed=seed)
    torch.testing.assert_close(r(h[:1]), out[:1])  # each row is reduced on its own: batching does not matter


@FUZZ
@given(n=st.integers(1, 20), widths=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       dtype=st.sampled_from(["float32", "float16"]), cuts=st.lists(st.integers(0, 20), max_size=4), data=st.data())
def test_cache_round_trip_in_any_batch_split(tmp_path_factory, n, widths, dtype, cuts, data) -> None:
    root = tmp_path_factory.mktemp("cache")
    names = [f"l{i}" for i in range(len(widths))]
    feats = {name: torch.randn(n, w) * 100 for name, w in zip(names, widths)}
    cache = FeatureCache(root, "k")
    cache.set_layers(names, {name: {"shape": [w], "reduction": {"kind": "none"}, "features": w}
                             for name, w in zip(names, widths)})
    writer = cache.writer("train", n, dtype=dtype)
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    for a, b in zip(bounds, bounds[1:]):
        writer.write({k: v[a:b] for k, v in feats.items()}, torch.arange(a, b))
    cache.complete("train", "d", [writer.commit()])
    again = FeatureCache(root, "k")
    for name in names:
        got = again.features("train", name)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, feats[name].numpy().astype(dtype))


@FUZZ
@given(values=st.lists(st.integers(0, 1000), min_size=2, max_size=30), as_float=st.booleans())
def test_any_whole_labels_map_to_0_k_and_back(values, as_float) -> None:
    assume(len(set(values)) >= 2)
    y = as_labels(np.array(values, dtype=np.float64 if as_float else np.int64))
    found = _classes("main", {"train": y})
    classes, coded = torch.tensor(found.classes), found.splits["train"]
    assert found.classes == sorted(set(values))
    assert coded.min() == 0 and coded.max() == len(classes) - 1
    assert torch.equal(classes[coded], y)


@FUZZ
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=10))
def test_labels_are_whole_non_negative_numbers_or_an_error(values) -> None:
    t = torch.tensor(values, dtype=torch.float64)
    valid = bool((t.isfinite() & (t == t.round()) & (t >= 0)).all()) and bool((t < 2**53).all())
    if valid:
        assert as_labels(values).tolist() == [int(v) for v in values]
    else:
        with pytest.raises(ValueError):
            as_labels(values)
