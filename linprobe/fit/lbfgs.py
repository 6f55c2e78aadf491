"""Batched, preconditioned L-BFGS: many independent smooth convex problems minimised in lock step.

Every problem has its own parameters (one slice of a ``(P, ...)`` tensor), history, step length, line search
and stopping; what they share is the Python: one iteration costs a handful of batched tensor operations
whatever ``P`` is, and the objective is asked for the values of every problem still searching at once.

The initial inverse Hessian of each problem is a preconditioner (``apply(g) ~ H^-1 g``), scaled per problem
by the usual ``s.y / y.M^-1 y`` of the newest pair. The line search is Armijo backtracking with quadratic
interpolation, a step also taken where Hager and Zhang's approximate Wolfe conditions hold (near the optimum the
float32 loss stops resolving decreases that its gradient still sees); a pair that would not keep the
approximation positive definite (``s.y <= 0``) is not stored.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Objective", "Outcome", "minimize"]

#: ``objective(index, theta) -> (loss, grad, gmax)``: for the problems ``index`` (positions in the batch) at
#: parameters ``theta`` (len(index), ...): the float64 losses, the gradients (same shape as theta) and the
#: max-abs gradient that the tolerance is checked against (it may be measured in other coordinates).
Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
#: ``precondition(index, g) -> approximately H^-1 g`` for the problems ``index``.
Preconditioner = Callable[[Tensor, Tensor], Tensor]

_ARMIJO = 1e-4
_MAX_BACKTRACKS = 30
_SIGMA, _DELTA, _NOISE = 0.9, 0.1, 1e-6  # approximate Wolfe: curvature, sufficient decrease, loss noise allowed
_SHRINK = 1e-4  # one backtrack cuts the step at most this much (a far overshoot: the quadratic's minimiser is tiny)
_RESOLUTION = 1e-9  # a predicted decrease below this (relative to max(1, |f|)) is lost in the float32 loss's noise
_WINDOW = 10  # iterations between checks of the loss-stall criterion
_FTOL = 1e-7  # stalled: relative loss decrease over a window below ~float32 resolution


@dataclass
class Outcome:
    """Per problem: the parameters reached, the loss there, iterations taken and whether the tolerance (or a
    stall at float32 resolution) was reached before ``max_iter``."""

    theta: Tensor
    loss: Tensor
    iterations: Tensor
    converged: Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-problem inner products of two (k, ...) tensors, in float64."""
    return (a * b).flatten(1).sum(1, dtype=torch.float64)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """A (k,) vector shaped to broadcast over (k, ...)."""
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class _History:
    """The last ``m`` (s, y) pairs of the problems still running; a pair with ``rho = 0`` is a blank."""

    def __init__(self, m: int, like: Tensor) -> None:
        self.s = [torch.zeros_like(like) for _ in range(m)]
        self.y = [torch.zeros_like(like) for _ in range(m)]
        self.rho = torch.zeros(m, like.shape[0], dtype=torch.float64, device=like.device)
        self.gamma = torch.ones(like.shape[0], dtype=torch.float64, device=like.device)
        self.newest = -1

    def keep(self, rows: Tensor) -> None:
        """Drop the problems not in ``rows`` (positions among the running ones)."""
        self.s = [t[rows] for t in self.s]
        self.y = [t[rows] for t in self.y]
        self.rho, self.gamma = self.rho[:, rows], self.gamma[rows]

    def forget(self, mask: Tensor) -> None:
        """Blank the history of the problems in ``mask`` (their next direction is the preconditioned gradient)."""
        self.rho[:, mask] = 0
        self.gamma[mask] = 1

    def push(self, s: Tensor, y: Tensor, sy: Tensor, yHy: Tensor) -> None:
        """Store a pair per problem; those with ``s.y`` not safely positive store a blank."""
        self.newest = (self.newest + 1) % len(self.s)
        good = sy > 1e-10 * yHy.clamp_min(1e-300)
        self.s[self.newest], self.y[self.newest] = s, y
        self.rho[self.newest] = torch.where(good, 1.0 / sy.where(good, torch.ones_like(sy)), torch.zeros_like(sy))
        self.gamma = torch.where(good, sy / yHy.where(good, torch.ones_like(yHy)), self.gamma)

    def direction(self, index: Tensor, g: Tensor, precondition: Preconditioner) -> Tensor:
        """``-H g`` by the two-loop recursion, with ``H0 = gamma * precondition``."""
        m = len(self.s)
        order = [(self.newest - i) % m for i in range(m)]
        q, alphas = g.clone(), {}
        for i in order:
            a = self.rho[i] * _dot(self.s[i], q)
            alphas[i] = a
            q.sub_(_bcast(a, q) * self.y[i])
        r = precondition(index, q).mul_(_bcast(self.gamma, q))
        for i in reversed(order):
            b = self.rho[i] * _dot(self.y[i], r)
            r.add_(_bcast(alphas[i] - b, r) * self.s[i])
        return r.neg_()


