"""Ridge regression probes: the exact L2 path against scikit-learn's Ridge(alpha=N*l2), the choice, the metrics."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from linprobe import distributed
from linprobe.fit import ridge
from linprobe.fit.ridge import RidgePath, fit_ridge_paths, regression_metrics, ridge_objective, sklearn_alpha
from linprobe.fit.solvers import FitSettings, LinearWeights

ALL = FitSettings(patience=None)  # the whole default path, strong to weak


def _problem(n: int, d: int, k: int, seed: int = 0, *, raw: bool = False, m: int = 150):
    """Train and valid features (float32) with targets (n, k) from a few informative features plus noise: weak L2
    overfits when D is large against N. ``raw``: features of very different scales and offsets."""
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    B = torch.zeros(d, k)
    B[:min(d, 6)] = torch.randn(min(d, 6), k, generator=g)
    B += 0.05 * torch.randn(d, k, generator=g)
    y = X @ B + 0.8 * torch.randn(n, k, generator=g) + 3.0
    yv = Xv @ B + 0.8 * torch.randn(m, k, generator=g) + 3.0
    if raw:
        scale = torch.logspace(-2, 2, d)[torch.randperm(d, generator=g)]
        offset = 50 * torch.randn(d, generator=g)
        X, Xv = X * scale + offset, Xv * scale + offset
    return X, y, Xv, yv


def _sklearn_path(X, y, Xv, yv, l2s):
    """sklearn Ridge(alpha=N*l2) at every l2: (coef (D, K), intercept (K,), valid mse, valid r2)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import mean_squared_error, r2_score

    Xn, yn, Xvn, yvn = (t.double().numpy() for t in (X, y, Xv, yv))
    out = []
    for l2 in l2s:
        model = Ridge(alpha=sklearn_alpha(l2, len(Xn))).fit(Xn, yn)
        pred = model.predict(Xvn)
        out.append((model.coef_.reshape(yn.shape[1], -1).T, np.reshape(model.intercept_, -1),
                    mean_squared_error(yvn, pred), r2_score(yvn, pred)))
    return out


def _close(a, b, rtol: float) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-12))


def test_sklearn_alpha():
    assert sklearn_alpha(1e-2, 1000) == pytest.approx(10.0)


