"""The fitting engine: multinomial logistic probes, many layers at once, each fitted to convergence along an L2 path.

A probe is ``softmax(h @ W + b)`` on the float32 features ``h`` of one layer. For an L2 strength the objective is

    f(W, b) = mean_i CE(softmax(x_i @ W + b), y_i) + (l2 / 2) * ||W||_F^2      (bias not penalised)

which is strictly convex in ``W``: "fitting the probe" has one answer, whatever the learning rates, epochs or seeds.
The L2 is chosen along a path (strong to weak, warm-started) on the validation split only.

Relation to scikit-learn: ``LogisticRegression(C=c)`` minimises ``C * sum_i CE_i + ||W||^2 / 2``; dividing by
``C * N`` gives ``f`` with ``l2 = 1 / (C * N)`` (:func:`sklearn_C`). The tolerance means what scikit-learn's lbfgs
means: the max-abs gradient of this mean-loss objective (times the features' RMS when it exceeds 1).

How it is fast (docs/benchmarks.md has the measurements):

* **Many problems at once.** All layers of one width (and all layers wider than twice the sample count, after
  the row-space reduction) are one batch for :func:`linprobe.fit.lbfgs.minimize`: each has its own L-BFGS history,
  line search and stopping, and Python is paid once per iteration for all of them. Stacked layers are evaluated
  with batched matrix products; the others one matrix product each.
* **Preconditioning.** The solver works in centred coordinates (the bias absorbs each feature's mean, which
  changes nothing in the objective) and starts L-BFGS from the inverse of a standard upper bound of the
  logistic Hessian, ``0.5 * Cov(x) + l2``, in the covariance's eigenbasis: correlated or badly scaled features
  cost few iterations, so standardising is not needed for speed. The tolerance is checked in the original
  coordinates.
* **A two-precision path.** The path is screened at ``screen_tol`` (1e-3); the two best points are fitted on to
  ``tol`` and the choice is made between them (measured: the same quality as fitting every point to ``tol``, in
  half the iterations; docs/benchmarks.md).
* **Exact row space.** A layer much wider than the sample count is fitted on ``Z = U sqrt(S)`` from the
  eigendecomposition of its centred Gram matrix (N features, diagonal covariance) and lifted back exactly.

The global RNG is never used, so fits are deterministic. ``sharded=True`` (torch.distributed, one share of the rows
per process): every evaluation's data terms are summed over processes in one float64 all-reduce, so every
process takes the same steps; only the summation order differs from one process.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, cast

import torch
from torch import Tensor

from linprobe import distributed
from linprobe.fit.lbfgs import Outcome, minimize
from linprobe.fit.metrics import cross_entropy, topk_error

__all__ = [
    "DEFAULT_L2_PATH", "FitResult", "FitSettings", "LinearWeights", "PathPoint", "PathResult", "fit_l2_path",
    "fit_logistic", "fit_paths", "objective", "row_space_worthwhile", "sklearn_C",
]

#: Decades from strong to weak. Standardised features make the data term's gradient O(1) per weight, so l2 ~ 10
#: already shrinks a 25,000-wide layer fitted on a few thousand samples hard, while l2 ~ 1e-5 is essentially
#: unregularised for a 10-wide layer on 60,000 samples. Strong-to-weak order lets each fit warm-start from the
#: previous (more regularised, easier) solution.
DEFAULT_L2_PATH: tuple[float, ...] = (1e1, 1e0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)

_LOGITS_CHUNK_ROWS = 16384
_BLOCK_ROWS = 8192  # rows per block when reading a layer for its statistics
_DENSE_PRECONDITIONER_MAX = 4096  # wider layers get the diagonal of the bound (an eigendecomposition costs D^3)
_ROW_SPACE_MAX_ROWS = 8192  # an N x N eigendecomposition: seconds up to here
_GATHER_BYTES = 256 << 20  # a list of layers up to this size is stacked in memory, to be evaluated together
_GAP = 2


def sklearn_C(l2: float, n: int) -> float:
    """scikit-learn's ``C`` giving the same minimiser as our ``l2`` on ``n`` training samples.

    ``LogisticRegression(C)`` minimises ``C * sum_i CE_i + ||W||^2 / 2``; dividing by ``C * n`` gives
    ``mean_i CE_i + ||W||^2 / (2 * C * n)``, i.e. our objective with ``l2 = 1 / (C * n)``.
    """
    return 1.0 / (l2 * n)


@dataclass(frozen=True)
class FitSettings:
    """How probes are fitted: the L2 path (sorted strong to weak when used), L-BFGS's iteration cap per L2 and
    tolerance, the looser tolerance the path is screened at (only the chosen L2 is fitted to ``tol``; ``None``:
    every L2 to ``tol``), the early stop (``patience`` rises of valid cross-entropy; None fits the whole path),
    the L-BFGS history length and how many of the best screened L2s are fitted on to ``tol`` before the choice."""

    l2_path: tuple[float, ...] = DEFAULT_L2_PATH
    max_iter: int = 500
    tol: float = 1e-5
    screen_tol: float | None = 1e-3
    patience: int | None = 2
    history: int = 10
    finalists: int = 2

    def __post_init__(self) -> None:
        if not self.l2_path:
            raise ValueError("empty l2_path")
        if min(self.l2_path) < 0:
            raise ValueError("l2 must be >= 0")
        if self.max_iter < 0 or self.tol <= 0:
            raise ValueError("max_iter must be >= 0 and tol > 0")

    @property
    def path(self) -> list[float]:
        return sorted({float(v) for v in self.l2_path}, reverse=True)


@dataclass
class LinearWeights:
    """A linear probe ``logits = X @ W + b``; ``W``: (D, C) float32, ``b``: (C,) float32, detached."""

    W: Tensor
    b: Tensor

    @torch.no_grad()
    def logits(self, X: Tensor, chunk_rows: int = _LOGITS_CHUNK_ROWS) -> Tensor:
        """``X @ W + b`` in row chunks (each chunk moved to W's device/float32 on its own), on W's device."""
        Wt = self.W.detach().t().contiguous()  # (C, D): X @ Wt.T is the faster CPU layout
        out = torch.empty(X.shape[0], Wt.shape[0], dtype=Wt.dtype, device=Wt.device)
        for s in range(0, X.shape[0], chunk_rows):
            xc = X[s:s + chunk_rows].to(device=Wt.device, dtype=Wt.dtype)
            torch.mm(xc, Wt.t(), out=out[s:s + chunk_rows])
        return out.add_(self.b.detach())

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


class FittedPath(Protocol):
    """What a probe adopts from a fitted L2 path: a :class:`PathResult` or a ``ridge.RidgePath``."""

    @property
    def best(self) -> FitResult: ...

    @property
    def best_l2(self) -> float: ...


def row_space_worthwhile(n: int, d: int) -> bool:
    """Wider than the sample count (D > N): the N x N Gram matrix and its eigendecomposition cost less than the
    covariance's, and every pass reads N x N instead of N x D."""
    return d > n and n <= _ROW_SPACE_MAX_ROWS


def group_key(n: int, d: int) -> int:
    """Layers fitted as one batch share this key: their width, or for layers fitted in their row space, -1."""
    return -1 if row_space_worthwhile(n, d) else d


class _Lift(NamedTuple):
    """How a row-space problem's solution ``Wz`` returns to its layer: ``W^T = Wz^T @ map @ (x - 1 mu^T)``."""

    x: Tensor  # the original features (N, D)
    mu: Tensor  # their means (D,)
    map: Tensor  # (N, N): the eigenvectors scaled by 1 / sqrt(eigenvalue), 0 for the dropped ones


class _Problems:
    """P logistic problems on the same labels: features ``xs[p]`` (N, D_p), all of one width ``D`` as seen by the
    solver (the row-space ones: their ``Z``), centred coordinates, the Hessian bound's eigenbasis and what maps a
    solution back to the original features.

    Parameters are ``theta`` (P, C, D + 1): the weights on the centred features and, last, the bias.
    """

    def __init__(self, xs: Sequence[Tensor], y: Tensor, num_classes: int, *, stacked: Tensor | None = None,
                 rows: int | None = None) -> None:
        self.xs, self.stacked, self.rows = list(xs), stacked, rows
        self.n = rows if rows is not None else self.xs[0].shape[0]
        self.device = self.xs[0].device
        self.y = y.to(device=self.device, dtype=torch.long)
        self.C, self.D = num_classes, self.xs[0].shape[1]
        self.lifts: list[_Lift | None] = [None] * len(self.xs)  # row-space problems: the way back
        self.mu = torch.zeros(len(self.xs), self.D, device=self.device)
        self.basis: Tensor | None = None  # (P, D, D) eigenvectors of the covariance, or None: diagonal
        self.lam = torch.ones(len(self.xs), self.D, device=self.device)
        self.scale = torch.ones(len(self.xs), dtype=torch.float64)  # max(1, rms(X)): the gradient's scale

    @classmethod
    def build(cls, xs: Sequence[Tensor], y: Tensor, num_classes: int, *, stacked: Tensor | None = None,
              sharded: bool = False, scratch: Callable[[tuple[int, ...]], Tensor] | None = None) -> _Problems:
        """Read every layer once for its statistics; wide layers are moved to their row space (``scratch(shape)``
        allocates its ``Z``)."""
        rows = distributed.total(xs[0].shape[0], xs[0].device) if sharded else None
        n = rows if rows is not None else xs[0].shape[0]
        if row_space_worthwhile(n, xs[0].shape[1]):
            if sharded:
                xs = [distributed.all_gather_rows(x) for x in xs]
                y = distributed.all_gather_rows(y)
            return cls._row_space(xs, y, num_classes, scratch or (lambda shape: torch.empty(shape, device=xs[0].device)))
        if stacked is None and 1 < len(xs) and sum(x.numel() for x in xs) * 4 <= _GATHER_BYTES:
            stacked = torch.stack([x.float() for x in xs])
            xs = list(stacked)
        self = cls(xs, y, num_classes, stacked=stacked, rows=rows)
        dense = self.D <= _DENSE_PRECONDITIONER_MAX
        cov = []
        for p, x in enumerate(self.xs):
            total, gram, sq = _moments(x, dense)
            if sharded:
                total, gram, sq = (distributed.all_reduce_sum(t) for t in (total, gram, sq))
            mu = total / self.n
            self.mu[p] = mu.float()
            self.scale[p] = max(1.0, math.sqrt(float(sq) / max(self.n * self.D, 1)))
            cov.append(gram / self.n - (torch.outer(mu, mu) if dense else mu.square()))
        if dense:
            lam, basis = torch.linalg.eigh(torch.stack(cov))
            self.lam, self.basis = lam.clamp_min(0).float(), basis.float()
        else:
            self.lam = torch.stack(cov).clamp_min(0).float()
        return self

    @classmethod
    def _row_space(cls, xs: Sequence[Tensor], y: Tensor, num_classes: int,
                   scratch: Callable[[tuple[int, ...]], Tensor]) -> _Problems:
        """Each X (N, D > N) as ``Z = U sqrt(S)`` (N, N) from ``Xc Xc^T = U S U^T``: the optimal W lies in the span
        of the centred rows (representer theorem; the bias is free), so fitting Z with the same L2 gives the same
        probe; its columns are centred and uncorrelated (diagonal preconditioner)."""
        n = xs[0].shape[0]
        stacked = scratch((len(xs), n, n))
        lifts: list[_Lift | None] = []
        lams, scales = [], []
        for z, x in zip(stacked, xs):
            total, gram, sq = _moments(x, False, rows_gram=True)
            mu = total / n
            ones = gram.sum(1) / n
            gram = gram - ones[:, None] - ones[None, :] + ones.mean()  # the Gram matrix of the centred rows
            s, u = (t.double() for t in torch.linalg.eigh(gram.float()))
            keep = s > 1e-7 * s.max().clamp_min(1e-300)  # below: float32 rounding of the Gram matrix
            s = torch.where(keep, s, torch.zeros_like(s))
            z.copy_((u * s.sqrt()).float())
            inv = torch.where(keep, s.clamp_min(1e-300).rsqrt(), torch.zeros_like(s))
            lifts.append(_Lift(x, mu.float(), (u * inv).t().float()))
            lams.append((s / n).float())
            scales.append(max(1.0, math.sqrt(float(sq) / max(x.numel(), 1))))
        self = cls(list(stacked), y, num_classes, stacked=stacked)
        self.lifts = lifts
        self.lam, self.scale = torch.stack(lams), torch.tensor(scales, dtype=torch.float64)
        return self

    def __len__(self) -> int:
        return len(self.xs)

    def objective(self, index: Tensor, theta: Tensor, l2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Loss (float64), centred-coordinate gradient and the max-abs gradient in the original coordinates of the
        problems ``index`` at ``theta``; ``l2`` (len(index),)."""
        D = self.D
        W = theta[:, :, :D]
        mu = self.mu[index]
        bias = theta[:, :, D] - torch.bmm(W, mu[:, :, None]).squeeze(2)  # the bias on the uncentred features
        data, gW, gb = self._data_terms(index, W, bias)
        if self.rows is not None:
            data, gW, gb = _sum_over_ranks(data, gW, gb)
        l2f = l2.to(theta.dtype).view(-1, 1, 1)
        gW.add_(W * l2f)
        loss = data + 0.5 * l2.to(torch.float64) * W.double().square().flatten(1).sum(1)
        gmax = torch.maximum(gW.abs().flatten(1).amax(1), gb.abs().amax(1))
        grad = torch.cat([gW - gb[:, :, None] * mu[:, None, :], gb[:, :, None]], dim=2)
        return loss, grad, gmax.double()

    def _data_terms(self, index: Tensor, W: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean cross-entropy, ``G^T X`` and ``G^T 1`` with ``G`` = softmax - one-hot, over this process's rows.

        Stacked data are evaluated in runs of consecutive problems (views, no copy: copying a subset costs more
        than the products), a run spanning gaps of up to ``_GAP`` problems not asked for; others one by one."""
        if self.stacked is None:
            parts = [_data_terms(self.xs[p], self.y, W[j], bias[j], self.n) for j, p in enumerate(index.tolist())]
            return tuple(torch.stack(t) for t in zip(*parts))  # type: ignore[return-value]
        wanted = index.tolist()
        parts, j = [], 0
        while j < len(wanted):
            k = j
            while k + 1 < len(wanted) and wanted[k + 1] - wanted[k] <= _GAP + 1:
                k += 1
            lo, hi = wanted[j], wanted[k] + 1
            if hi - lo == k + 1 - j:  # no gap: the parameters as they are
                parts.append(_data_terms(self.stacked[lo:hi], self.y, W[j:k + 1], bias[j:k + 1], self.n))
            else:  # the problems in the gaps get zeros, and their results are dropped
                at = index[j:k + 1] - lo
                span = W.new_zeros(hi - lo, *W.shape[1:])
                cspan = bias.new_zeros(hi - lo, bias.shape[1])
                span[at], cspan[at] = W[j:k + 1], bias[j:k + 1]
                parts.append(cast("tuple[Tensor, Tensor, Tensor]",  # the three terms, each cut to ``at``
                                  tuple(t[at] for t in _data_terms(self.stacked[lo:hi], self.y, span, cspan, self.n))))
            j = k + 1
        return tuple(torch.cat(t) for t in zip(*parts))  # type: ignore[return-value]

    def precondition(self, index: Tensor, g: Tensor, l2: Tensor) -> Tensor:
        """``M^-1 g`` for the Hessian bound ``M = 0.5 * Cov + l2`` on the weights and 0.5 on the bias."""
        D = self.D
        lam = self.lam[index]
        floor = 1e-6 * lam.amax(1, keepdim=True).clamp_min(1e-12)
        inv = 1.0 / (0.5 * torch.maximum(lam, floor) + l2.to(lam.dtype)[:, None])
        gw = g[:, :, :D]
        if self.basis is None:
            w = gw * inv[:, None, :]
        else:
            V = self.basis[index]
            w = torch.bmm(torch.bmm(gw, V) * inv[:, None, :], V.transpose(1, 2))
        return torch.cat([w, 2.0 * g[:, :, D:]], dim=2)

    def start(self, inits: Sequence[LinearWeights | None]) -> Tensor:
        """The starting ``theta``: zeros, or a given probe in centred coordinates (not for row-space problems)."""
        theta = torch.zeros(len(self), self.C, self.D + 1, device=self.device)
        for p, w in enumerate(inits):
            if w is None or self.lifts[p] is not None:
                continue
            W = w.W.detach().to(device=self.device, dtype=torch.float32)
            b = w.b.detach().to(device=self.device, dtype=torch.float32)
            if W.shape != (self.D, self.C) or b.shape != (self.C,):
                raise ValueError("init has the wrong shape")
            theta[p, :, :self.D] = W.t()
            theta[p, :, self.D] = b + self.mu[p] @ W
        return theta

    def weights(self, p: int, theta: Tensor) -> LinearWeights:
        """Problem ``p``'s solution as a probe on its original (uncentred, unreduced) features."""
        Wt, b = theta[:, :self.D], theta[:, self.D]
        lift = self.lifts[p]
        if lift is None:
            return LinearWeights(Wt.t().contiguous(), (b - Wt @ self.mu[p]).contiguous())
        x, mu = lift.x, lift.mu.to(theta.device)
        coef = Wt @ lift.map  # (C, N): W^T = coef @ (X - 1 mu^T)
        W = torch.zeros(x.shape[1], self.C, device=theta.device)
        for s in range(0, x.shape[0], _BLOCK_ROWS):
            W.add_((coef[:, s:s + _BLOCK_ROWS] @ x[s:s + _BLOCK_ROWS].to(theta.device).float()).t())
        W.sub_(torch.outer(mu, coef.sum(1)))
        return LinearWeights(W, (b - mu @ W).contiguous())


def _moments(x: Tensor, dense: bool, rows_gram: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Column sums, the Gram matrix (``X^T X``, its diagonal when not ``dense``, or ``X X^T`` with ``rows_gram``)
    and the sum of squares of ``x``, in float64, reading it once in row blocks."""
    d = x.shape[1]
    total = torch.zeros(d, dtype=torch.float64, device=x.device)
    if rows_gram:
        xf = x.float() if x.dtype != torch.float32 else x
        gram = torch.mm(xf, xf.t()).double()
        return xf.sum(0, dtype=torch.float64), gram, gram.diagonal().sum()
    gram = torch.zeros((d, d) if dense else (d,), dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], _BLOCK_ROWS):
        block = x[s:s + _BLOCK_ROWS].float()
        total += block.sum(0, dtype=torch.float64)
        gram += torch.mm(block.t(), block).double() if dense else block.square().sum(0, dtype=torch.float64)
    sq = gram.diagonal().sum() if dense else gram.sum()
    return total, gram, sq


def _data_terms(X: Tensor, y: Tensor, Wt: Tensor, bias: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy (float64), ``G^T X`` (C, D) and ``G^T 1`` (C,) of one problem (X (N, D), ``Wt`` (C, D),
    ``bias`` (C,)) or of a stack of them (a leading problem dimension on X, Wt and bias).

    Logits are class-major, ``Wt @ X^T`` (C, N): the softmax then reduces over a short outer dimension with N
    contiguous (~20% faster per pass than (N, C), where every reduction is over 10 strided values), and
    ``G @ X`` is a plain product."""
    Xt = X.transpose(-2, -1)
    Z = torch.baddbmm(bias[:, :, None], Wt, Xt) if X.dim() == 3 else torch.addmm(bias[:, None], Wt, Xt)
    yy = y.view(1, -1).expand(*Z.shape[:-2], 1, len(y))
    lse = torch.logsumexp(Z, dim=-2, keepdim=True)
    data = (lse - Z.gather(-2, yy)).sum((-2, -1), dtype=torch.float64) / n
    G = Z.sub_(lse).exp_()  # softmax, in place
    G.scatter_add_(-2, yy, torch.full(yy.shape, -1.0, dtype=G.dtype, device=G.device))
    G.div_(n)
    return data, G @ X, G.sum(-1)


def _sum_over_ranks(data: Tensor, gW: Tensor, gb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The data terms of every problem summed over processes, packed into one float64 all-reduce."""
    k = len(data)
    flat = distributed.all_reduce_sum(torch.cat([data, gW.reshape(-1).double(), gb.reshape(-1).double()]))
    return flat[:k], flat[k:k + gW.numel()].view_as(gW).float(), flat[k + gW.numel():].view_as(gb).float()


def objective(X: Tensor, y: Tensor, weights: LinearWeights, l2: float) -> tuple[float, float]:
    """The objective ``f`` and the max-abs of its gradient (over W and b) at ``weights``: what the tolerance tests."""
    X = X.float()
    data, gWt, gb = _data_terms(X, y.long(), weights.W.t().float(), weights.b.float(), X.shape[0])
    gWt.add_(weights.W.t(), alpha=l2)
    loss = data + 0.5 * l2 * weights.W.double().square().sum()
    return float(loss), max(gWt.abs().max().item(), gb.abs().max().item())


def _minimize(problems: _Problems, theta: Tensor, l2: Tensor, tol: float, settings: FitSettings, *,
              members: Tensor | None = None, on_done: Callable[[Tensor], None] | None = None,
              max_iter: int | Tensor | None = None) -> Outcome:
    """One batched L-BFGS run from ``theta`` at ``l2`` of the problems ``members`` (positions; default: all), at most
    ``max_iter`` (default: the settings') iterations each."""
    members = torch.arange(len(problems), device=problems.device) if members is None else members
    l2 = l2.to(problems.device)

    def objective_(index: Tensor, th: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return problems.objective(members[index], th, l2[index])

    def precondition(index: Tensor, g: Tensor) -> Tensor:
        return problems.precondition(members[index], g, l2[index])

    gtol = tol * problems.scale.to(problems.device)[members]
    with torch.no_grad():
        return minimize(objective_, theta, precondition, gtol,
                        max_iter=settings.max_iter if max_iter is None else max_iter,
                        history=settings.history, on_done=on_done)


@dataclass
class _Track:
    """One problem's walk along the path."""

    points: list[PathPoint] = field(default_factory=list)
    rises: int = 0
    thetas: list[Tensor] = field(default_factory=list)
    done: bool = False

    def ranked(self) -> list[int]:
        """The path's points, best first: lowest valid top-1 error, then cross-entropy, then the larger L2."""
        return sorted(range(len(self.points)), key=lambda i: _key(self.points[i]))


def _key(point: PathPoint) -> tuple[float, float, float]:
    return point.valid_top1_error, point.valid_cross_entropy, -point.l2


def _valid_error(logits: Tensor, y: Tensor, sharded: bool) -> tuple[float, float]:
    """Top-1 error and mean cross-entropy, over every process's rows when ``sharded``."""
    if not sharded:
        return topk_error(logits, y, 1), cross_entropy(logits, y)
    found = distributed.global_metrics(logits, y)
    return found["top1_error"], found["cross_entropy"]


def fit_paths(train: Sequence[Tensor] | Tensor, y_train: Tensor, valid: Sequence[Tensor], y_valid: Tensor,
              num_classes: int, settings: FitSettings = FitSettings(), *,
              inits: Sequence[LinearWeights | None] | None = None, sharded: bool = False,
              scratch: Callable[[tuple[int, ...]], Tensor] | None = None,
              on_fit: Callable[[int], None] | None = None) -> list[PathResult]:
    """Fit the probes of several layers of one width (``train``: a list of (N, D) or a stacked (P, N, D) tensor,
    the same labels) along the L2 path, all at once, and choose each one's L2 on its validation features.

    The chosen point has the lowest valid top-1 error; ties go to lower valid cross-entropy, then to the larger L2.
    With ``patience=k`` a layer's path stops once its valid cross-entropy has risen at ``k`` consecutive points.
    The path is fitted at ``settings.screen_tol``; its ``settings.finalists`` best points are then fitted on to
    ``settings.tol`` and the choice is made among them (the path's points keep their screened numbers).
    ``inits`` warm-start the strongest L2 (e.g. the previous checkpoint's probes; ignored for row-space layers).
    ``on_fit(k)`` is told each time ``k`` more (layer, L2) fits are done. Test data is never an input.
    """
    stacked = train if isinstance(train, Tensor) and train.dim() == 3 else None
    xs = list(train)
    if not xs:
        return []
    if len(valid) != len(xs):
        raise ValueError(f"{len(xs)} training and {len(valid)} validation feature matrices")
    rows = distributed.total(len(y_train), xs[0].device) if sharded else len(y_train)
    keys = [group_key(rows, x.shape[1]) for x in xs]
    if len(set(keys)) > 1:  # one batch per width
        by_problem: dict[int, PathResult] = {}
        for key in dict.fromkeys(keys):
            part = [p for p, k in enumerate(keys) if k == key]
            inits_ = [inits[p] for p in part] if inits is not None else None
            fits = fit_paths([xs[p] for p in part], y_train, [valid[p] for p in part], y_valid, num_classes, settings,
                             inits=inits_, sharded=sharded, scratch=scratch, on_fit=on_fit)
            by_problem.update(zip(part, fits))
        return [by_problem[p] for p in range(len(xs))]
    for x, v in zip(xs, valid):
        if x.dim() != 2 or x.shape[0] != y_train.shape[0] or v.dim() != 2 or v.shape[1] != x.shape[1]:
            raise ValueError(f"expected X (N, D) with y (N,) and valid (M, D), got {tuple(x.shape)}, "
                             f"{tuple(y_train.shape)} and {tuple(v.shape)}")
    device = xs[0].device
    y = y_train.detach().to(device=device, dtype=torch.long)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    problems = _Problems.build([x.detach() for x in xs], y, num_classes, stacked=stacked, sharded=sharded,
                               scratch=scratch)
    l2s = settings.path
    screen = settings.screen_tol if settings.screen_tol and len(l2s) > 1 else settings.tol
    theta = problems.start(inits or [None] * len(xs))
    tracks = [_Track() for _ in xs]
    yv = y_valid.detach().to(device=device, dtype=torch.long)
    for k, l2 in enumerate(l2s):
        live = [p for p, t in enumerate(tracks) if not t.done]
        if not live:
            break
        found = _minimize(problems, theta[live], torch.full((len(live),), l2, dtype=torch.float64), screen, settings,
                          members=torch.tensor(live, device=device), on_done=lambda done: on_fit and on_fit(len(done)))
        for j, p in enumerate(live):
            track, th = tracks[p], found.theta[j]
            theta[p] = th
            err, ce = _valid_error(problems.weights(p, th).logits(valid[p]), yv, sharded)
            track.rises = track.rises + 1 if track.points and ce > track.points[-1].valid_cross_entropy else 0
            track.points.append(PathPoint(l2, float(found.loss[j]), err, ce, int(found.iterations[j]),
                                          bool(found.converged[j])))
            track.thetas.append(th.clone())
            if settings.patience is not None and track.rises >= settings.patience:
                track.done = True
                if on_fit:
                    on_fit(len(l2s) - k - 1)
    if screen <= settings.tol:
        best = [t.ranked()[0] for t in tracks]
        return [PathResult(FitResult(problems.weights(p, t.thetas[i]), t.points[i].l2, t.points[i].iterations,
                                     t.points[i].converged, t.points[i].train_loss), t.points)
                for p, (t, i) in enumerate(zip(tracks, best))]
    return _polish(problems, tracks, valid, yv, settings, sharded)


def _polish(problems: _Problems, tracks: list[_Track], valid: Sequence[Tensor], yv: Tensor, settings: FitSettings,
            sharded: bool) -> list[PathResult]:
    """Fit the best ``settings.finalists`` screened points of every path on to ``settings.tol`` (each within
    ``max_iter`` iterations in all) and choose among them on their valid errors."""
    chosen: list[tuple[tuple[float, float, float], FitResult] | None] = [None] * len(tracks)
    for r in range(settings.finalists):
        members = [p for p, t in enumerate(tracks) if len(t.points) > r]
        if not members:
            break
        at = [tracks[p].ranked()[r] for p in members]
        points = [tracks[p].points[i] for p, i in zip(members, at)]
        used = torch.tensor([pt.iterations for pt in points])
        found = _minimize(problems, torch.stack([tracks[p].thetas[i] for p, i in zip(members, at)]),
                          torch.tensor([pt.l2 for pt in points], dtype=torch.float64), settings.tol, settings,
                          members=torch.tensor(members, device=problems.device),
                          max_iter=(settings.max_iter - used).clamp_min(0).to(problems.device))
        for j, (p, pt) in enumerate(zip(members, points)):
            weights = problems.weights(p, found.theta[j])
            err, ce = _valid_error(weights.logits(valid[p]), yv, sharded)
            key = (err, ce, -pt.l2)
            if chosen[p] is None or key < chosen[p][0]:  # type: ignore[index]
                chosen[p] = key, FitResult(weights, pt.l2, int(used[j] + found.iterations[j].cpu()),
                                           bool(found.converged[j]), float(found.loss[j]))
    return [PathResult(c[1], t.points) for c, t in zip(chosen, tracks)]  # type: ignore[index]


def fit_logistic(X: Tensor, y: Tensor, num_classes: int, l2: float, *, init: LinearWeights | None = None,
                 max_iter: int = 500, tol: float = 1e-5, sharded: bool = False) -> FitResult:
    """Minimise mean CE + (l2/2)||W||^2 for one problem (X (N, D), y (N,)) by preconditioned L-BFGS on X's device.

    Starts from zeros or a copy of ``init``. ``converged``: the max-abs gradient (over W and b) fell below
    ``tol * max(1, rms(X))``, or the loss stopped improving at float32 resolution, before ``max_iter``.
    ``sharded``: X and y are this process's rows of a torch.distributed job's training set (see the module).
    """
    if X.dim() != 2 or y.dim() != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"expected X (N, D) and y (N,), got {tuple(X.shape)} and {tuple(y.shape)}")
    if l2 < 0:
        raise ValueError("l2 must be >= 0")
    X = X.detach().float()
    y = y.detach().to(device=X.device, dtype=torch.long)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    problems = _Problems.build([X], y, num_classes, sharded=sharded)
    settings = FitSettings(l2_path=(l2,), max_iter=max_iter, tol=tol)
    theta = problems.start([init])
    out = _minimize(problems, theta, torch.tensor([float(l2)], dtype=torch.float64), tol, settings)
    return FitResult(problems.weights(0, out.theta[0]), float(l2), int(out.iterations[0]), bool(out.converged[0]),
                     float(out.loss[0]))


def fit_l2_path(X_train: Tensor, y_train: Tensor, X_valid: Tensor, y_valid: Tensor, num_classes: int, *,
                l2_path: Sequence[float] = DEFAULT_L2_PATH, max_iter: int = 500, tol: float = 1e-5,
                screen_tol: float | None = 1e-3, patience: int | None = 2, init: LinearWeights | None = None,
                sharded: bool = False) -> PathResult:
    """:func:`fit_paths` for one layer."""
    settings = FitSettings(tuple(l2_path), max_iter, tol, screen_tol, patience)
    return fit_paths([X_train.float()], y_train, [X_valid], y_valid, num_classes, settings, inits=[init],
                     sharded=sharded)[0]
