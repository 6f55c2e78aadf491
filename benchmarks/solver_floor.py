"""Solver floor: a probe fit on cached features as a multiple of one pass over the feature matrix.

One pass is a loss-and-gradient evaluation (``X @ W`` then ``G.T @ X``, the least any gradient method
does per iteration); one read of ``X`` (a sum) is shown as the memory floor. Fits: ``fit_logistic`` at
one L2 from zero, ``fit_l2_path`` over the default path with early stop, and scikit-learn's lbfgs at the
same L2 and tolerance.
"""
from __future__ import annotations

import statistics
import warnings

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

import linprobe as lp
from benchmarks.fixtures import Case, convnet, fashion
from benchmarks.timing import Row, seconds
from linprobe.capture.reduce import Standardizer
from linprobe.fit.solvers import fit_l2_path, fit_logistic, sklearn_C

L2, TOL = 1e-3, 1e-5


@torch.no_grad()
def features(case: Case, layer: str, split: str) -> torch.Tensor:
    """One layer's whole-split features (a Flatten-sized layer, no reduction needed)."""
    with lp.Taps(case.model, [layer]) as taps:
        return taps.run(case.splits[split].x)[layer].flatten(1).float()


def one_pass(x: torch.Tensor, repeats: int = 7) -> tuple[float, float]:
    """Median seconds of one read of ``x`` and of one loss-and-gradient evaluation."""
    w = torch.zeros(10, x.shape[1])
    def evaluate() -> None:
        torch.mm(torch.mm(x, w.t()).softmax(1).t(), x)
    read = statistics.median(seconds(x.sum)[1] for _ in range(repeats))
    return read, statistics.median(seconds(evaluate)[1] for _ in range(repeats))


def measure(case: Case, layer: str) -> list[Row]:
    raw = {s: features(case, layer, s) for s in ("train", "valid")}
    std = Standardizer.fit([raw["train"]])
    x, xv = std(raw["train"]), std(raw["valid"])
    y, yv = case.splits["train"].y, case.splits["valid"].y
    read, evaluation = one_pass(x)
    single, t_single = seconds(lambda: fit_logistic(x, y, 10, L2, tol=TOL))
    path, t_path = seconds(lambda: fit_l2_path(x, y, xv, yv, 10, tol=TOL))
    clf = LogisticRegression(C=sklearn_C(L2, len(y)), solver="lbfgs", max_iter=500, tol=TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t_sk = seconds(lambda: clf.fit(x.numpy(), y.numpy()))[1]
    label = f"{case.name} {layer} (N={len(y)}, D={x.shape[1]})"
    per = "one loss+grad pass"
    return [Row("5 solver", label, "one read of X", read, "s", read / evaluation, per),
            Row("5 solver", label, "one loss+grad pass", evaluation, "s", 1.0, per),
            Row("5 solver", label, f"fit_logistic l2={L2:g} ({single.iterations} iterations)", t_single, "s",
                t_single / evaluation, per),
            Row("5 solver", label, f"fit_l2_path, {len(path.path)} L2s ({sum(p.iterations for p in path.path)} "
                "iterations)", t_path, "s", t_path / evaluation, per),
            Row("5 solver", label, f"sklearn lbfgs l2={L2:g} ({int(clf.n_iter_[0])} iterations)", t_sk, "s",
                t_sk / evaluation, per)]


def run(quick: bool) -> tuple[list[Row], str]:
    case = convnet(fashion(300, 100, 100) if quick else fashion(5000, 2000, 100), train_steps=5 if quick else 600)
    return [r for layer in ("fc1_postact", "conv2_postpool") for r in measure(case, layer)], ""
