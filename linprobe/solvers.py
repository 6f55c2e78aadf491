"""Convex solver for linear probes: multinomial logistic regression fitted to convergence.

A probe is ``softmax(h @ W + b)`` on cached, standardised float32 features ``h`` of one layer.
For a given L2 strength the objective is

    f(W, b) = mean_i CE(softmax(x_i @ W + b), y_i) + (l2 / 2) * ||W||_F^2      (bias not penalised)

which is strictly convex in ``W``, so "fitting the probe" has one answer that does not depend on
learning rates, epochs or seeds.  It is minimised by full-batch L-BFGS with a strong-Wolfe line search
(``torch.optim.LBFGS``) on whatever device ``X`` lives on.  The L2 strength is chosen along a path
(strong to weak, warm-started) on the validation split only.

Relation to scikit-learn: ``LogisticRegression(C=c)`` minimises ``C * sum_i CE_i + ||W||^2 / 2``.
Dividing by ``C * N`` gives ``f`` above with ``l2 = 1 / (C * N)``; see :func:`sklearn_C`.

Implementation notes
--------------------
* The gradient is written out by hand in :func:`_loss_and_grad` (softmax minus one-hot, then
  ``G.T @ X``) rather than taken by autograd: on CPU, autograd's backward computes ``X.T @ G``, which
  on a row-major ``N x D`` matrix was ~7-10x slower than ``G.T @ X`` here (torch 2.13, 2 cores), and a
  whole fit ran several times faster this way.  Internally the weights are kept as a contiguous
  ``(C, D)`` matrix ``Wt`` (``X @ Wt.T`` was also ~1.5-3x faster than ``X @ W`` with row-major W).
* Nothing bigger than ``N x C`` is materialised besides ``X`` itself (a non-float32 ``X`` is copied to
  float32 once).  The loss is summed in float64, but float32 logits still leave it noisy at ~1e-8, so
  besides the gradient test a fit also stops when the loss has stopped improving at that resolution.
* Convergence semantics match scikit-learn's lbfgs (max-abs gradient of the same mean-loss objective),
  so at very weak L2 on (nearly) separable data, where the objective is flat, the solution is only
  loosely determined - the validation split then steers the path away from those points anyway.
* The global RNG is never used (zeros or ``init`` as the starting point), so fits are deterministic.
* ``sharded=True`` (torch.distributed, one share of the rows per process): the data terms of every
  evaluation are summed over processes in one float64 all-reduce, so every process sees the same loss and
  gradient and L-BFGS takes the same steps everywhere; only the summation order differs from one process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import distributed
from .metrics import cross_entropy, topk_error

__all__ = [
    "DEFAULT_L2_PATH", "LinearWeights", "FitResult", "PathPoint", "PathResult", "RowSpace",
    "fit_logistic", "fit_l2_path", "sklearn_C",
]

#: Decades from strong to weak.  Standardised features make the data term's gradient O(1) per
#: weight, so l2 ~ 10 already shrinks a 25,000-wide layer fitted on a few thousand samples hard, while
#: l2 ~ 1e-5 is essentially unregularised for a 10-wide layer on 60,000 samples.  Strong-to-weak order
#: lets each fit warm-start from the previous (more regularised, easier) solution.
DEFAULT_L2_PATH: tuple[float, ...] = (1e1, 1e0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)

_LOGITS_CHUNK_ROWS = 16384
# L-BFGS memory: 2 * history * D * C floats. 20 saved few evaluations over 10 but doubled the per-iteration
# overhead of the two-loop recursion (which is significant on a busy CPU), so 10.
_HISTORY_SIZE = 10
_WINDOW = 10  # iterations between checks of the loss-stall criterion
_FTOL = 1e-7  # stalled: relative loss decrease over a window below ~float32 resolution


def sklearn_C(l2: float, n: int) -> float:
    """scikit-learn's ``C`` giving the same minimiser as our ``l2`` on ``n`` training samples.

    ``LogisticRegression(C)`` minimises ``C * sum_i CE_i + ||W||^2 / 2``; dividing by ``C * n`` gives
    ``mean_i CE_i + ||W||^2 / (2 * C * n)``, i.e. our objective with ``l2 = 1 / (C * n)``.
    """
    return 1.0 / (l2 * n)


@dataclass
class LinearWeights:
    """A linear probe ``logits = X @ W + b``; ``W``: (D, C) float32, ``b``: (C,) float32, detached."""

    W: Tensor
    b: Tensor

    @torch.no_grad()
    def logits(self, X: Tensor, chunk_rows: int = _LOGITS_CHUNK_ROWS) -> Tensor:
        """``X @ W + b`` in row chunks (each chunk moved to W's device/float32 on its own), on W's device."""
        Wt = self.W.detach().t().contiguous()  # (C, D): X @ Wt.T is the faster CPU layout
        b = self.b.detach()
        out = torch.empty(X.shape[0], Wt.shape[0], dtype=Wt.dtype, device=Wt.device)
        for s in range(0, X.shape[0], chunk_rows):
            xc = X[s:s + chunk_rows].to(device=Wt.device, dtype=Wt.dtype)
            torch.mm(xc, Wt.t(), out=out[s:s + chunk_rows])
        return out.add_(b)

    def clone(self) -> LinearWeights:
        """Deep copy with new storage."""
        return LinearWeights(self.W.detach().clone(), self.b.detach().clone())


@dataclass
class FitResult:
    """``loss`` is the final value of the penalised objective (mean CE + l2/2 ||W||^2)."""

    weights: LinearWeights
    l2: float
    iterations: int
    converged: bool
    loss: float


def _loss_and_grad(X: Tensor, y: Tensor, Wt: Tensor, b: Tensor, l2: float,
                   rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Objective and its gradient for weights stored as ``Wt`` = W.T, shape (C, D).

    Returns ``(loss, gWt, gb)``: ``loss`` a float64 scalar, ``gWt`` (C, D) and ``gb`` (C,) float32.
    Every data term is a mean over the rows of ``X``. With ``rows`` (the row count of all processes),
    ``X`` is this process's share: the data terms are summed over processes, in one all-reduce, before
    the penalty is added, so every process gets the objective of all the rows.
    """
    n = X.shape[0] if rows is None else rows
    Z = torch.mm(X, Wt.t()).add_(b)  # (N, C) logits
    lse = torch.logsumexp(Z, dim=1)
    data = (lse - Z.gather(1, y[:, None]).squeeze(1)).sum(dtype=torch.float64) / n
    G = Z.sub_(lse[:, None]).exp_()  # softmax, in place
    G.scatter_add_(1, y[:, None], torch.full((n, 1), -1.0, dtype=G.dtype, device=G.device))
    G.div_(n)
    gWt = torch.mm(G.t(), X)  # (C, D); far faster than X.T @ G on row-major X
    gb = G.sum(dim=0)
    if rows is not None:
        data, gWt, gb = _sum_over_ranks(data, gWt, gb)
    if l2:
        gWt.add_(Wt, alpha=l2)
        data = data + 0.5 * l2 * Wt.double().square().sum()
    return data, gWt, gb


def _sum_over_ranks(data: Tensor, gWt: Tensor, gb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three data terms summed over processes, packed into one float64 all-reduce."""
    flat = distributed.all_reduce_sum(torch.cat([data.reshape(1), gWt.reshape(-1).double(), gb.double()]))
    return flat[0], flat[1:1 + gWt.numel()].view_as(gWt).float(), flat[1 + gWt.numel():].float()


def _grad_scale(X: Tensor, sharded: bool = False) -> float:
    """Root-mean-square feature value (>= 1) over every process's rows when ``sharded``: the gradient scales
    linearly with X's magnitude."""
    norm, count = torch.linalg.vector_norm(X).item(), X.numel()
    if sharded:
        sums = torch.tensor([norm**2, count], dtype=torch.float64, device=X.device)
        norm, count = math.sqrt(distributed.all_reduce_sum(sums)[0].item()), int(sums[1].item())
    return max(1.0, norm / math.sqrt(max(count, 1)))


def fit_logistic(
    X: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    *,
    init: LinearWeights | None = None,
    max_iter: int = 500,
    tol: float = 1e-5,
    sharded: bool = False,
) -> FitResult:
    """Minimise mean CE + (l2/2)||W||^2 by full-batch L-BFGS (strong-Wolfe) on X's device, in float32.

    Starts from zeros, or from a copy of ``init`` (never modified).  ``converged`` is True when, before
    ``max_iter`` iterations, the gradient's max-abs (over W and b) fell below ``tol * max(1, rms(X))``
    (the gradient scales linearly with the features), or the loss stopped changing: a relative decrease
    below 1e-7 over 10 iterations, or L-BFGS's own step / loss-change / line-search limits.
    ``iterations`` counts L-BFGS iterations (0 when the start already satisfies the tolerance);
    ``loss`` is the final objective.  Works the same under a caller's ``no_grad``/``inference_mode``.

    ``sharded``: ``X`` and ``y`` are this process's rows of a training set split across the processes of a
    torch.distributed job, which all call this together with the same ``init``. Losses and gradients are
    summed over processes, so every process takes the same L-BFGS steps to the fit of all the rows.
    """
    if X.dim() != 2 or y.dim() != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"expected X (N, D) and y (N,), got {tuple(X.shape)} and {tuple(y.shape)}")
    if l2 < 0:
        raise ValueError("l2 must be >= 0")
    X = X.detach()
    if X.dtype != torch.float32:
        X = X.float()
    device, D = X.device, X.shape[1]
    y = y.detach().to(device=device, dtype=torch.long)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if init is None:
        Wt = torch.zeros(num_classes, D, dtype=torch.float32, device=device)
        b = torch.zeros(num_classes, dtype=torch.float32, device=device)
    else:
        Wt = init.W.detach().to(device=device, dtype=torch.float32).t().contiguous()  # new storage
        b = init.b.detach().to(device=device, dtype=torch.float32).clone()
        if Wt.shape != (num_classes, D) or b.shape != (num_classes,):
            raise ValueError("init has the wrong shape")

    rows = distributed.total(X.shape[0], device) if sharded else None
    gtol = tol * _grad_scale(X, sharded)
    opt = torch.optim.LBFGS(
        [Wt, b], lr=1.0, max_iter=_WINDOW, max_eval=3 * _WINDOW, tolerance_grad=gtol,
        tolerance_change=1e-12, history_size=_HISTORY_SIZE, line_search_fn="strong_wolfe",
    )
    cache: dict[str, Tensor] = {}

    def evaluate() -> tuple[Tensor, Tensor, Tensor]:
        # L-BFGS re-evaluates the point it ended on at the start of each step(); answer from the cache.
        if cache and torch.equal(cache["Wt"], Wt) and torch.equal(cache["b"], b):
            return cache["loss"], cache["gWt"], cache["gb"]
        loss, gWt, gb = _loss_and_grad(X, y, Wt, b, l2, rows)
        cache.update(Wt=Wt.clone(), b=b.clone(), loss=loss, gWt=gWt, gb=gb)
        return loss, gWt, gb

    def closure() -> Tensor:
        loss, gWt, gb = evaluate()
        Wt.grad, b.grad = gWt.clone(), gb.clone()  # L-BFGS only reads .grad; no autograd graph is built
        return loss

    # L-BFGS runs in windows of _WINDOW iterations (its state carries over between step() calls) so
    # that we can stop once the loss has stopped improving at float32 precision: near the optimum the
    # float32 logits make the loss noisy at ~1e-8, and strong-Wolfe line searches then dither for
    # hundreds of evaluations while moving the weights by nothing that matters.
    iterations, prev_loss, converged = 0, math.inf, False
    # No autograd is involved, but L-BFGS toggles grad mode; be explicit so a caller's no_grad /
    # inference_mode context is irrelevant.
    with torch.enable_grad():
        while True:
            loss_t, gWt, gb = evaluate()
            loss = float(loss_t)
            if not math.isfinite(loss):
                break
            gmax = max(gWt.abs().max().item(), gb.abs().max().item())
            stalled = prev_loss - loss <= _FTOL * max(1.0, abs(loss))
            if gmax <= gtol or stalled:
                converged = True
                break
            if iterations >= max_iter:
                break
            prev_loss = loss
            opt.param_groups[0]["max_iter"] = step_iters = min(_WINDOW, max_iter - iterations)
            opt.step(closure)
            done = int(opt.state[Wt]["n_iter"]) - iterations
            iterations += done
            if done < step_iters:  # L-BFGS stopped by itself: gradient, step or loss change tiny
                loss_t, gWt, gb = evaluate()
                converged = math.isfinite(float(loss_t))
                break
    loss = float(evaluate()[0])
    W = Wt.t().contiguous()
    return FitResult(LinearWeights(W, b.detach().clone()), float(l2), iterations, converged, float(loss))


@dataclass
class PathPoint:
    """One L2 on the path; ``train_loss`` is the penalised training objective at the solution."""

    l2: float
    train_loss: float
    valid_top1_error: float
    valid_cross_entropy: float
    iterations: int
    converged: bool


@dataclass
class PathResult:
    best: FitResult  # an independent copy of the weights at the chosen L2
    path: list[PathPoint]

    @property
    def best_l2(self) -> float:
        return self.best.l2


_ROW_SPACE_MAX_ROWS = 16384  # an N x N Gram matrix and its Cholesky factor: seconds up to here


@dataclass
class RowSpace:
    """Exact reduction of a wide problem (D > 2N) to N features: ``Z = L`` from ``X X^T = L L^T`` (Cholesky).

    With L2 on W, the optimal W lies in the row space of X (representer theorem): W = X^T L^-T Wr
    has ``X W = L Wr`` and ``||W|| = ||Wr||``, so fitting on Z with the same L2 gives the same probe.
    Each L-BFGS iteration then reads an N x N matrix instead of N x D.
    """

    z: Tensor
    X: Tensor

    @classmethod
    def of(cls, X: Tensor) -> RowSpace:
        gram = torch.mm(X, X.t()).double()
        eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        jitter = 1e-7 * gram.diagonal().mean().clamp_min(1e-30)  # float32 rounding of the Gram matrix
        while True:
            chol, info = torch.linalg.cholesky_ex(gram + jitter * eye)
            if int(info) == 0:
                return cls(chol.float().contiguous(), X)  # cholesky returns column-major
            jitter *= 10

    @staticmethod
    def worthwhile(X: Tensor, rows: int | None = None) -> bool:
        """Wide enough that one Gram matrix costs less than the passes over X it saves (``rows``: X's row count
        over all processes, when X is one process's share)."""
        n, d = rows if rows is not None else X.shape[0], X.shape[1]
        return d > 2 * n and n <= _ROW_SPACE_MAX_ROWS

    def lift(self, w: LinearWeights) -> LinearWeights:
        """Weights on Z to weights on the original features: ``W = X^T L^-T Wr``, as ``(V^T X)^T``."""
        v = torch.linalg.solve_triangular(self.z.t(), w.W, upper=True)
        return LinearWeights(torch.mm(v.t(), self.X).t().contiguous(), w.b.clone())


def _valid_error(logits: Tensor, y: Tensor, sharded: bool) -> tuple[float, float]:
    """Top-1 error and mean cross-entropy, over every process's rows when ``sharded``."""
    if not sharded:
        return topk_error(logits, y, 1), cross_entropy(logits, y)
    found = distributed.global_metrics(logits, y)
    return found["top1_error"], found["cross_entropy"]


def fit_l2_path(
    X_train: Tensor,
    y_train: Tensor,
    X_valid: Tensor,
    y_valid: Tensor,
    num_classes: int,
    *,
    l2_path: Sequence[float] = DEFAULT_L2_PATH,
    max_iter: int = 500,
    tol: float = 1e-5,
    patience: int | None = 2,
    init: LinearWeights | None = None,
    sharded: bool = False,
) -> PathResult:
    """Fit along an L2 path (sorted strong to weak, each fit warm-started from the previous solution)
    and choose the L2 on the validation split only.

    The chosen point has the lowest valid top-1 error; ties go to lower valid cross-entropy, then to
    the larger L2.  Layers much wider than the number of samples are fitted exactly in their row space
    (``RowSpace``), which is several times faster.  Early stop: with ``patience=k`` the path stops once valid cross-entropy has risen
    at ``k`` consecutive points (the remaining, weaker L2s are overfitting further); ``None`` fits the
    whole path.  ``init`` warm-starts the first (strongest) L2, e.g. from the previous checkpoint's probe;
    it is ignored for row-space fits, whose variables are not the weights.  Test data is never an input.

    ``sharded``: the train and valid rows are split across the processes of a torch.distributed job (see
    :func:`fit_logistic`); valid errors are counted over all of them. A row-space fit gathers the (at most
    16,384) training rows on every process first, then fits them as a single process would.
    """
    l2s = sorted({float(v) for v in l2_path}, reverse=True)
    if not l2s:
        raise ValueError("empty l2_path")
    y_valid = y_valid.detach()
    path: list[PathPoint] = []
    best: FitResult | None = None
    best_key: tuple[float, float, float] | None = None
    rises = 0
    if sharded:
        wide = RowSpace.worthwhile(X_train, rows=distributed.total(X_train.shape[0], X_train.device))
    else:
        wide = RowSpace.worthwhile(X_train)
    if sharded and wide:
        X_train, y_train = distributed.all_gather_rows(X_train), distributed.all_gather_rows(y_train)
    row_space = RowSpace.of(X_train.detach().float()) if wide else None
    prev = None if row_space is not None else init
    for l2 in l2s:
        fit = fit_logistic(row_space.z if row_space else X_train, y_train, num_classes, l2, init=prev,
                           max_iter=max_iter, tol=tol, sharded=sharded and row_space is None)
        prev = fit.weights
        if row_space is not None:
            fit.weights = row_space.lift(fit.weights)
        logits = fit.weights.logits(X_valid)
        yv = y_valid.to(device=logits.device, dtype=torch.long)
        err, ce = _valid_error(logits, yv, sharded)
        if path and ce > path[-1].valid_cross_entropy:
            rises += 1
        else:
            rises = 0
        path.append(PathPoint(l2, fit.loss, err, ce, fit.iterations, fit.converged))
        key = (err, ce, -l2)
        if best_key is None or key < best_key:
            best_key = key
            best = FitResult(fit.weights.clone(), fit.l2, fit.iterations, fit.converged, fit.loss)
        if patience is not None and rises >= patience:
            break
    assert best is not None
    return PathResult(best=best, path=path)
