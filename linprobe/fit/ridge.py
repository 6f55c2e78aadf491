"""Regression probes: ridge regression on every layer, each layer's whole L2 path solved exactly.

A regression probe is ``h @ W + b`` on the features ``h`` of one layer, for targets ``y`` (N, K) with K >= 1
outputs. For an L2 strength the objective is

    f(W, b) = (1 / (2N)) * sum_i ||x_i @ W + b - y_i||^2 + (l2 / 2) * ||W||_F^2      (bias not penalised)

the same conventions as the classification probes of :mod:`linprobe.fit.solvers`: a mean data term plus ``l2 / 2``
times the squared weights, the bias free, ``W`` (D, K) and ``b`` (K,) in a :class:`~linprobe.fit.solvers.LinearWeights`
(``predictions = X @ W + b``), the L2 path of :class:`~linprobe.fit.solvers.FitSettings` walked from strong to weak and
the L2 chosen on the validation split: the lowest valid mean squared error, ties to the larger L2. With
``patience=k`` a layer's path stops once its valid MSE has risen at ``k`` consecutive points (as in
:func:`~linprobe.fit.solvers.fit_paths`); ``patience=None`` chooses over the whole path.

Relation to scikit-learn: ``Ridge(alpha)`` minimises ``||y - X w - b||^2 + alpha * ||w||^2``; dividing by ``2N``
gives ``f`` with ``l2 = alpha / N``, i.e. ``Ridge(alpha=N * l2)`` has the same minimiser (:func:`sklearn_alpha`).
Metrics are scikit-learn's: ``mse`` is ``mean_squared_error`` and ``r2`` is ``r2_score`` (uniform average over
outputs; an output with constant targets scores 1 if predicted exactly, else 0; fewer than two rows give NaN).

How it is exact and fast (all statistics in float64; features may be any float dtype, read in row blocks):

* **Centring.** X and y are centred with their training means; the free bias absorbs them
  (``b = mean(y) - mean(x) @ W``), so only the centred problem is solved.
* **Covariance path** (``D <= N``): the (D, D) covariance ``C = Xc^T Xc / N`` is eigendecomposed once,
  ``C = V diag(lam) V^T``; every L2's solution is then ``W = V diag(1 / (lam + l2)) V^T Xc^T yc / N``.
* **Gram path** (``D > N``): the dual form. The (N, N) centred Gram matrix ``Xc Xc^T = U diag(s) U^T`` is
  eigendecomposed once and ``W = Xc^T U diag(1 / (s + N * l2)) U^T yc`` for every L2 (the same minimiser).
* **Conjugate gradient** (both D and N above ``_EXACT_MAX`` = 8192, where an eigendecomposition costs minutes and
  its matrix gigabytes): for each L2, conjugate gradient on the normal equations ``(C + l2 I) W = Xc^T yc / N``
  (two passes over the rows per iteration, all outputs at once), warm-started from the previous (stronger) L2's
  solution and preconditioned by a rank-256 randomized Nystrom approximation of ``C`` built once per layer. It stops
  when every output's gradient norm is at most ``settings.tol * l2 * ||W||``, which guarantees a relative error of
  at most ``settings.tol`` in ``W`` (for ``l2 = 0``: ``settings.tol`` times the norm of ``Xc^T yc / N``), or after
  ``settings.max_iter`` iterations. This one is exact only to that tolerance; the path points record the
  iterations and whether it was reached (badly conditioned features at weak L2 can need many).

With ``l2 = 0`` the closed forms give the minimum-norm least-squares solution (eigenvalues below
the matrix size times eps times the largest count as zero).

``sharded=True`` (torch.distributed, each process holds a share of the rows of the training and validation
splits): the row counts, sums and centred moments (``Xc^T Xc``, ``Xc^T yc``) are summed over processes with
:func:`linprobe.distributed.all_reduce_sum`, as are the validation errors, so every process gets the same probes
and metrics. The Gram path needs every row at once, so under sharding a layer takes the covariance path
(``D <= 8192``) or CG.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from linprobe import distributed
from linprobe.fit.solvers import FitResult, FitSettings, LinearWeights

__all__ = ["RidgePath", "RidgePoint", "fit_ridge_paths", "regression_metrics", "ridge_objective", "sklearn_alpha"]

_EXACT_MAX = 8192  # above this in both D and N: CG instead of an eigendecomposition
_BLOCK_ELEMENTS = 1 << 22  # float64 elements per block of centred features (32 MiB)
_NYSTROM_RANK = 256  # the CG preconditioner's rank
_DEFAULT_SETTINGS = FitSettings()


def sklearn_alpha(l2: float, n: int) -> float:
    """scikit-learn's ``Ridge(alpha)`` with the same minimiser as our ``l2`` on ``n`` training samples: ``n * l2``."""
    return l2 * n


