"""Uncertainty of a probe's numbers: confidence intervals, a seeded bootstrap and paired/unpaired difference tests.

A probe is scored on a finite evaluation set, so every error, F1 or R^2 it reports is an estimate; these functions say
how wide the noise around it is, so that two layers, checkpoints or models are only called different when they differ
beyond that noise. Everything is vectorised torch (numpy-free at runtime, no scipy) and computed in float64.

The bootstrap shares one set of draws between all metrics: :func:`resample_weights` yields ``(b, n)`` matrices of
resampling counts (a multinomial draw per row, i.e. how often each evaluated sample appears in that replicate), and a
*weighted statistic* maps such a matrix to ``(b,)`` values. :func:`bootstrap_intervals` feeds the same matrices to every
statistic it is given, so ``{metric: (lo, hi)}`` comes from one shared set of replicates, and the matrices are produced
in chunks of rows so that memory stays at about ``max_elements`` floats whatever ``samples`` and ``n`` are.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor

__all__ = [
    "PairedTest",
    "WeightedStat",
    "auroc",
    "balanced_accuracy",
    "bootstrap_interval",
    "bootstrap_intervals",
    "classification_stats",
    "differs_beyond_noise",
    "macro_f1",
    "mse",
    "paired_difference",
    "r2_score",
    "regression_stats",
    "resample_weights",
    "weighted_auroc",
    "weighted_balanced_error",
    "weighted_error",
    "weighted_macro_f1",
    "weighted_mse",
    "weighted_r2",
    "wilson_interval",
]

#: A statistic of resampling weights: ``(b, n)`` non-negative per-sample weights in, ``(b,)`` values out.
WeightedStat = Callable[[Tensor], Tensor]

_F = torch.float64


def _z(level: float) -> float:
    """Two-sided standard-normal quantile for a confidence ``level``, so intervals and tests share one critical value."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


# --------------------------------------------------------------------------------------------------------------------
# Binomial proportions
# --------------------------------------------------------------------------------------------------------------------

