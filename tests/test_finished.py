from __future__ import annotations

import csv
import json
import os
import warnings

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

import linprobe as lp
from linprobe import finished
from linprobe.capture.cache import FeatureCache
from linprobe.data.datasets import ArrayDataset, load_mnist, stratified_split
from linprobe.fit.solvers import sklearn_C


def _sklearn_test_error(train: ArrayDataset, test: ArrayDataset, l2: float) -> float:
    x_tr, x_te = train.x.flatten(1).numpy(), test.x.flatten(1).numpy()
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(C=sklearn_C(l2, len(x_tr)), solver="lbfgs", max_iter=5000, tol=1e-8)
    clf.fit(scaler.transform(x_tr), train.y.numpy())
    return 1.0 - clf.score(scaler.transform(x_te), test.y.numpy())


def test_input_probe_matches_sklearn_on_digits(digits_splits):
    train, valid, test = digits_splits
    result = lp.probe(nn.Identity(), train, valid, test, layers="input", progress=False)
    l2 = result.layers[0].l2
    ours = result.value("input", "test")
    assert abs(ours - _sklearn_test_error(train, test, l2)) <= 0.005
    assert ours < 0.06  # a linear classifier on digits


def test_input_probe_on_real_mnist_pixels():
    train, valid, test = stratified_split(load_mnist(), [0.7, 0.1, 0.2], seed=0)
    result = lp.probe(nn.Flatten(), train, valid, test, layers="input", progress=False)
    err = result.value("input", "test")
    assert 0.07 <= err <= 0.12
    assert abs(err - _sklearn_test_error(train, test, result.layers[0].l2)) <= 0.005


def test_results_files_and_table(tmp_path, small_net, digits_splits):
    train, valid, test = (ArrayDataset(d.x, d.y) for d in digits_splits)
    result = lp.probe(small_net, train, valid, test, layers=["input", "conv", "layer1", "head"],
                      cache_dir=tmp_path, progress=False)
    assert result.names == ["input", "conv", "layer1", "head"]  # execution order
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert list(rows[0]) == ["step", "task", "layer", "split", "metric", "value", "lo", "hi"]
    assert {r["metric"] for r in rows} == {"top1_error", "top5_error", "cross_entropy", "balanced_error", "macro_f1",
                                           "l2"}
    assert len(rows) == 4 * (3 * 5 + 1)
    errors = [r for r in rows if r["metric"] in ("top1_error", "top5_error", "balanced_error", "macro_f1")]
    assert all(float(r["lo"]) <= float(r["value"]) <= float(r["hi"]) for r in errors)  # every error has its interval
    assert {r["task"] for r in rows} == {"main"}
    assert result.value("conv", "valid", "l2") == result.layers[1].l2
    assert json.dumps(lp.ProbeResult.load(tmp_path).to_dict()) == json.dumps(result.to_dict())
    assert (tmp_path / "errors.png").stat().st_size > 1000
    table = result.table()
    assert table.splitlines()[0].startswith("layer") and len(table.splitlines()) == 5
    info = result.layers[1]
    assert info.shape == (4, 8, 8) and info.features_in == 256 and info.chance_error == pytest.approx(0.898, abs=0.01)
    bank = lp.ProbeBank.load(tmp_path / "probes")
    x = test.x[:7]
    with lp.Taps(small_net, "conv") as taps:
        raw = taps.run(x)["conv"]
    torch.testing.assert_close(bank["conv"](raw), result.probes["conv"](raw))


def test_cache_is_reused_and_model_untouched(tmp_path, small_net, digits_splits):
    calls = []
    small_net.conv.register_forward_hook(lambda *a: calls.append(1))
    small_net.train()
    before = {k: v.clone() for k, v in small_net.state_dict().items()}
    first = lp.probe(small_net, *digits_splits[:2], layers=["conv", "layer2"], cache_dir=tmp_path, progress=False,
                     batch_size=512)
    n_calls = len(calls)
    assert n_calls == 1 + 3 + 1  # a discovering forward (4 samples), then one forward per batch: train (1078 rows)
    # in 3 batches of 512, valid in 1
    second = lp.probe(small_net, *digits_splits[:2], layers=["conv", "layer2"], cache_dir=tmp_path, progress=False)
    assert len(calls) == n_calls  # no forward: read back from the cache
    assert first.to_dict()["rows"] == second.to_dict()["rows"]
    assert small_net.training and all(m.training for m in small_net.modules())
    assert all(torch.equal(before[k], v) for k, v in small_net.state_dict().items())
    assert all(p.grad is None for p in small_net.parameters())
    with torch.no_grad():
        small_net.conv.bias += 1  # a new checkpoint: a new cache folder, never the old features
    lp.probe(small_net, *digits_splits[:2], layers=["conv", "layer2"], cache_dir=tmp_path, progress=False)
    assert len(calls) > n_calls
    assert len(list((tmp_path / "features").iterdir())) == 2