def minimize(objective: Objective, theta0: Tensor, precondition: Preconditioner, gtol: Tensor, *,
             max_iter: int | Tensor, history: int = 10,
             on_done: Callable[[Tensor], None] | None = None) -> Outcome:
    """Minimise ``P`` problems at once from ``theta0`` (P, ...); problem ``p`` stops when its ``gmax <= gtol[p]``,
    when its loss stops improving (relative decrease below 1e-7 over 10 iterations, or no step length lowers it),
    or after ``max_iter`` (per problem, or one for all) iterations (not converged). ``on_done(index)`` is told
    which problems just stopped."""
    P, device = theta0.shape[0], theta0.device
    out = Outcome(theta0.clone(), torch.zeros(P, dtype=torch.float64, device=device),
                  torch.zeros(P, dtype=torch.long, device=device), torch.zeros(P, dtype=torch.bool, device=device))
    run = torch.arange(P, device=device)  # the problems still running, as positions in the batch
    theta = theta0.clone()
    f, g, gmax = objective(run, theta)
    hist = _History(history, theta)
    it = torch.zeros(P, dtype=torch.long, device=device)
    f_ref = torch.full((P,), math.inf, dtype=torch.float64, device=device)
    stalled = torch.zeros(P, dtype=torch.bool, device=device)
    fresh = torch.ones(P, dtype=torch.bool, device=device)  # this iteration's direction ignores the history
    gtol = gtol.to(device)
    cap = torch.as_tensor(max_iter, device=device).expand(P)
    while len(run):
        window = (it % _WINDOW == 0) & (it > 0)
        stalled |= window & (f_ref - f <= _FTOL * f.abs().clamp_min(1.0))
        f_ref = torch.where(window | (it == 0), f, f_ref)
        converged = (gmax <= gtol[run]) | stalled | ~torch.isfinite(f)
        stop = converged | (it >= cap[run])
        if bool(stop.any()):
            done = run[stop]
            out.theta[done], out.loss[done], out.iterations[done] = theta[stop], f[stop], it[stop]
            out.converged[done] = converged[stop] & torch.isfinite(f[stop])
            if on_done is not None:
                on_done(done)
            keep = (~stop).nonzero().squeeze(1)
            run, theta, f, g, gmax, it, f_ref, stalled, fresh = (
                t[keep] for t in (run, theta, f, g, gmax, it, f_ref, stalled, fresh))
            hist.keep(keep)
            if not len(run):
                continue
        d = hist.direction(run, g, precondition)
        gd = _dot(g, d)
        uphill = ~(gd < 0)
        if bool(uphill.any()):  # a stale history: start again from the preconditioned gradient
            hist.forget(uphill)
            d[uphill] = -precondition(run[uphill], g[uphill])
            gd = _dot(g, d)
            fresh = fresh | uphill
        step = torch.ones(len(run), dtype=torch.float64, device=device)
        new_theta, new_f, new_g, new_gmax = theta.clone(), f.clone(), g.clone(), gmax.clone()
        moved = torch.zeros(len(run), dtype=torch.bool, device=device)
        search = torch.arange(len(run), device=device)
        for _ in range(_MAX_BACKTRACKS):
            trial = theta[search] + _bcast(step[search], theta) * d[search]
            ft, gt, gmt = objective(run[search], trial)
            armijo = ft <= f[search] + _ARMIJO * step[search] * gd[search]
            # Hager and Zhang's approximate Wolfe test: where the loss no longer resolves the decrease, the slope
            # (accurate long after the loss is not) says the step went most of the way to the line's minimiser
            slope_t = _dot(gt, d[search])
            wolfe = ((slope_t >= _SIGMA * gd[search]) & (slope_t <= (2 * _DELTA - 1) * gd[search])
                     & (ft <= f[search] + _NOISE * f[search].abs()))
            ok = torch.isfinite(ft) & (armijo | wolfe)
            took = search[ok]
            new_theta[took], new_f[took], new_g[took], new_gmax[took] = trial[ok], ft[ok], gt[ok], gmt[ok]
            moved[took] = True
            search, ft, t = search[~ok], ft[~ok], step[search[~ok]]
            # minimiser of the quadratic through f(0), f'(0) and f(t), kept within [_SHRINK t, t/2]
            slope = gd[search]
            quad = -slope * t * t / (2 * (ft - f[search] - slope * t))
            quad = torch.where(torch.isfinite(quad), quad, t * _SHRINK)
            step[search] = torch.minimum(torch.maximum(quad, t * _SHRINK), t / 2)
            # a step whose predicted decrease the loss cannot resolve is not tried: the problem is at float32
            # resolution along this direction (it stays put and is marked stalled below)
            search = search[-step[search] * slope > _RESOLUTION * f[search].abs().clamp_min(1.0)]
            if not len(search):
                break
        # no step length lowers the loss: a history-built direction is dropped (the next one is the preconditioned
        # gradient); when even that fails, the problem is at float32 resolution
        stalled |= ~moved & fresh
        hist.forget(~moved)
        fresh = ~moved
        s, yv = new_theta - theta, new_g - g
        sy = _dot(s, yv)
        hist.push(s, yv, sy, _dot(yv, precondition(run, yv)))
        theta, f, g, gmax = new_theta, new_f, new_g, new_gmax
        it += moved.long()
    return out