def wilson_interval(errors: int | Tensor, n: int | Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """Wilson score interval ``(lo, hi)`` for the proportion ``errors / n`` (elementwise, float64), because unlike the
    normal (Wald) interval it keeps its coverage near 0 and 1 errors, where good probes live; ``n == 0`` gives (0, 1)."""
    e = torch.as_tensor(errors, dtype=_F)
    m = torch.as_tensor(n, dtype=_F, device=e.device)
    if bool((e < 0).any()) or bool((e > m).any()):
        raise ValueError("errors must lie between 0 and n")
    z = _z(level)
    z2 = z * z
    m1 = m.clamp_min(1.0)
    p = e / m1
    denom = 1.0 + z2 / m1
    center = (p + z2 / (2.0 * m1)) / denom
    half = z * torch.sqrt(p * (1.0 - p) / m1 + z2 / (4.0 * m1 * m1)) / denom
    lo = torch.where(e <= 0, torch.zeros_like(center), (center - half).clamp(0.0, 1.0))
    hi = torch.where(e >= m, torch.ones_like(center), (center + half).clamp(0.0, 1.0))
    empty = m <= 0
    return torch.where(empty, 0.0, lo), torch.where(empty, 1.0, hi)


def _binom_half_two_sided(k: int, d: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``d`` fair coin flips (``min(1, 2 P(X <= min(k, d-k)))``), summed
    in log space with lgamma so that thousands of discordant pairs neither overflow nor underflow."""
    if d <= 0:
        return 1.0
    k = min(k, d - k)
    i = torch.arange(k + 1, dtype=_F)
    log_pmf = math.lgamma(d + 1) - torch.lgamma(i + 1) - torch.lgamma(d - i + 1) - d * math.log(2.0)
    return min(1.0, 2.0 * math.exp(torch.logsumexp(log_pmf, 0).item()))


@dataclass(frozen=True)
class PairedTest:
    """Outcome of comparing two classifiers on the same samples: error difference ``b - a``, its interval and McNemar."""

    difference: float  #: error rate of b minus error rate of a
    lo: float  #: lower end of the interval for ``difference`` (Newcombe's paired score interval, method 10)
    hi: float  #: upper end
    p_value: float  #: exact two-sided McNemar p-value from the discordant counts
    differ: bool  #: True only when ``p_value < 1 - level``
    n: int  #: number of paired samples
    only_a_correct: int  #: samples a got right and b got wrong
    only_b_correct: int  #: samples b got right and a got wrong


def paired_difference(correct_a: Tensor, correct_b: Tensor, level: float = 0.95) -> PairedTest:
    """Whether two layers/checkpoints/models evaluated on the same samples differ beyond noise: the exact McNemar test
    on the discordant samples (only those carry information about the difference) plus Newcombe's score interval."""
    a = torch.as_tensor(correct_a).reshape(-1).bool()
    b = torch.as_tensor(correct_b).reshape(-1).bool()
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must have the same length, got {a.numel()} and {b.numel()}")
    n = a.numel()
    both = int((a & b).sum())
    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    neither = n - both - only_a - only_b
    p_value = _binom_half_two_sided(only_a, only_a + only_b)
    if n == 0:
        return PairedTest(0.0, -1.0, 1.0, 1.0, False, 0, 0, 0)
    # error rates: a wrong = only_b + neither, b wrong = only_a + neither
    err_a, err_b = (only_b + neither) / n, (only_a + neither) / n
    lo_a, hi_a = (float(t) for t in wilson_interval(only_b + neither, n, level))
    lo_b, hi_b = (float(t) for t in wilson_interval(only_a + neither, n, level))
    # Newcombe (1998) method 10: Wilson intervals of the two marginals, combined with their correlation phi
    # (2x2 table on errors: both wrong = neither, both right = both).
    den = (only_a + neither) * (both + only_b) * (only_b + neither) * (both + only_a)
    phi = (neither * both - only_a * only_b) / math.sqrt(den) if den > 0 else 0.0
    d = err_b - err_a
    below = math.sqrt(max(0.0, (err_b - lo_b) ** 2 - 2 * phi * (err_b - lo_b) * (hi_a - err_a) + (hi_a - err_a) ** 2))
    above = math.sqrt(max(0.0, (hi_b - err_b) ** 2 - 2 * phi * (hi_b - err_b) * (err_a - lo_a) + (err_a - lo_a) ** 2))
    return PairedTest(d, max(-1.0, d - below), min(1.0, d + above), p_value, bool(p_value < 1.0 - level),
                      n, only_a, only_b)


def differs_beyond_noise(err_a: float, err_b: float, n: int | tuple[int, int], level: float = 0.95) -> bool:
    """Whether two error rates measured on independent sets of ``n`` samples (or ``(n_a, n_b)``) differ beyond noise,
    by the pooled two-proportion z-test at ``1 - level``, for callers that only have a results table's numbers."""
    n_a, n_b = (n, n) if isinstance(n, int) else n
    if n_a <= 0 or n_b <= 0:
        return False
    pooled = (err_a * n_a + err_b * n_b) / (n_a + n_b)
    var = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b)
    if var <= 0.0:  # both 0 or both 1: identical
        return False
    return abs(err_b - err_a) / math.sqrt(var) > _z(level)


# --------------------------------------------------------------------------------------------------------------------
# Weighted statistics: (b, n) resampling weights -> (b,) values; the point metrics are the all-ones case
# --------------------------------------------------------------------------------------------------------------------

def _labels(t: Tensor | object) -> Tensor:
    """A 1-D int64 label tensor, so bincount/index_add accept whatever integer type the caller has."""
    return torch.as_tensor(t).reshape(-1).long()


def _classes(pred: Tensor, y: Tensor, num_classes: int | None) -> int:
    """Number of class slots: the caller's ``num_classes`` or one past the largest label seen."""
    if pred.shape != y.shape:
        raise ValueError(f"pred and y must have the same length, got {pred.numel()} and {y.numel()}")
    seen = int(torch.maximum(pred.max(), y.max())) + 1 if y.numel() else 1
    return max(seen, num_classes or 0)


def _per_class(w: Tensor, idx: Tensor, c: int) -> Tensor:
    """Sum of each row's weights per class: ``(b, n)`` weights, ``(n,)`` class ids -> ``(b, c)``, O(b n) whatever c."""
    return torch.zeros(w.shape[0], c, dtype=_F, device=w.device).index_add_(1, idx, w)


def weighted_error(wrong: Tensor) -> WeightedStat:
    """Weighted mean of per-sample wrong flags (top-1, top-5 or any 0/1 loss), the plain error under resampling."""
    v = torch.as_tensor(wrong).reshape(-1).to(_F)

    def stat(w: Tensor) -> Tensor:
        w = w.to(v.device, _F)
        return (w @ v) / w.sum(1)
    return stat


def weighted_balanced_error(pred: Tensor, y: Tensor, num_classes: int | None = None) -> WeightedStat:
    """Weighted mean per-class error over the classes present in each replicate, so rare classes weigh as much."""
    pred, y = _labels(pred), _labels(y).to(torch.as_tensor(pred).device)
    c = _classes(pred, y, num_classes)
    wrong = (pred != y).to(_F)

    def stat(w: Tensor) -> Tensor:
        w = w.to(y.device, _F)
        count = _per_class(w, y, c)
        err = _per_class(w * wrong, y, c)
        present = count > 0
        per = torch.where(present, err / count.clamp_min(1e-300), 0.0)
        return per.sum(1) / present.sum(1)
    return stat


def weighted_macro_f1(pred: Tensor, y: Tensor, num_classes: int | None = None) -> WeightedStat:
    """Weighted macro-F1 over the classes present in the labels or predictions of each replicate (sklearn's set)."""
    pred, y = _labels(pred), _labels(y).to(torch.as_tensor(pred).device)
    c = _classes(pred, y, num_classes)
    hit = (pred == y).to(_F)

    def stat(w: Tensor) -> Tensor:
        w = w.to(y.device, _F)
        true = _per_class(w, y, c)
        said = _per_class(w, pred, c)
        tp = _per_class(w * hit, y, c)
        support = true + said
        present = support > 0
        f1 = torch.where(present, 2.0 * tp / support.clamp_min(1e-300), 0.0)
        return f1.sum(1) / present.sum(1)
    return stat


def weighted_auroc(scores: Tensor, y: Tensor) -> WeightedStat:
    """Weighted binary AUROC as the Mann-Whitney statistic (ties count one half), NaN for a one-class replicate."""
    s = torch.as_tensor(scores).reshape(-1).to(_F)
    pos = _labels(y).to(s.device)
    if bool(((pos != 0) & (pos != 1)).any()):
        raise ValueError("auroc needs binary labels 0/1")
    pos = pos.to(_F)
    neg = 1.0 - pos
    _, group = torch.unique(s, sorted=True, return_inverse=True)
    g = int(group.max()) + 1 if group.numel() else 1

    def stat(w: Tensor) -> Tensor:
        w = w.to(s.device, _F)
        p = _per_class(w * pos, group, g)  # positive weight at each distinct score, ascending
        q = _per_class(w * neg, group, g)
        below = q.cumsum(1) - q  # negative weight strictly below each score
        num = (p * (below + 0.5 * q)).sum(1)
        return num / (p.sum(1) * q.sum(1))  # 0/0 -> NaN when a replicate lacks a class
    return stat


def _targets(pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Predictions and targets as float64 ``(n, K)`` matrices, so single- and multi-output regression share code."""
    p = torch.as_tensor(pred).to(_F)
    t = torch.as_tensor(y).to(_F).to(p.device)
    p, t = (p[:, None], t[:, None]) if p.dim() == 1 else (p, t)
    if p.shape != t.reshape(p.shape[0], -1).shape:
        raise ValueError(f"pred and y shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    return p, t.reshape(p.shape)


def weighted_r2(pred: Tensor, y: Tensor) -> WeightedStat:
    """Weighted R^2 averaged uniformly over outputs, with sklearn's rule for constant targets (1 if exact, else 0)."""
    p, t = _targets(pred, y)
    centred = t - t.mean(0)  # shifting by a constant keeps ss_tot and avoids cancellation in its one-pass form
    res = (t - p) ** 2

    def stat(w: Tensor) -> Tensor:
        w = w.to(t.device, _F)
        total = w.sum(1, keepdim=True)
        ss_res = w @ res
        s1 = w @ centred
        ss_tot = (w @ centred**2 - s1 * s1 / total).clamp_min(0.0)
        r2 = torch.where(ss_tot > 0, 1.0 - ss_res / ss_tot.clamp_min(1e-300), (ss_res == 0).to(_F))
        return r2.mean(1)
    return stat


def weighted_mse(pred: Tensor, y: Tensor) -> WeightedStat:
    """Weighted mean squared error averaged uniformly over outputs (sklearn's ``mean_squared_error``)."""
    p, t = _targets(pred, y)
    res = ((t - p) ** 2).mean(1)

    def stat(w: Tensor) -> Tensor:
        w = w.to(t.device, _F)
        return (w @ res) / w.sum(1)
    return stat


def classification_stats(pred: Tensor, y: Tensor, num_classes: int | None = None,
                         scores: Tensor | None = None) -> dict[str, WeightedStat]:
    """Weighted statistics of a classifier's evaluation: ``error``, ``balanced_error``, ``macro_f1`` and, given
    binary-task ``scores`` for class 1, ``auroc``; merge in ``{"top5_error": weighted_error(...)}`` for more."""
    pred, y = _labels(pred), _labels(y)
    out = {"error": weighted_error(pred != y.to(pred.device)),
           "balanced_error": weighted_balanced_error(pred, y, num_classes),
           "macro_f1": weighted_macro_f1(pred, y, num_classes)}
    if scores is not None:
        out["auroc"] = weighted_auroc(scores, y)
    return out


def regression_stats(pred: Tensor, y: Tensor) -> dict[str, WeightedStat]:
    """Weighted statistics of a regression probe's evaluation: ``r2`` and ``mse``, uniform over outputs."""
    return {"r2": weighted_r2(pred, y), "mse": weighted_mse(pred, y)}


def _point(stat: WeightedStat, n: int) -> float:
    """A weighted statistic at unit weights, i.e. the plain metric on the evaluated samples."""
    return float(stat(torch.ones(1, n, dtype=_F))[0])


# --------------------------------------------------------------------------------------------------------------------
# Point metrics (unweighted), equal to scikit-learn's
# --------------------------------------------------------------------------------------------------------------------

def auroc(scores: Tensor, y: Tensor) -> float:
    """Binary AUROC by ranks with average ties (Mann-Whitney U), equal to ``sklearn.metrics.roc_auc_score``."""
    lab = _labels(y)
    if lab.numel() == 0 or bool((lab == lab[0]).all()):
        raise ValueError("auroc is undefined when y holds only one class")
    return _point(weighted_auroc(scores, lab), lab.numel())


def macro_f1(pred: Tensor, y: Tensor, num_classes: int | None = None) -> float:
    """Macro-F1 over the classes present in ``y`` or ``pred`` with 0 for 0/0, equal to sklearn's
    ``f1_score(y, pred, average="macro")``."""
    return _point(weighted_macro_f1(pred, y, num_classes), _labels(y).numel())


def balanced_accuracy(pred: Tensor, y: Tensor, num_classes: int | None = None) -> float:
    """Mean per-class recall over the classes present in ``y``, equal to sklearn's ``balanced_accuracy_score``."""
    return 1.0 - _point(weighted_balanced_error(pred, y, num_classes), _labels(y).numel())


def r2_score(pred: Tensor, y: Tensor) -> float:
    """Coefficient of determination averaged uniformly over outputs, equal to ``sklearn.metrics.r2_score(y, pred)``."""
    return _point(weighted_r2(pred, y), torch.as_tensor(pred).shape[0])


def mse(pred: Tensor, y: Tensor) -> float:
    """Mean squared error over all samples and outputs, equal to ``sklearn.metrics.mean_squared_error(y, pred)``."""
    return _point(weighted_mse(pred, y), torch.as_tensor(pred).shape[0])


# --------------------------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------------------------

def resample_weights(n: int, samples: int = 1000, seed: int = 0, max_elements: int = 1 << 22,
                     counts: Tensor | None = None) -> Iterator[Tensor]:
    """Yield float64 ``(b, n)`` resampling-count matrices, ``samples`` rows in all, from a private seeded CPU generator
    so the draws never touch or depend on the global RNG, in chunks of at most ``max_elements`` counts for memory.

    With ``counts`` (``(n,)`` whole numbers), the ``n`` entries are cells holding that many identical samples each
    (e.g. the (prediction, label) pairs of a classifier: at most classes^2 cells, however many samples): each row then
    gives every cell an independent Poisson count of mean its size (the Poisson bootstrap, Hanley & MacGibbon 2006:
    the per-sample bootstrap's distribution to first order, checked by a test), at a cost of ``b * n`` instead of
    ``b * counts.sum()``."""
    if n <= 0 or samples <= 0:
        raise ValueError(f"need n > 0 and samples > 0, got n={n}, samples={samples}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = max(1, max_elements // n)
    for start in range(0, samples, rows):
        b = min(rows, samples - start)
        if counts is not None:
            yield torch.poisson(torch.as_tensor(counts, dtype=_F).expand(b, n).contiguous(), generator=gen)
            continue
        idx = torch.randint(0, n, (b, n), generator=gen)  # each row: n draws with replacement
        yield torch.zeros(b, n, dtype=_F).scatter_add_(1, idx, torch.ones(b, n, dtype=_F))


def bootstrap_intervals(stats: Mapping[str, WeightedStat], n: int, level: float = 0.95, samples: int = 1000,
                        seed: int = 0, max_elements: int = 1 << 22,
                        counts: Tensor | None = None) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap interval ``{name: (lo, hi)}`` of every weighted statistic over the same seeded replicates,
    so that all metrics of one evaluation share one set of draws; replicates where a statistic is NaN are skipped.
    ``counts``: the ``n`` entries are cells of that many samples each (see :func:`resample_weights`)."""
    _z(level)  # validates level
    values: dict[str, list[Tensor]] = {name: [] for name in stats}
    for w in resample_weights(n, samples, seed, max_elements, counts):
        for name, stat in stats.items():
            v = stat(w)
            if v.shape != (w.shape[0],):
                raise ValueError(f"statistic {name!r} returned shape {tuple(v.shape)}, expected ({w.shape[0]},)")
            values[name].append(v.detach().to("cpu", _F))
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=_F)
    out = {}
    for name, parts in values.items():
        lo, hi = torch.nanquantile(torch.cat(parts), q).tolist()
        out[name] = (lo, hi)
    return out


def bootstrap_interval(stat: WeightedStat, n: int, level: float = 0.95, samples: int = 1000,
                       seed: int = 0, max_elements: int = 1 << 22) -> tuple[float, float]:
    """Percentile-bootstrap interval ``(lo, hi)`` of one weighted statistic, seeded like :func:`bootstrap_intervals`."""
    return bootstrap_intervals({"stat": stat}, n, level, samples, seed, max_elements)["stat"]