def test_forward_stops_after_deepest_layer(small_net, digits_splits):
    head_calls = []
    small_net.head.register_forward_hook(lambda *a: head_calls.append(1))
    lp.probe(small_net, *digits_splits[:2], layers="conv", progress=False, batch_size=256)
    assert len(head_calls) == 1  # only the discovering forward (4 samples) runs the whole model


def test_test_labels_do_not_influence_selection(monkeypatch, digits_splits):
    train, valid, test = digits_splits
    shuffled = ArrayDataset(test.x, test.y[torch.randperm(len(test.y), generator=torch.Generator().manual_seed(0))])
    events = []
    real_evaluate, real_fit = finished.evaluate, finished.fit_paths
    assert len(test) not in (len(train), len(valid))  # an evaluation on test is told by its length
    monkeypatch.setattr(finished, "evaluate",
                        lambda task, out, y, **k: events.append(len(y)) or real_evaluate(task, out, y, **k))
    monkeypatch.setattr(finished, "fit_paths", lambda *a, **k: events.append("fit") or real_fit(*a, **k))
    a = lp.probe(nn.Flatten(), train, valid, test, layers="all", progress=False)
    assert events.index(len(test)) > max(i for i, e in enumerate(events) if e == "fit")
    b = lp.probe(nn.Flatten(), train, valid, shuffled, layers="all", progress=False)
    keep = [r for r in a.rows if r.split != "test"]
    assert keep == [r for r in b.rows if r.split != "test"]
    assert [i.l2 for i in a.layers] == [i.l2 for i in b.layers]
    assert a.value("input", "test") < 0.1 < b.value("input", "test")


def test_results_do_not_depend_on_extraction_batch_size(small_net, digits_splits):
    a = lp.probe(small_net, *digits_splits, layers=["layer1", "head"], batch_size=64, progress=False)
    b = lp.probe(small_net, *digits_splits, layers=["layer1", "head"], batch_size=500, progress=False)
    for ra, rb in zip(a.rows, b.rows):
        assert (ra.layer, ra.split, ra.metric) == (rb.layer, rb.split, rb.metric)
        assert ra.value == pytest.approx(rb.value, abs=2e-3)


def test_cache_key_tracks_everything_that_changes_features(small_net):
    base = finished.cache_key(small_net, ["conv"], "auto", budget=10)
    assert base == finished.cache_key(small_net, ["conv"], "auto", budget=10)
    assert base != finished.cache_key(small_net, ["conv"], "pool", budget=10)
    assert base != finished.cache_key(small_net, ["conv", "head"], "auto", budget=10)
    assert base != finished.cache_key(small_net, ["conv"], "auto", budget=11)


def test_cache_key_tracks_settings_without_parameters_and_edited_selectors():
    """Two models with equal weights but another activation, and two different selector lambdas (also inside a
    per-layer mapping), give different keys; the same lambda written twice gives the same key."""
    def net(act: nn.Module) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), act)

    assert finished.cache_key(net(nn.ReLU()), ["1"], "auto") != finished.cache_key(net(nn.GELU()), ["1"], "auto")
    first, same, other = (lambda out: out[0]), (lambda out: out[0]), (lambda out: out[1])
    key = finished._selector_key
    assert key(first) == key(same) != key(other)
    assert key({"a": first}) == key({"a": same}) != key({"a": other})
    assert "0x" not in json.dumps(key({"a": first, "b": len}))  # no memory address: a cache reused across runs


def test_big_layer_is_reduced_by_the_budget(digits_splits):
    wide = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1))  # 64 x 8 x 8 = 4096 features
    result = lp.probe(wide, *digits_splits, layers="0", feature_budget=1024, progress=False)
    info = result.layers[0]
    assert info.features_in == 4096 and info.features_out == 1024 and info.reduction["kind"] == "pool"
    assert "pool 4x4" in result.table()
    assert result.value("0", "test") < 0.2


def test_dataloader_and_array_inputs_agree(digits_splits):
    from torch.utils.data import DataLoader, TensorDataset

    train, valid, test = digits_splits
    loaders = [DataLoader(TensorDataset(d.x, d.y), batch_size=100) for d in (train, valid, test)]
    arrays = [(d.x.numpy(), d.y.numpy()) for d in (train, valid, test)]
    a = lp.probe(nn.Flatten(), *loaders, layers="input", progress=False)
    b = lp.probe(nn.Flatten(), *arrays, layers="input", progress=False)
    assert [r.value for r in a.rows] == pytest.approx([r.value for r in b.rows], abs=1e-6)