@pytest.mark.parametrize("raw", [False, True], ids=["standardised", "raw"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("n,d,method", [(400, 60, "covariance"), (90, 300, "gram")])
def test_matches_sklearn_ridge(n, d, method, k, raw):
    X, y, Xv, yv = _problem(n, d, k, seed=n + d + k, raw=raw)
    if raw:  # standardised features need no scaling; raw ones are scaled so that the path brackets the optimum
        settings = FitSettings(l2_path=tuple(10.0 ** e for e in range(5, -5, -1)), patience=None)
    else:
        settings = ALL
    fit = fit_ridge_paths([X], y, [Xv], yv, settings)[0]
    assert isinstance(fit, RidgePath) and fit.method == method
    assert [p.l2 for p in fit.path] == settings.path
    ref = _sklearn_path(X, y, Xv, yv, settings.path)
    for point, (_, _, mse, r2) in zip(fit.path, ref):  # every point of the path, not only the chosen one
        assert point.valid_mse == pytest.approx(mse, rel=1e-8)
        assert point.valid_r2 == pytest.approx(r2, rel=1e-8, abs=1e-8)
        assert point.iterations == 0 and point.converged
    mses = [r[2] for r in ref]
    chosen = min(range(len(mses)), key=lambda i: (mses[i], -settings.path[i]))
    assert fit.l2 == settings.path[chosen] and fit.best_l2 == fit.l2
    assert d < n or 0 < chosen < len(mses) - 1  # the wide problem's optimum is inside the path
    coef, intercept, mse, r2 = ref[chosen]
    assert fit.weights.W.shape == (d, k) and fit.weights.b.shape == (k,)
    assert fit.weights.W.dtype == torch.float32
    _close(fit.weights.W.numpy(), coef, 1e-4)
    _close(fit.weights.b.numpy(), intercept, 1e-4)
    assert fit.valid_r2 == pytest.approx(r2, abs=1e-6)
    assert fit.valid_mse == pytest.approx(mse, rel=1e-6)
    found = regression_metrics(fit.weights.logits(Xv), yv)  # the float32 probe itself
    assert found["r2"] == pytest.approx(r2, abs=1e-5)
    loss, _ = ridge_objective(X, y, fit.weights, fit.l2)
    assert fit.point.train_loss == pytest.approx(loss, rel=1e-4)
    assert fit.best.loss == fit.point.train_loss and fit.best.weights is fit.weights


def test_one_dimensional_targets_are_one_output():
    X, y, Xv, yv = _problem(200, 20, 1, seed=3)
    flat = fit_ridge_paths([X], y[:, 0], [Xv], yv[:, 0], ALL)[0]
    col = fit_ridge_paths([X], y, [Xv], yv, ALL)[0]
    assert flat.l2 == col.l2 and flat.weights.W.shape == (20, 1)
    assert torch.equal(flat.weights.W, col.weights.W) and torch.equal(flat.weights.b, col.weights.b)


def test_stacked_layers_equal_per_layer_lists():
    layers = [_problem(300, 24, 2, seed=s) for s in range(3)]
    y, yv = layers[0][1], layers[0][3]
    train = torch.stack([layer[0] for layer in layers])
    valid = [layer[2] for layer in layers]
    stacked = fit_ridge_paths(train, y, torch.stack(valid), yv, ALL)
    one_by_one = [fit_ridge_paths([train[p]], y, [valid[p]], yv, ALL)[0] for p in range(3)]
    listed = fit_ridge_paths(list(train), y, valid, yv, ALL)
    assert len(stacked) == 3
    for a, b, c in zip(stacked, one_by_one, listed):
        assert a.l2 == b.l2 == c.l2
        assert torch.equal(a.weights.W, b.weights.W) and torch.equal(a.weights.W, c.weights.W)
        assert torch.equal(a.weights.b, b.weights.b)
        assert [p.valid_mse for p in a.path] == [p.valid_mse for p in b.path]


def test_mixed_widths_in_one_call():
    X1, y, Xv1, yv = _problem(120, 30, 2, seed=5)
    X2, Xv2 = torch.randn(120, 400, generator=torch.Generator().manual_seed(6)), torch.randn(150, 400)
    fits = fit_ridge_paths([X1, X2], y, [Xv1, Xv2], yv, ALL)
    assert [f.method for f in fits] == ["covariance", "gram"]
    assert fits[0].weights.W.shape == (30, 2) and fits[1].weights.W.shape == (400, 2)


@pytest.mark.parametrize("n,d", [(200, 16), (40, 100)], ids=["covariance", "gram"])
def test_collapsed_layer_predicts_the_mean(n, d):
    _, y, _, yv = _problem(n, 5, 2, seed=7)
    X, Xv = torch.full((n, d), 3.7), torch.full((150, d), 3.7)
    settings = FitSettings(l2_path=(*ALL.l2_path, 0.0), patience=None)  # l2 = 0 too: the minimum-norm solution
    fit = fit_ridge_paths([X], y, [Xv], yv, settings)[0]
    values = [v for p in fit.path for v in (p.valid_mse, p.valid_r2, p.train_loss)]
    assert not any(math.isnan(v) for v in values)
    assert torch.isfinite(fit.weights.W).all() and torch.isfinite(fit.weights.b).all()
    assert torch.equal(fit.weights.W, torch.zeros(d, 2))
    torch.testing.assert_close(fit.weights.b, y.mean(0), rtol=1e-6, atol=1e-6)
    assert fit.valid_r2 <= 0
    assert fit.l2 == 10.0  # every point ties: the strongest L2
    from sklearn.metrics import r2_score
    mean = y.double().mean(0).expand_as(yv).numpy()
    assert fit.valid_r2 == pytest.approx(r2_score(yv.double().numpy(), mean), abs=1e-9)


def test_patience_stops_the_path():
    X, y, Xv, yv = _problem(60, 300, 1, seed=11)
    full = fit_ridge_paths([X], y, [Xv], yv, ALL)[0]
    mses = [p.valid_mse for p in full.path]
    rises = [i for i in range(1, len(mses)) if mses[i] > mses[i - 1]]
    assert rises, "the test needs a path whose valid MSE rises"
    early = fit_ridge_paths([X], y, [Xv], yv, FitSettings(patience=1))[0]
    assert len(early.path) == rises[0] + 1
    assert [p.valid_mse for p in early.path] == mses[:rises[0] + 1]
    kept = mses[:rises[0] + 1]
    assert early.l2 == early.path[kept.index(min(kept))].l2


@pytest.mark.parametrize("rank", [4, 256], ids=["weak-preconditioner", "exact-preconditioner"])
@pytest.mark.parametrize("n,d", [(300, 40), (50, 120)], ids=["tall", "wide"])
def test_conjugate_gradient_matches_the_closed_form(monkeypatch, n, d, rank):
    X, y, Xv, yv = _problem(n, d, 2, seed=13, raw=True)
    settings = FitSettings(l2_path=(1e2, 1e1, 1.0, 1e-1, 1e-2), patience=None, tol=1e-10, max_iter=2000)
    exact = fit_ridge_paths([X], y, [Xv], yv, settings)[0]
    monkeypatch.setattr(ridge, "_EXACT_MAX", 8)
    monkeypatch.setattr(ridge, "_NYSTROM_RANK", rank)
    cg = fit_ridge_paths([X], y, [Xv], yv, settings)[0]
    assert cg.method == "cg" and exact.method != "cg"
    assert all(p.converged and 0 < p.iterations <= 2000 for p in cg.path)
    assert cg.l2 == exact.l2
    for a, b in zip(cg.path, exact.path):
        assert a.valid_mse == pytest.approx(b.valid_mse, rel=1e-7)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-6)
    _close(cg.weights.W.numpy(), exact.weights.W.numpy(), 1e-5)
    _close(cg.weights.b.numpy(), exact.weights.b.numpy(), 1e-5)
    assert cg.path[0].iterations > (2 if rank < d else 0)
    monkeypatch.setattr(ridge, "_NYSTROM_RANK", 2)
    short = fit_ridge_paths([X], y, [Xv], yv, FitSettings(l2_path=(1e-2,), max_iter=2, tol=1e-10))[0]
    assert short.path[0].iterations == 2 and not short.path[0].converged


def test_regression_metrics_are_sklearns():
    from sklearn.metrics import mean_squared_error, r2_score

    g = torch.Generator().manual_seed(17)
    y = torch.randn(50, 3, generator=g)
    y[:, 2] = 1.5  # a constant output: sklearn scores it 0 unless predicted exactly
    pred = y + 0.3 * torch.randn(50, 3, generator=g)
    found = regression_metrics(pred, y)
    assert found["mse"] == pytest.approx(mean_squared_error(y.double().numpy(), pred.double().numpy()), rel=1e-12)
    assert found["r2"] == pytest.approx(r2_score(y.double().numpy(), pred.double().numpy()), rel=1e-12)
    pred[:, 2] = 1.5
    exact = r2_score(y.double().numpy(), pred.double().numpy())
    assert regression_metrics(pred, y)["r2"] == pytest.approx(exact, rel=1e-12)
    one = regression_metrics(pred[:, 0], y[:, 0])
    assert one["r2"] == pytest.approx(r2_score(y[:, 0].double().numpy(), pred[:, 0].double().numpy()), rel=1e-12)
    assert regression_metrics(y, y) == {"mse": 0.0, "r2": 1.0}
    with pytest.raises(ValueError, match="one shape"):
        regression_metrics(pred, y[:, :2])


def test_bad_inputs_raise_clear_errors():
    X, y, Xv, yv = _problem(40, 5, 2, seed=19)
    with pytest.raises(ValueError, match=r"y must be \(N,\) or \(N, K\) targets, got shape \(40, 2, 1\); flatten"):
        fit_ridge_paths([X], y[:, :, None], [Xv], yv)
    bad = y.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^y has 1 non-finite values \(NaN or inf\); drop or impute those rows"):
        fit_ridge_paths([X], bad, [Xv], yv)
    bad = yv.clone()
    bad[0] = float("inf")
    with pytest.raises(ValueError, match=r"^y_valid has 2 non-finite values"):
        fit_ridge_paths([X], y, [Xv], bad)
    with pytest.raises(ValueError, match=r"^layer 0 has 40 training rows but y has 39; pass one target row per"):
        fit_ridge_paths([X], y[:39], [Xv], yv)
    with pytest.raises(ValueError, match=r"^layer 0 has 150 validation rows but y_valid has 149"):
        fit_ridge_paths([X], y, [Xv], yv[:149])
    with pytest.raises(ValueError, match=r"wrap a single layer as \[X\]"):
        fit_ridge_paths(X, y, [Xv], yv)
    with pytest.raises(ValueError, match="1 training and 2 validation"):
        fit_ridge_paths([X], y, [Xv, Xv], yv)
    with pytest.raises(ValueError, match="y has 2 outputs but y_valid has 1"):
        fit_ridge_paths([X], y, [Xv], yv[:, 0])
    with pytest.raises(ValueError, match=r"layer 0: expected train \(N, D\) and valid \(M, D\)"):
        fit_ridge_paths([X], y, [Xv[:, :4]], yv)
    Xbad = X.clone()
    Xbad[2, 2] = float("nan")
    with pytest.raises(ValueError, match="^layer 0: features have non-finite values"):
        fit_ridge_paths([Xbad], y, [Xv], yv)
    assert fit_ridge_paths([], y, [], yv) == []


def test_probe_is_a_linear_weights_in_the_solvers_convention():
    X, y, Xv, yv = _problem(100, 8, 2, seed=23)
    fit = fit_ridge_paths([X], y, [Xv], yv, ALL)[0]
    assert isinstance(fit.weights, LinearWeights)
    torch.testing.assert_close(fit.weights.logits(Xv), Xv @ fit.weights.W + fit.weights.b)


# ----------------------------------------------------------------------------------------------- two processes

WORLD = 2


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        X, y, Xv, yv = _problem(301, 12, 2, seed=29, raw=True, m=97)  # uneven shares
        rows = distributed.shard_range(len(y), rank, WORLD)
        vrows = distributed.shard_range(len(yv), rank, WORLD)
        part = (X[rows.start:rows.stop], y[rows.start:rows.stop], Xv[vrows.start:vrows.stop],
                yv[vrows.start:vrows.stop])
        settings = FitSettings(patience=None, tol=1e-10, max_iter=500)
        cov = fit_ridge_paths([part[0]], part[1], [part[2]], part[3], settings, sharded=True)[0]
        ridge._EXACT_MAX = 4  # the CG path on the same shares
        cg = fit_ridge_paths([part[0]], part[1], [part[2]], part[3], settings, sharded=True)[0]
        torch.save({"cov": cov, "cg": cg}, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_fit_matches_one_process(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)
    X, y, Xv, yv = _problem(301, 12, 2, seed=29, raw=True, m=97)
    single = fit_ridge_paths([X], y, [Xv], yv, FitSettings(patience=None))[0]
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["cov"].method == "covariance" and got["cg"].method == "cg"
        for fit in (got["cov"], got["cg"]):
            assert fit.l2 == single.l2
            for a, b in zip(fit.path, single.path):
                assert a.valid_mse == pytest.approx(b.valid_mse, rel=1e-7)
                assert a.valid_r2 == pytest.approx(b.valid_r2, rel=1e-7, abs=1e-9)
            _close(fit.weights.W.numpy(), single.weights.W.numpy(), 1e-5)
            _close(fit.weights.b.numpy(), single.weights.b.numpy(), 1e-5)