@dataclass
class RidgePoint:
    """One L2 on the path: ``train_loss`` is the objective ``f`` at the solution, ``valid_mse`` and ``valid_r2``
    scikit-learn's ``mean_squared_error`` and ``r2_score`` on the validation split; ``iterations`` and
    ``converged`` are CG's (0 and True for the closed forms)."""

    l2: float
    train_loss: float
    valid_mse: float
    valid_r2: float
    iterations: int = 0
    converged: bool = True


@dataclass
class RidgePath:
    """One layer's ridge probe: the chosen ``l2``, its ``weights`` (``X @ W + b``; W (D, K), b (K,), float32 on the
    features' device), every point of the path fitted (strong to weak) and the ``method`` used: ``"covariance"``,
    ``"gram"`` or ``"cg"``. ``best`` and ``best_l2`` give the :class:`~linprobe.fit.solvers.PathResult` view."""

    l2: float
    weights: LinearWeights
    path: list[RidgePoint]
    method: str

    @property
    def point(self) -> RidgePoint:
        """The chosen point of the path."""
        return next(p for p in self.path if p.l2 == self.l2)

    @property
    def valid_mse(self) -> float:
        return self.point.valid_mse

    @property
    def valid_r2(self) -> float:
        return self.point.valid_r2

    @property
    def best_l2(self) -> float:
        return self.l2

    @property
    def best(self) -> FitResult:
        """The chosen probe as a :class:`~linprobe.fit.solvers.FitResult` (``loss``: its ``f``)."""
        p = self.point
        return FitResult(self.weights, self.l2, p.iterations, p.converged, p.train_loss)


def _r2(sse: Tensor, sst: Tensor, rows: int) -> float:
    """scikit-learn's ``r2_score`` (uniform average, force_finite) from per-output sums of squares."""
    if rows < 2:
        return math.nan
    scores = torch.where(sst != 0, 1 - sse / torch.where(sst != 0, sst, torch.ones_like(sst)),
                         torch.where(sse == 0, torch.ones_like(sse), torch.zeros_like(sse)))
    return float(scores.mean())


@torch.no_grad()
def regression_metrics(pred: Tensor, y: Tensor) -> dict[str, float]:
    """``mse`` (mean over rows and outputs) and ``r2`` (mean over outputs of each output's R^2): exactly
    scikit-learn's ``mean_squared_error`` and ``r2_score`` with their default uniform average, in float64.
    ``pred`` and ``y``: (N,) or (N, K)."""
    if pred.shape != y.shape or pred.dim() not in (1, 2):
        raise ValueError(f"pred and y must both be (N,) or (N, K) of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(y.shape)}")
    p = pred.detach().double().reshape(len(pred), -1)
    t = y.detach().to(device=p.device, dtype=torch.float64).reshape(len(y), -1)
    sse = (p - t).square().sum(0)
    sst = (t - t.mean(0)).square().sum(0)
    return {"mse": float(sse.sum() / max(sse.numel() * len(t), 1)) if len(t) else math.nan,
            "r2": _r2(sse, sst, len(t))}


def ridge_objective(X: Tensor, y: Tensor, weights: LinearWeights, l2: float) -> tuple[float, float]:
    """The objective ``f`` and the max-abs of its gradient (over W and b) at ``weights``, in float64."""
    X = X.detach().double()
    W, b = weights.W.detach().to(X.device).double(), weights.b.detach().to(X.device).double()
    res = X @ W + b - _targets(y, "y").to(X.device)
    n = max(len(X), 1)
    loss = 0.5 * res.square().sum() / n + 0.5 * l2 * W.square().sum()
    gW, gb = X.t() @ res / n + l2 * W, res.sum(0) / n
    return float(loss), max(float(gW.abs().max()) if gW.numel() else 0.0, float(gb.abs().max()))