def test_class_missing_from_train_is_an_error(digits_splits):
    train, valid, _ = digits_splits
    keep = train.y != 9
    with pytest.raises(ValueError, match=r"class\(es\) \[9\] occur in the valid split but not in train"):
        lp.probe(nn.Flatten(), ArrayDataset(train.x[keep], train.y[keep]), valid, layers="input", progress=False)


def test_warm_start_reaches_the_same_probes_in_fewer_iterations(small_net, digits_splits):
    """A convex fit started from an earlier probe ends at the same optimum, only faster."""
    train, valid, test = digits_splits
    options = dict(layers=["input", "layer2.relu"], reduce="none", l2_path=(1e-2,), progress=False, max_iter=1000)
    cold = lp.probe(small_net, train, valid, test, **options)
    warm = lp.probe(small_net, train, valid, test, warm_start=cold.probes, **options)
    assert sum(p.iterations for p in warm.probes) < sum(p.iterations for p in cold.probes) / 2
    for layer in ("input", "layer2.relu"):
        assert warm.value(layer, "test") == pytest.approx(cold.value(layer, "test"), abs=0.003)
        assert torch.allclose(warm.probes[layer].weight, cold.probes[layer].weight, atol=2e-3, rtol=2e-2)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_fit_reads_standardised_layers_from_unlinked_scratch_files(tmp_path):
    """The CPU fit's standardised copy of a layer lives in a memory-mapped file (page cache, not anonymous memory):
    the numbers equal the standardiser's, and no file is left behind, even while the tensor is alive."""
    import numpy as np

    raw = np.random.default_rng(0).normal(3.0, 2.0, size=(20000, 7)).astype(np.float32)
    std = lp.capture.reduce.Standardizer.fit([raw[i:i + 5000] for i in range(0, len(raw), 5000)])
    x = finished._standardized(raw, std, torch.device("cpu"), tmp_path)
    assert list(tmp_path.iterdir()) == []
    maps = [line for line in open("/proc/self/maps") if f"{tmp_path}/.fit-" in line]
    assert maps and all(line.rstrip().endswith("(deleted)") for line in maps)  # file-backed, already unlinked
    torch.testing.assert_close(x, std(torch.from_numpy(raw)), rtol=0, atol=0)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_a_fit_stopped_by_max_iter_is_reported_and_warned(digits_splits):
    """A chosen probe that reached max_iter before converging is named in meta and a warning, with the fix."""
    train, valid, test = digits_splits
    with pytest.warns(UserWarning, match=r"1 probe\(s\) reached max_iter=3 before converging \(input; .*larger max_iter"):
        short = lp.probe(nn.Identity(), train, valid, test, layers="input", progress=False, max_iter=3)
    assert short.meta["not_converged"] == {"input": f"l2={short.layers[0].l2:g}: stopped after 3 iterations"}
    assert short.probes["input"].iterations == 3 and short.probes["input"].converged is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = lp.probe(nn.Identity(), train, valid, test, layers="input", progress=False)
    assert "not_converged" not in full.meta and full.probes["input"].converged is True
    assert 3 < full.probes["input"].iterations <= 500


def test_raw_features_without_standardising(digits_splits):
    """``standardize=False`` fits the raw features (identity statistics in the probe) to scikit-learn's optimum on
    the same raw features; the probe reads raw layer outputs either way."""
    train, valid, test = digits_splits
    raw = lp.probe(nn.Flatten(), train, valid, test, layers="input", standardize=False, progress=False,
                   l2_path=(1e-2,))
    probe = raw.probes["input"]
    assert torch.equal(probe.mean, torch.zeros_like(probe.mean)) and torch.equal(probe.std, torch.ones_like(probe.std))
    x, y = train.x.flatten(1).double().numpy(), train.y.numpy()
    sk = LogisticRegression(C=lp.fit.solvers.sklearn_C(1e-2, len(y)), max_iter=5000, tol=1e-8).fit(x, y)
    xt = test.x.flatten(1)
    agree = (probe(xt).argmax(1).numpy() == sk.predict(xt.double().numpy())).mean()
    assert agree >= 0.99
    assert raw.value("input", "test") == pytest.approx(float((sk.predict(xt.double().numpy()) != test.y.numpy()).mean()),
                                                       abs=0.01)
    assert raw.meta["provenance"]["settings"]["standardize"] is False
