"""The convex probe solver: agreement with scikit-learn, convergence, warm starts, L2 selection."""
from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
import torch
from conftest import one_thread

from linprobe.fit.metrics import chance_error, cross_entropy, topk_error
from linprobe.fit.solvers import (
    DEFAULT_L2_PATH,
    LinearWeights,
    fit_l2_path,
    fit_logistic,
    objective,
    sklearn_C,
)

L2 = 1e-2


@pytest.fixture(scope="module")
def digits():
    """sklearn digits, stratified 70/30 split, standardised with train statistics (float64 numpy)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd == 0] = 1.0
    return (Xtr - mu) / sd, ytr, (Xte - mu) / sd, yte


def _t(a, dtype=torch.float32):
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)


def _max_grad(X, y, w: LinearWeights, l2: float) -> float:
    return objective(X, y, w, l2)[1]


def _noisy_wide(seed: int, n: int, d: int = 300, c: int = 3, k: int = 5, snr: float = 8.0):
    """Few samples, many mostly-noise features (signal in the first k): weak L2 overfits."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(k, c, generator=torch.Generator().manual_seed(99))  # shared by every split
    X = torch.randn(n, d, generator=g)
    y = (snr * X[:, :k] @ V / k ** 0.5 + torch.randn(n, c, generator=g)).argmax(1)
    return X, y


def test_sklearn_C_mapping():
    assert sklearn_C(1e-2, 1000) == pytest.approx(0.1)
    assert sklearn_C(1.0, 1) == pytest.approx(1.0)


def test_default_path_is_descending_log_spaced():
    p = np.array(DEFAULT_L2_PATH)
    assert 6 <= len(p) <= 8 and np.all(np.diff(p) < 0) and np.allclose(np.diff(np.log10(p)), -1.0)


def test_matches_sklearn_on_digits(digits):
    from sklearn.linear_model import LogisticRegression

    Xtr, ytr, Xte, yte = digits
    n = len(ytr)
    kw = dict(C=sklearn_C(L2, n), solver="lbfgs", max_iter=5000, tol=1e-8)
    if "multi_class" in inspect.signature(LogisticRegression).parameters:  # removed in sklearn >= 1.8
        kw["multi_class"] = "multinomial"
    sk = LogisticRegression(**kw).fit(Xtr, ytr)
    res = fit_logistic(_t(Xtr), _t(ytr, torch.long), 10, L2)
    assert res.converged
    W, W_sk = res.weights.W.double().numpy(), sk.coef_.T  # multinomial coef_: (C, D)
    rel = np.linalg.norm(W - W_sk) / np.linalg.norm(W_sk)
    logits = res.weights.logits(_t(Xte))
    err = topk_error(logits, _t(yte, torch.long))
    err_sk = float(np.mean(sk.predict(Xte) != yte))
    b, b_sk = res.weights.b.double().numpy(), sk.intercept_  # bias is defined up to a constant shift
    print(f"\ndigits l2={L2}: ours err {err:.4f} sklearn err {err_sk:.4f} rel||W-W_sk|| {rel:.2e} iters {res.iterations}")
    assert rel < 1e-2
    assert abs(err - err_sk) <= 0.005
    assert np.abs((b - b.mean()) - (b_sk - b_sk.mean())).max() < 1e-2 * max(1.0, np.abs(b_sk).max())
    agree = np.mean(logits.argmax(1).numpy() == sk.predict(Xte))
    assert agree >= 0.995
    # objective values agree too: ours = sklearn's / (C * n)
    assert res.loss == pytest.approx(
        float(np.mean(-np.log(sk.predict_proba(Xtr)[np.arange(n), ytr])) + 0.5 * L2 * np.sum(W_sk ** 2)), rel=1e-4)


def test_converges_gradient_below_tol(digits):
    Xtr, ytr, _, _ = digits
    X, y = _t(Xtr), _t(ytr, torch.long)
    tol = 1e-5
    res = fit_logistic(X, y, 10, L2, tol=tol)
    assert res.converged
    assert 0 < res.iterations < 500
    assert _max_grad(X, y, res.weights, L2) <= tol * max(1.0, X.square().mean().sqrt().item())
    assert res.weights.W.shape == (64, 10) and res.weights.W.dtype == torch.float32
    assert not res.weights.W.requires_grad and res.weights.b.shape == (10,)


def test_max_iter_not_converged(digits):
    Xtr, ytr, _, _ = digits
    res = fit_logistic(_t(Xtr), _t(ytr, torch.long), 10, 1e-4, max_iter=3)
    assert res.iterations == 3 and not res.converged