def _targets(y: Tensor, name: str) -> Tensor:
    """``y`` as float64 (N, K), or a one-line error naming the fix."""
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
    if y.dim() > 2:
        raise ValueError(f"{name} must be (N,) or (N, K) targets, got shape {tuple(y.shape)}; "
                         f"flatten the outputs with {name}.reshape(len({name}), -1)")
    if y.dim() == 0:
        raise ValueError(f"{name} must be (N,) or (N, K) targets, got a scalar; pass one target row per sample")
    y = y.detach().to(torch.float64)
    y = y.reshape(len(y), -1)
    bad = int((~torch.isfinite(y)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite values (NaN or inf); drop or impute those rows before fitting")
    return y


def _rows_per_block(d: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(d, 1))


def _blocks(x: Tensor, mu: Tensor) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, centred float64 block)`` over the rows of ``x``."""
    step = _rows_per_block(x.shape[1])
    for s in range(0, x.shape[0], step):
        yield s, min(s + step, x.shape[0]), x[s:s + step].to(torch.float64) - mu


class _Targets:
    """The training targets' global row count, means and centred second moment."""

    def __init__(self, y: Tensor, sharded: bool) -> None:
        head = torch.cat([torch.tensor([float(len(y))], dtype=torch.float64, device=y.device), y.sum(0)])
        if sharded:
            distributed.all_reduce_sum(head)
        self.n = int(head[0])
        self.mean = head[1:] / max(self.n, 1)
        self.centred = y - self.mean
        q = self.centred.square().sum(0)
        self.q = (distributed.all_reduce_sum(q) if sharded else q) / max(self.n, 1)  # per output, /N


class _Valid:
    """The validation targets' global row count and per-output total sum of squares, for R^2."""

    def __init__(self, y: Tensor, sharded: bool) -> None:
        self.y, self.sharded = y, sharded
        head = torch.cat([torch.tensor([float(len(y))], dtype=torch.float64, device=y.device), y.sum(0)])
        if sharded:
            distributed.all_reduce_sum(head)
        self.n = int(head[0])
        mean = head[1:] / max(self.n, 1)
        sst = (y - mean).square().sum(0)
        self.sst = distributed.all_reduce_sum(sst) if sharded else sst

    def scores(self, x: Tensor, mu: Tensor, Ws: Tensor, ybar: Tensor) -> list[tuple[float, float]]:
        """(mse, r2) of the probes ``(x - mu) @ Ws[l] + ybar`` (Ws: (L, D, K)), in one pass over ``x``."""
        L, D, K = Ws.shape
        flat = Ws.permute(1, 0, 2).reshape(D, L * K)
        sse = torch.zeros(L * K, dtype=torch.float64, device=Ws.device)
        for s, e, xc in _blocks(x, mu):
            res = xc @ flat + ybar.repeat(L) - self.y[s:e].repeat(1, L)
            sse += res.square().sum(0)
        if self.sharded:
            distributed.all_reduce_sum(sse)
        sse = sse.view(L, K)
        return [(float(sse[i].sum()) / (self.n * K), _r2(sse[i], self.sst, self.n)) for i in range(L)]


def _moments(x: Tensor, y: _Targets, sharded: bool, dense: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The features' global means, ``Xc^T Xc / N`` (its diagonal unless ``dense``) and ``Xc^T yc / N``, float64."""
    d = x.shape[1]
    total = torch.zeros(d, dtype=torch.float64, device=x.device)
    step = _rows_per_block(d)
    for s in range(0, x.shape[0], step):
        total += x[s:s + step].sum(0, dtype=torch.float64)
    if sharded:
        distributed.all_reduce_sum(total)
    mu = total / y.n
    if not bool(torch.isfinite(mu).all()):
        raise ValueError("features have non-finite values (NaN or inf); clean the layer's activations before fitting")
    cov = torch.zeros((d, d) if dense else (d,), dtype=torch.float64, device=x.device)
    xy = torch.zeros(d, y.centred.shape[1], dtype=torch.float64, device=x.device)
    for s, e, xc in _blocks(x, mu):
        cov += xc.t() @ xc if dense else xc.square().sum(0)
        xy += xc.t() @ y.centred[s:e]
    if sharded:
        flat = distributed.all_reduce_sum(torch.cat([cov.reshape(-1), xy.reshape(-1)]))
        cov, xy = flat[:cov.numel()].view_as(cov), flat[cov.numel():].view_as(xy)
    return mu, cov / y.n, xy / y.n


def _pinv_denominators(lam: Tensor, l2s: Sequence[float], scale: float) -> Tensor:
    """``1 / (lam + scale * l2)`` for every l2 (L, R); eigenvalues below ``R * eps * max`` count as 0, and a zero
    denominator (l2 = 0 there) gives 0: the minimum-norm solution."""
    lam = lam.clamp_min(0)
    tiny = len(lam) * torch.finfo(torch.float64).eps * float(lam.max()) if lam.numel() else 0.0
    lam = torch.where(lam > tiny, lam, torch.zeros_like(lam))
    d = lam[None, :] + scale * torch.tensor(list(l2s), dtype=torch.float64, device=lam.device)[:, None]
    return torch.where(d > 0, 1 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _covariance(x: Tensor, y: _Targets, l2s: Sequence[float], sharded: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Means, solutions (L, D, K) and train losses (L,) of every l2, from the covariance's eigendecomposition."""
    mu, cov, xy = _moments(x, y, sharded, dense=True)
    lam, V = torch.linalg.eigh(cov)
    a = V.t() @ xy  # (D, K)
    inv = _pinv_denominators(lam, l2s, 1.0)  # (L, D)
    w = a[None] * inv[:, :, None]  # (L, D, K) in the eigenbasis
    lam = lam.clamp_min(0)
    l2 = torch.tensor(list(l2s), dtype=torch.float64, device=x.device)
    data = 0.5 * (y.q.sum() - 2 * (w * a).sum((1, 2)) + (lam[None, :, None] * w.square()).sum((1, 2)))
    loss = data.clamp_min(0) + 0.5 * l2 * w.square().sum((1, 2))
    return mu, V @ w, loss


def _gram(x: Tensor, y: _Targets, l2s: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Means, solutions (L, D, K) and train losses (L,) of every l2 in the dual form, from the eigendecomposition of
    the centred Gram matrix ``Xc Xc^T`` (N, N)."""
    n, d = x.shape
    mu = x.sum(0, dtype=torch.float64) / n
    if not bool(torch.isfinite(mu).all()):
        raise ValueError("features have non-finite values (NaN or inf); clean the layer's activations before fitting")
    step = _rows_per_block(n)  # columns per block of the centred features
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for j in range(0, d, step):
        xc = x[:, j:j + step].to(torch.float64) - mu[j:j + step]
        gram += xc @ xc.t()
    s, U = torch.linalg.eigh(gram)
    a = U.t() @ y.centred  # (N, K)
    inv = _pinv_denominators(s, l2s, float(n))  # (L, N)
    c = a[None] * inv[:, :, None]  # (L, N, K): W = Xc^T U c
    s = s.clamp_min(0)
    coef = (U @ c.permute(1, 0, 2).reshape(n, -1))  # (N, L*K)
    Ws = torch.empty(d, coef.shape[1], dtype=torch.float64, device=x.device)
    for j in range(0, d, step):
        Ws[j:j + step] = (x[:, j:j + step].to(torch.float64) - mu[j:j + step]).t() @ coef
    L, K = len(l2s), a.shape[1]
    l2 = torch.tensor(list(l2s), dtype=torch.float64, device=x.device)
    data = 0.5 * (a[None] - s[None, :, None] * c).square().sum((1, 2)) / n
    loss = data + 0.5 * l2 * (s[None, :, None] * c.square()).sum((1, 2))
    return mu, Ws.view(d, L, K).permute(1, 0, 2), loss


class _CG:
    """Conjugate gradient on ``(C + l2 I) W = Xc^T yc / N`` for one layer, all outputs at once (each output its own
    step sizes), warm-started from the last solution, preconditioned with a randomized Nystrom approximation of
    ``C`` of rank ``_NYSTROM_RANK`` (Frangella, Tropp & Udell 2023), one per layer for every l2."""

    def __init__(self, x: Tensor, y: _Targets, sharded: bool) -> None:
        self.x, self.y, self.sharded = x, y, sharded
        self.mu, _, self.rhs = _moments(x, y, sharded, dense=False)
        self.W = torch.zeros_like(self.rhs)
        self.U, self.lam = self._nystrom(min(_NYSTROM_RANK, x.shape[1]))

    def _nystrom(self, rank: int) -> tuple[Tensor, Tensor]:
        """``C ~ U diag(lam) U^T`` (U: (D, rank), orthonormal; lam descending) from ``C @ Omega``, a seeded Gaussian
        test matrix (the same on every process; the global RNG is not used), with a tiny shift for stability."""
        d = self.x.shape[1]
        omega = torch.randn(d, rank, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        omega = torch.linalg.qr(omega.to(self.rhs.device)).Q
        Y = self.product(omega)
        nu = torch.finfo(torch.float64).eps * float(Y.norm())
        none = self.rhs.new_zeros(d, 0), self.rhs.new_zeros(0)
        if nu == 0:
            return none
        Y += nu * omega
        B = omega.t() @ Y
        L, info = torch.linalg.cholesky_ex(0.5 * (B + B.t()))
        if int(info):
            return none
        U, S, _ = torch.linalg.svd(torch.linalg.solve_triangular(L, Y.t(), upper=False).t(), full_matrices=False)
        return U, (S.square() - nu).clamp_min(0)

    def precondition(self, R: Tensor, l2: float) -> Tensor:
        """``P^-1 R`` with ``P = U diag(lam + l2) U^T / (lam_min + l2) + (I - U U^T)``."""
        if not len(self.lam) or float(self.lam[-1]) + l2 <= 0:
            return R
        UtR = self.U.t() @ R
        return R + self.U @ (UtR * ((float(self.lam[-1]) + l2) / (self.lam + l2) - 1)[:, None])

    def product(self, P: Tensor) -> Tensor:
        """``C @ P``, summed over processes."""
        out = torch.zeros_like(P)
        for _, _, xc in _blocks(self.x, self.mu):
            out += xc.t() @ (xc @ P)
        if self.sharded:
            distributed.all_reduce_sum(out)
        return out / self.y.n

    def _target(self, W: Tensor, l2: float, tol: float) -> Tensor:
        """The gradient norm each output stops at: ``tol * l2 * ||W||``, which bounds the error of ``W`` by
        ``tol * ||W||`` (``C + l2 I >= l2 I``); with ``l2 = 0``, ``tol * ||Xc^T yc / N||``."""
        target: Tensor = tol * (l2 * W.norm(dim=0) if l2 > 0 else self.rhs.norm(dim=0))
        return target

    def solve(self, l2: float, tol: float, max_iter: int) -> tuple[float, int, bool]:
        """Fit at ``l2`` from the current ``W``; returns the train loss, the products used and convergence."""
        rhs, W = self.rhs, self.W
        R = rhs - self.product(W) - l2 * W
        target = self._target(W, l2, tol)
        Z = self.precondition(R, l2)
        P, rz = Z.clone(), (R * Z).sum(0)
        it = 0
        active = R.norm(dim=0) > target
        while bool(active.any()) and it < max_iter:
            AP = self.product(P) + l2 * P
            pap = (P * AP).sum(0)
            ok = active & (pap > 0)
            alpha = torch.where(ok, rz / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
            W += alpha * P
            R -= alpha * AP
            Z = self.precondition(R, l2)
            rz_new = (R * Z).sum(0)
            beta = torch.where(ok & (rz != 0), rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)),
                               torch.zeros_like(rz))
            P = Z + beta * P
            rz = rz_new
            it += 1
            target = self._target(W, l2, tol)
            active = ok & (R.norm(dim=0) > target)
        converged = bool((R.norm(dim=0) <= target).all())
        cw = rhs - R - l2 * W  # C @ W, from the recurrence
        data = 0.5 * (self.y.q.sum() - 2 * (W * rhs).sum() + (W * cw).sum())
        return float(data.clamp_min(0) + 0.5 * l2 * W.square().sum()), it, converged


def _method(n: int, d: int, sharded: bool) -> str:
    if sharded:
        return "covariance" if d <= _EXACT_MAX else "cg"
    if d <= n:
        return "covariance" if d <= _EXACT_MAX else "cg"
    return "gram" if n <= _EXACT_MAX else "cg"


def _choose(points: list[RidgePoint], patience: int | None) -> tuple[list[RidgePoint], int]:
    """The points up to the early stop and the index of the chosen one (lowest valid MSE, ties: larger l2)."""
    rises = 0
    kept: list[RidgePoint] = []
    for point in points:
        rises = rises + 1 if kept and point.valid_mse > kept[-1].valid_mse else 0
        kept.append(point)
        if patience is not None and rises >= patience:
            break
    best = min(range(len(kept)), key=lambda i: (_nan_last(kept[i].valid_mse), -kept[i].l2))
    return kept, best


def _nan_last(v: float) -> float:
    return math.inf if math.isnan(v) else v


def _stop(points: list[RidgePoint], patience: int | None) -> bool:
    if patience is None or len(points) <= patience:
        return False
    return all(points[-i].valid_mse > points[-i - 1].valid_mse for i in range(1, patience + 1))


@torch.no_grad()
def _fit_layer(x: Tensor, v: Tensor, y: _Targets, valid: _Valid, settings: FitSettings, sharded: bool) -> RidgePath:
    l2s = settings.path
    method = _method(y.n, x.shape[1], sharded)
    ybar = y.mean
    if method == "cg":
        cg = _CG(x, y, sharded)
        points: list[RidgePoint] = []
        solutions = []
        for l2 in l2s:
            loss, it, conv = cg.solve(l2, settings.tol, settings.max_iter)
            mse, r2 = valid.scores(v, cg.mu, cg.W[None], ybar)[0]
            points.append(RidgePoint(l2, loss, mse, r2, it, conv))
            solutions.append(cg.W.clone())
            if _stop(points, settings.patience):
                break
        mu, Ws = cg.mu, torch.stack(solutions)
    else:
        mu, Ws, losses = _covariance(x, y, l2s, sharded) if method == "covariance" else _gram(x, y, l2s)
        points = [RidgePoint(l2, float(loss), mse, r2)
                  for l2, loss, (mse, r2) in zip(l2s, losses.tolist(), valid.scores(v, mu, Ws, ybar))]
    points, best = _choose(points, settings.patience)
    W = Ws[best]
    weights = LinearWeights(W.float().contiguous(), (ybar - mu @ W).float())
    return RidgePath(points[best].l2, weights, points, method)


def fit_ridge_paths(train: Sequence[Tensor] | Tensor, y: Tensor, valid: Sequence[Tensor], y_valid: Tensor,
                    settings: FitSettings = _DEFAULT_SETTINGS, *, sharded: bool = False) -> list[RidgePath]:
    """Fit the ridge probes of several layers (``train``: a list of (N, D_p) or a stacked (P, N, D) tensor, the
    same targets ``y`` (N,) or (N, K)) along the L2 path, exactly, and choose each one's L2 on its validation
    features ``valid[p]`` (M, D_p) and targets ``y_valid``: the lowest valid MSE, ties to the larger L2.

    Uses ``settings.path`` and ``settings.patience`` (and, for layers solved by CG, ``settings.tol`` and
    ``settings.max_iter``); see the module for the methods. ``sharded``: every split holds this process's rows of a
    torch.distributed job's data. Returns one :class:`RidgePath` per layer, in order.
    """
    if isinstance(train, Tensor) and train.dim() != 3:
        raise ValueError(f"train must be a list of (N, D) layers or a stacked (P, N, D) tensor, got shape "
                         f"{tuple(train.shape)}; wrap a single layer as [X]")
    xs = list(train)
    vs = list(valid)
    if len(vs) != len(xs):
        raise ValueError(f"{len(xs)} training and {len(vs)} validation feature matrices; pass one validation matrix "
                         f"per layer")
    yt, yv = _targets(y, "y"), _targets(y_valid, "y_valid")
    if yv.shape[1] != yt.shape[1]:
        raise ValueError(f"y has {yt.shape[1]} outputs but y_valid has {yv.shape[1]}; pass the same targets for both "
                         f"splits")
    for p, (x, v) in enumerate(zip(xs, vs)):
        if x.dim() != 2 or v.dim() != 2 or v.shape[1] != x.shape[1]:
            raise ValueError(f"layer {p}: expected train (N, D) and valid (M, D) features, got {tuple(x.shape)} and "
                             f"{tuple(v.shape)}")
        if x.shape[0] != len(yt):
            raise ValueError(f"layer {p} has {x.shape[0]} training rows but y has {len(yt)}; pass one target row per "
                             f"training sample")
        if v.shape[0] != len(yv):
            raise ValueError(f"layer {p} has {v.shape[0]} validation rows but y_valid has {len(yv)}; pass one target "
                             f"row per validation sample")
    if not xs:
        return []
    device = xs[0].device
    targets, checks = _Targets(yt.to(device), sharded), _Valid(yv.to(device), sharded)
    if targets.n == 0 or checks.n == 0:
        raise ValueError(f"{targets.n} training and {checks.n} validation rows; both splits need rows to fit and "
                         f"choose the L2")
    fits = []
    for p, (x, v) in enumerate(zip(xs, vs)):
        try:
            fits.append(_fit_layer(x.detach(), v.detach().to(device), targets, checks, settings, sharded))
        except ValueError as error:
            raise ValueError(f"layer {p}: {error}") from None
    return fits
