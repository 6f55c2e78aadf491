from __future__ import annotations

import numpy as np
import pytest
import torch

from linprobe.capture.reduce import (
    Flatten,
    Pool,
    Project,
    Standardizer,
    Subset,
    auto_reduction,
    parse_reduction,
    reduction_from_dict,
    resolve_reductions,
)


def test_pool_per_channel_and_to_k_by_k():
    h = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    torch.testing.assert_close(Pool((1,))(h), h.mean(dim=(2, 3)))
    out = Pool((2, 2))(h)
    assert out.shape == (2, 12)
    torch.testing.assert_close(out[0, 0], h[0, 0, :2, :2].mean())
    assert Pool((2, 2)).out_features((3, 4, 4)) == 12
    with pytest.raises(ValueError, match="pooling needs"):
        Pool((1,))(torch.ones(2, 5))


def test_subset_is_seeded_fixed_and_saved():
    a, b, c = Subset.random(100, 10, seed=1), Subset.random(100, 10, seed=1), Subset.random(100, 10, seed=2)
    assert a == b and a != c and len(set(a.indices)) == 10 and list(a.indices) == sorted(a.indices)
    h = torch.randn(4, 10, 10)
    torch.testing.assert_close(a(h), h.reshape(4, -1)[:, list(a.indices)])
    assert reduction_from_dict(a.to_dict()) == a
    state = torch.random.get_rng_state()
    Subset.random(1000, 10, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="made for 100 features"):
        a(torch.randn(2, 50))


def test_projection_is_seeded_and_preserves_norms_roughly():
    p = Project(256, 128, seed=0)
    h = torch.randn(64, 256)
    torch.testing.assert_close(p(h), Project(256, 128, seed=0)(h))
    ratio = p(h).norm(dim=1) / h.norm(dim=1)
    assert 0.8 < ratio.mean().item() < 1.2
    assert reduction_from_dict(p.to_dict()) == p


def test_auto_policy_keeps_pools_or_subsets():
    assert auto_reduction((100,), budget=128) == Flatten()
    assert auto_reduction((32, 28, 28), budget=8192) == Pool((14, 14))  # 6272 features: pooling by 2
    assert auto_reduction((256, 56, 56), budget=8192) == Pool((5, 5))  # smallest integer factor that fits
    assert isinstance(auto_reduction((20000,), budget=8192), Subset)
    assert isinstance(auto_reduction((10000, 2, 2), budget=8192), Subset)  # more channels than the budget


def test_parse_and_resolve_specs():
    assert parse_reduction("none", (3, 4, 4)) == Flatten()
    assert parse_reduction("pool:2", (3, 4, 4)) == Pool((2, 2))
    assert len(parse_reduction("subset:5", (3, 4, 4)).indices) == 5
    with pytest.raises(ValueError, match="unknown reduction 'median'"):
        parse_reduction("median", (3,))
    shapes = {"a": (3, 8, 8), "b": (10,)}
    got = resolve_reductions({"a": "pool"}, shapes, budget=50)
    assert got == {"a": Pool((1,)), "b": Flatten()}
    with pytest.raises(ValueError, match="not probed"):
        resolve_reductions({"c": "pool"}, shapes)
    assert resolve_reductions("pool", shapes)["b"] == Flatten()  # one spec for all layers: a vector stays whole
    with pytest.raises(ValueError, match="layer 'b'.*pooling needs"):
        resolve_reductions({"b": "pool"}, shapes)  # asked for by name: refused up front, not mid-extraction
    subsets = resolve_reductions("subset:2", {"a": (10,), "b": (10,)})
    assert subsets["a"].indices != subsets["b"].indices  # each layer its own draw


def test_standardizer_streams_and_survives_constant_features():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 4)).astype(np.float32)
    x[:, 2] = 7.0  # constant
    std = Standardizer.fit([x[:300], x[300:700], x[700:]])
    np.testing.assert_allclose(std.mean.numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std.std.numpy()[[0, 1, 3]], x.std(0)[[0, 1, 3]], rtol=1e-4)
    z = std(torch.from_numpy(x))
    assert torch.isfinite(z).all() and z[:, 2].abs().max() == 0
    with pytest.raises(ValueError, match="empty"):
        Standardizer.fit([])


def test_standardizer_floors_the_scale_of_rarely_active_units():
    x = np.zeros((1000, 3), dtype=np.float32)
    x[:, 0] = np.random.default_rng(0).normal(size=1000)
    x[0, 1] = 0.01  # a ReLU unit that fired once, weakly, in training: its own std is 3e-4
    std = Standardizer.fit([x])
    floor = 0.01 * np.sqrt((x[:, 0].var() + x[:, 1].var()) / 2)
    assert std.std[1].item() == pytest.approx(floor, rel=1e-3)
    assert std(torch.tensor([[0.0, 1.0, 0.0]]))[0, 1].item() < 150  # instead of ~3,000


@pytest.mark.parametrize("shape, size", [((3, 4, 28, 28), (14, 14)), ((3, 4, 14, 14), (7, 7)), ((2, 3, 9, 6), (3, 2)),
                                         ((2, 3, 28, 28), (4, 4)), ((2, 3, 10, 10), (3, 3)), ((2, 3, 12, 6), (4, 6)),
                                         ((2, 3, 6, 12), (6, 4)), ((2, 3, 8, 9), (4, 3)), ((2, 3, 5, 5), (5, 5))])
def test_pooling_fast_path_equals_adaptive_pooling(shape, size):
    h = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    got = Pool(size).apply(h)
    assert torch.allclose(got, torch.nn.functional.adaptive_avg_pool2d(h, size), atol=1e-6)


def test_a_global_pool_passes_flat_layers_through_and_errors_name_the_layer():
    from linprobe.capture.reduce import Flatten, Pool, resolve_reductions
    found = resolve_reductions("pool", {"conv": (4, 6, 6), "fc": (10,)})
    assert found == {"conv": Pool((1,)), "fc": Flatten()}
    with pytest.raises(ValueError, match=r"layer 'fc' \(per-sample shape \(10,\)\): pooling needs"):
        resolve_reductions({"fc": "pool"}, {"conv": (4, 6, 6), "fc": (10,)})