def test_warm_start_from_solution(digits):
    Xtr, ytr, _, _ = digits
    X, y = _t(Xtr), _t(ytr, torch.long)
    cold = fit_logistic(X, y, 10, L2)
    init_copy = cold.weights.clone()
    warm = fit_logistic(X, y, 10, L2, init=cold.weights)
    assert warm.converged and warm.iterations <= 3
    assert torch.equal(cold.weights.W, init_copy.W) and torch.equal(cold.weights.b, init_copy.b)  # init untouched
    # from a nearby L2's solution: the same (unique) optimum as a cold start, to float32's resolution: a weight
    # rounded to float32 moves the gradient by ~eps * |W| * the Hessian's top eigenvalue (here ~4e-6), so a
    # tolerance of 1e-7 ends in a stall there and the weak L2 (1e-3) leaves the weights ~1e-3 apart at most
    with one_thread():  # the summation order of one thread, where Armijo alone stalled 1.3e-6 (relative) above
        near_cold = fit_logistic(X, y, 10, L2 / 10, tol=1e-7)
        near_warm = fit_logistic(X, y, 10, L2 / 10, init=cold.weights, tol=1e-7)
    assert near_cold.converged and near_warm.converged
    assert abs(near_warm.loss - near_cold.loss) <= 1e-6 * near_cold.loss
    assert max(_max_grad(X, y, near_warm.weights, L2 / 10), _max_grad(X, y, near_cold.weights, L2 / 10)) <= 2e-5
    assert (near_warm.weights.W - near_cold.weights.W).norm() <= 5e-3 * near_cold.weights.W.norm()
    assert torch.equal(near_warm.weights.logits(X).argmax(1), near_cold.weights.logits(X).argmax(1))


def test_works_under_no_grad_and_inference_mode(digits):
    Xtr, ytr, _, _ = digits
    X, y = _t(Xtr), _t(ytr, torch.long)
    ref = fit_logistic(X, y, 10, 0.1)
    with torch.no_grad():
        a = fit_logistic(X, y, 10, 0.1)
    with torch.inference_mode():
        b = fit_logistic(X, y, 10, 0.1)
    torch.testing.assert_close(a.weights.W, ref.weights.W)
    torch.testing.assert_close(b.weights.W, ref.weights.W)


def test_logits_chunked_and_clone():
    g = torch.Generator().manual_seed(0)
    w = LinearWeights(torch.randn(7, 4, generator=g), torch.randn(4, generator=g))
    X = torch.randn(1000, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(w.logits(X, chunk_rows=64), (X.float() @ w.W + w.b), rtol=1e-5, atol=1e-5)
    c = w.clone()
    c.W.add_(1.0)
    c.b.zero_()
    assert not torch.equal(c.W, w.W) and c.W.data_ptr() != w.W.data_ptr() and not torch.equal(c.b, w.b)


def test_path_picks_lowest_valid_error_and_returns_a_copy():
    Xtr, ytr = _noisy_wide(1, 300)
    Xv, yv = _noisy_wide(2, 500)
    c = 3
    path = list(DEFAULT_L2_PATH)
    res = fit_l2_path(Xtr, ytr, Xv, yv, c, l2_path=path, patience=None, screen_tol=None)  # every point to tol
    assert [p.l2 for p in res.path] == path
    # the selection rule applied to the reported points
    best_pt = min(res.path, key=lambda p: (p.valid_top1_error, p.valid_cross_entropy, -p.l2))
    assert res.best_l2 == best_pt.l2
    # every point computed independently (cold start) gives the same valid metrics
    # (at very weak L2 the near-separable fits are only loosely determined by a gradient tolerance, so
    # compare cross-entropies where the problem is well conditioned)
    indep = []
    for p in res.path:
        f = fit_logistic(Xtr, ytr, c, p.l2)
        lg = f.weights.logits(Xv)
        indep.append(topk_error(lg, yv))
        print(f"l2={p.l2:g}: path err {p.valid_top1_error:.3f} ce {p.valid_cross_entropy:.4f} it {p.iterations}; "
              f"independent err {indep[-1]:.3f} ce {cross_entropy(lg, yv):.4f} it {f.iterations}")
        if p.l2 >= 1e-2:
            assert abs(indep[-1] - p.valid_top1_error) <= 2.5 / len(yv)
            assert cross_entropy(lg, yv) == pytest.approx(p.valid_cross_entropy, rel=1e-3)
        else:
            assert abs(indep[-1] - p.valid_top1_error) <= 0.03
    assert abs(min(indep) - best_pt.valid_top1_error) <= 2.5 / len(yv)
    assert indep[[p.l2 for p in res.path].index(res.best_l2)] <= min(indep) + 2.5 / len(yv)
    # weak L2 overfits here, so the last point is not the best
    assert res.best_l2 != res.path[-1].l2
    assert res.path[-1].valid_top1_error >= best_pt.valid_top1_error + 5 / len(yv)

    # reproduce the warm-started chain by hand: best weights == the fit at best_l2, not the last one
    prev, at_best, last = None, None, None
    for l2 in path:
        prev = fit_logistic(Xtr, ytr, c, l2, init=prev).weights
        if l2 == res.best_l2:
            at_best = prev.clone()
        last = prev
    # equal to the solver's tolerance, not bit for bit: the summation order (thread count) moves the last digits of
    # a fit stopped at tol, and a weakly regularised point amplifies them (7e-5 in a weight on one thread)
    for got, want in ((res.best.weights.W, at_best.W), (res.best.weights.b, at_best.b)):
        assert (got - want).norm() <= 1e-3 * want.norm()
    assert (res.best.weights.W - last.W).norm() > 0.1 * last.W.norm()
    # and, the solution being unique, a cold fit at best_l2 agrees too
    fresh = fit_logistic(Xtr, ytr, c, res.best_l2)
    assert (fresh.weights.W - res.best.weights.W).norm() <= 1e-2 * fresh.weights.W.norm()

    # continuing the path from the best must not alter it
    snap = res.best.weights.clone()
    fit_logistic(Xtr, ytr, c, res.best_l2 / 100, init=res.best.weights)
    assert torch.equal(res.best.weights.W, snap.W) and torch.equal(res.best.weights.b, snap.b)


def test_path_early_stop_with_patience():
    Xtr, ytr = _noisy_wide(1, 300)
    Xv, yv = _noisy_wide(2, 500)
    full = fit_l2_path(Xtr, ytr, Xv, yv, 3, patience=None)
    short = fit_l2_path(Xtr, ytr, Xv, yv, 3, patience=2)
    ces = [p.valid_cross_entropy for p in full.path]
    # the first index at which CE has risen twice in a row
    stop = next(i for i in range(2, len(ces)) if ces[i] > ces[i - 1] > ces[i - 2])
    assert len(short.path) == stop + 1
    assert [p.l2 for p in short.path] == [p.l2 for p in full.path[: stop + 1]]
    # the order given does not matter: the path is always fitted strong to weak
    rev = fit_l2_path(Xtr, ytr, Xv, yv, 3, l2_path=DEFAULT_L2_PATH[::-1], patience=2)
    assert [p.l2 for p in rev.path] == [p.l2 for p in short.path]


def test_no_test_argument_and_no_global_rng():
    params = inspect.signature(fit_l2_path).parameters
    assert not any("test" in name.lower() for name in params)
    assert list(params)[:5] == ["X_train", "y_train", "X_valid", "y_valid", "num_classes"]
    Xtr, ytr = _noisy_wide(3, 100, d=50)
    Xv, yv = _noisy_wide(4, 100, d=50)
    state = torch.random.get_rng_state()
    a = fit_l2_path(Xtr, ytr, Xv, yv, 3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = fit_l2_path(Xtr, ytr, Xv, yv, 3)  # deterministic
    assert torch.equal(a.best.weights.W, b.best.weights.W)


def test_wide_layer_default_path():
    """N=2000, D=25000: every feature carries a weak copy of a 16-d latent that determines the label."""
    g = torch.Generator().manual_seed(0)
    n_tr, n_va, d, k, c, a = 2000, 1000, 25000, 16, 10, 0.1
    A = torch.randn(k, d, generator=g)
    V = torch.randn(k, c, generator=g)

    def make(n):
        z = torch.randn(n, k, generator=g)
        X = (z @ A).mul_(a)
        X.add_(torch.randn(n, d, generator=g)).div_((1 + a * a * k) ** 0.5)  # ~unit variance features
        y = (z @ V + 0.5 * torch.randn(n, c, generator=g)).argmax(1)
        return X, y

    Xtr, ytr = make(n_tr)
    Xv, yv = make(n_va)
    t0 = time.perf_counter()
    res = fit_l2_path(Xtr, ytr, Xv, yv, c)
    dt = time.perf_counter() - t0
    print(f"\nwide layer N={n_tr} D={d} C={c}: path fitted in {dt:.1f}s; "
          + ", ".join(f"l2={p.l2:g}: err {p.valid_top1_error:.3f} it {p.iterations}" for p in res.path))
    chance = chance_error(yv, c)
    best = min(res.path, key=lambda p: p.valid_top1_error)
    assert best.valid_top1_error < 0.4 * chance
    assert res.best_l2 == best.l2 and res.best.weights.W.shape == (d, c)
    assert all(p.converged for p in res.path)
    # wall time depends on the machine's load; the iteration count is the machine-independent check
    assert sum(p.iterations for p in res.path) < 600


def test_row_space_fit_equals_primal_fit_on_a_wide_layer(monkeypatch):
    """D > 2N is fitted on the N x N row space of X (eigendecomposition of its centred Gram matrix); the same probe."""
    from linprobe.fit import solvers

    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 1500, generator=g)
    y = (X[:, :10] + 0.5 * torch.randn(400, 10, generator=g)).argmax(1)
    assert solvers.row_space_worthwhile(300, 1500)
    wide = fit_l2_path(X[:300], y[:300], X[300:], y[300:], 10, tol=1e-7, screen_tol=None)
    monkeypatch.setattr(solvers, "row_space_worthwhile", lambda n, d: False)
    primal = fit_l2_path(X[:300], y[:300], X[300:], y[300:], 10, tol=1e-7, screen_tol=None)
    assert wide.best_l2 == primal.best_l2
    assert [p.valid_top1_error for p in wide.path] == pytest.approx([p.valid_top1_error for p in primal.path], abs=0.01)
    rel = (wide.best.weights.W - primal.best.weights.W).norm() / primal.best.weights.W.norm()
    assert rel < 1e-3
    torch.testing.assert_close(wide.best.weights.b, primal.best.weights.b, atol=1e-3, rtol=1e-3)


def _layers(seed: int, n: int, count: int, d: int = 40, c: int = 4):
    """``count`` related layers of one width: a shared latent seen through a different random map per layer."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=torch.Generator().manual_seed(7 + seed))
    y = (z[:, :c] + 0.7 * torch.randn(n, c, generator=torch.Generator().manual_seed(11 + seed))).argmax(1)
    maps = [torch.randn(8, d, generator=torch.Generator().manual_seed(100 + i)) * (1 + i) for i in range(count)]
    return [z @ m + 0.3 * torch.randn(n, d, generator=g) for m in maps], y


def test_batched_fits_equal_one_at_a_time():
    """Layers fitted together (stacked, batched products) choose the same L2 and reach the same probes as alone."""
    from linprobe.fit.solvers import FitSettings, fit_paths

    train, ytr = _layers(0, 600, 5)
    valid, yv = _layers(1, 300, 5)
    settings = FitSettings(tol=1e-6)
    together = fit_paths(torch.stack(train), ytr, valid, yv, 4, settings)
    for x, v, joint in zip(train, valid, together):
        alone = fit_paths([x], ytr, [v], yv, 4, settings)[0]
        assert joint.best_l2 == alone.best_l2
        assert [p.l2 for p in joint.path] == [p.l2 for p in alone.path]
        assert joint.best.converged and alone.best.converged
        rel = (joint.best.weights.W - alone.best.weights.W).norm() / alone.best.weights.W.norm()
        assert rel < 1e-3
    mixed = fit_paths([train[0], torch.randn(600, 7)], ytr, [valid[0], torch.randn(300, 7)], yv, 4, settings)
    assert mixed[0].best_l2 == together[0].best_l2 and mixed[1].best.weights.W.shape == (7, 4)  # widths grouped


def test_uncentred_badly_scaled_features_match_sklearn():
    """Raw features (means far from 0, scales 0.1..10): the solver's centred, preconditioned coordinates change
    nothing in the objective. scikit-learn's lbfgs does not converge on such features in 15,000 evaluations, but the
    optimal W does not depend on the features' means (the bias absorbs them): scikit-learn on the centred features,
    run to 1e-10, is the reference for W and the objective."""
    from sklearn.linear_model import LogisticRegression

    (x,), y = _layers(2, 800, 1)
    scales = torch.logspace(-1, 1, x.shape[1])
    centred = (x - x.mean(0)) * scales
    raw = centred + 5 * scales
    l2 = 1e-3
    sk = LogisticRegression(C=sklearn_C(l2, len(y)), solver="lbfgs", max_iter=20000, tol=1e-10)
    sk.fit(centred.double().numpy(), y.numpy())
    res = fit_logistic(raw, y, 4, l2, tol=1e-7, max_iter=2000)
    assert res.converged
    W_sk = sk.coef_.T
    assert np.linalg.norm(res.weights.W.double().numpy() - W_sk) <= 1e-2 * np.linalg.norm(W_sk)
    p = sk.predict_proba(centred.double().numpy())[np.arange(len(y)), y.numpy()]
    sk_objective = float(np.mean(-np.log(p)) + 0.5 * l2 * np.sum(W_sk ** 2))
    assert res.loss == pytest.approx(sk_objective, rel=1e-5, abs=1e-7)
    assert np.mean(res.weights.logits(raw).argmax(1).numpy() == sk.predict(centred.double().numpy())) >= 0.995


def test_pathological_layers_converge():
    """Collapsed features (every row the same up to float noise), a constant layer and pure noise: every fit
    converges (no max_iter) with finite weights, and the probes sit at chance."""
    from linprobe.fit.solvers import FitSettings, fit_paths

    g = torch.Generator().manual_seed(5)
    n, d = 500, 32
    y = torch.arange(n) % 4
    yv = torch.arange(200) % 4
    collapsed = torch.ones(n, d) * 3.0 + 1e-6 * torch.randn(n, d, generator=g)
    constant = torch.full((n, d), -2.0)
    noise = torch.randn(n, d, generator=g)
    valid = [torch.ones(200, d) * 3.0, torch.full((200, d), -2.0), torch.randn(200, d, generator=g)]
    found = fit_paths(torch.stack([collapsed, constant, noise]), y, valid, yv, 4, FitSettings(max_iter=200))
    for res in found:
        assert res.best.converged and all(p.converged for p in res.path)
        assert torch.isfinite(res.best.weights.W).all() and torch.isfinite(res.best.weights.b).all()
        assert max(p.iterations for p in res.path) < 200
        assert min(p.valid_top1_error for p in res.path) >= 0.6


def test_line_search_stops_at_float32_resolution(monkeypatch):
    """Asked for a tolerance float32 cannot reach (1e-9 on a near-chance noise layer), the fit stops where the loss no
    longer resolves a step, converged, and spends few evaluations per iteration there: no long runs of backtracks
    that each halve a step whose gain is below the loss's rounding (they cost one Python round each)."""
    from linprobe.fit import solvers

    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(2000, 64, generator=g), torch.randint(0, 10, (2000,), generator=g)
    evaluations = []
    original = solvers.minimize

    def counting(objective, *args, **kwargs):
        def counted(index, theta):
            evaluations.append(len(index))
            return objective(index, theta)
        return original(counted, *args, **kwargs)

    monkeypatch.setattr(solvers, "minimize", counting)
    res = fit_logistic(X, y, 10, 1e-5, tol=1e-9, max_iter=2000)
    assert res.converged and res.iterations < 2000
    assert len(evaluations) <= 1.5 * res.iterations + 10


def test_batched_lbfgs_solves_quadratics_exactly():
    """Independent strongly convex quadratics of very different conditioning, solved in one batch: each reaches
    its own minimiser; one given a zero iteration budget stops where it started, unconverged."""
    from linprobe.fit.lbfgs import minimize

    g = torch.Generator().manual_seed(0)
    A = torch.stack([torch.diag(torch.logspace(0, k, 6)) for k in (0, 2, 4)])
    Q = torch.linalg.qr(torch.randn(3, 6, 6, generator=g)).Q
    H = Q @ A @ Q.transpose(1, 2)
    b = torch.randn(3, 6, generator=g)

    def objective(index, theta):
        Hi, bi = H[index], b[index]
        grad = torch.bmm(Hi, theta[:, :, None]).squeeze(2) - bi
        loss = (0.5 * (theta * (grad - bi)).sum(1)).double()
        return loss, grad, grad.abs().amax(1).double()

    out = minimize(objective, torch.zeros(3, 6), lambda index, v: v.clone(), torch.full((3,), 1e-5),
                   max_iter=torch.tensor([200, 200, 0]))
    want = torch.linalg.solve(H, b)
    torch.testing.assert_close(out.theta[:2], want[:2], rtol=1e-3, atol=1e-4)
    assert out.converged[:2].all() and not out.converged[2] and out.iterations[2] == 0
    assert torch.equal(out.theta[2], torch.zeros(6))
