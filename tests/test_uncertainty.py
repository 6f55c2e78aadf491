"""linprobe.fit.uncertainty: point metrics equal scikit-learn's, intervals have their textbook values and coverage, the
bootstrap is seeded independently of the global RNG, and the paired test never calls one sample a difference."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import one_thread

from linprobe.fit.uncertainty import (
    PairedTest,
    auroc,
    balanced_accuracy,
    bootstrap_interval,
    bootstrap_intervals,
    classification_stats,
    differs_beyond_noise,
    macro_f1,
    mse,
    paired_difference,
    r2_score,
    regression_stats,
    resample_weights,
    weighted_balanced_error,
    weighted_error,
    wilson_interval,
)

sk = pytest.importorskip("sklearn.metrics")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- point metrics against scikit-learn


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed: int) -> None:
    g = _gen(seed)
    n = 300
    y = torch.randint(0, 2, (n,), generator=g)
    # coarse scores: many ties, some across classes
    scores = torch.randint(0, 12, (n,), generator=g).double() / 4 + 0.3 * y
    assert auroc(scores, y) == pytest.approx(sk.roc_auc_score(y.numpy(), scores.numpy()), abs=1e-6)
    cont = torch.randn(n, generator=g, dtype=torch.float64) + y
    assert auroc(cont, y) == pytest.approx(sk.roc_auc_score(y.numpy(), cont.numpy()), abs=1e-6)


def test_auroc_edge_cases() -> None:
    assert auroc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 1])) == 0.5  # all tied
    assert auroc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    with pytest.raises(ValueError):
        auroc(torch.tensor([0.1, 0.9]), torch.tensor([1, 1]))
    with pytest.raises(ValueError):
        auroc(torch.tensor([0.1, 0.9]), torch.tensor([0, 2]))


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn_with_missing_classes(seed: int) -> None:
    g = _gen(seed)
    n, c = 250, 7
    y = torch.randint(0, c, (n,), generator=g)
    y[y == 3] = 4  # class 3 absent from y
    pred = torch.where(torch.rand(n, generator=g) < 0.6, y, torch.randint(0, c, (n,), generator=g))
    pred[pred == 5] = 6  # class 5 absent from pred (but present in y)
    yn, pn = y.numpy(), pred.numpy()
    assert macro_f1(pred, y, num_classes=10) == pytest.approx(sk.f1_score(yn, pn, average="macro"), abs=1e-6)
    assert macro_f1(pred, y) == pytest.approx(sk.f1_score(yn, pn, average="macro"), abs=1e-6)
    with pytest.warns(UserWarning):  # sklearn warns that pred holds class 3, which y lacks
        expected = sk.balanced_accuracy_score(yn, pn)
    assert balanced_accuracy(pred, y, num_classes=10) == pytest.approx(expected, abs=1e-6)


def test_macro_f1_class_only_in_pred_counts_as_zero() -> None:
    y = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 only predicted: F1 0, still averaged (sklearn's convention)
    assert macro_f1(pred, y) == pytest.approx(sk.f1_score(y.numpy(), pred.numpy(), average="macro"), abs=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_regression_metrics_match_sklearn(k: int) -> None:
    g = _gen(k)
    n = 120
    y = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.arange(1, k + 1)
    pred = y + 0.7 * torch.randn(n, k, generator=g, dtype=torch.float64)
    if k == 1:
        y, pred = y[:, 0], pred[:, 0]
    assert r2_score(pred, y) == pytest.approx(sk.r2_score(y.numpy(), pred.numpy()), abs=1e-6)
    assert mse(pred, y) == pytest.approx(sk.mean_squared_error(y.numpy(), pred.numpy()), abs=1e-6)


def test_r2_constant_target_follows_sklearn() -> None:
    y = torch.stack([torch.full((5,), 2.0), torch.arange(5.0)], 1)
    pred = y.clone()
    assert r2_score(pred, y) == pytest.approx(sk.r2_score(y.numpy(), pred.numpy()))  # constant, exact: 1
    pred[0, 0] = 3.0
    assert r2_score(pred, y) == pytest.approx(sk.r2_score(y.numpy(), pred.numpy()))  # constant, inexact: 0


# ---------------------------------------------------------------- Wilson interval


def test_wilson_textbook_values() -> None:
    # z = 1.959964 at 95%, z^2 = 3.841459. Wilson: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).
    # 0 of 10: lo = 0, hi = (z^2/n) / (1 + z^2/n) = 0.3841459 / 1.3841459 = 0.277533
    lo, hi = wilson_interval(0, 10)
    assert float(lo) == 0.0 and float(hi) == pytest.approx(0.277533, abs=1e-6)
    # 5 of 10: centre 0.5, half = 1.959964 * sqrt(0.025 + 0.0096036) / 1.3841459 = 0.263407 -> (0.236593, 0.763407)
    lo, hi = wilson_interval(5, 10)
    assert (float(lo), float(hi)) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    # 81 of 263: Newcombe (1998, Stat. Med. 17:857), Table II: 0.2553 to 0.3662
    lo, hi = wilson_interval(81, 263)
    assert (float(lo), float(hi)) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    # 10 of 10 mirrors 0 of 10; n = 0 says nothing
    lo, hi = wilson_interval(10, 10)
    assert float(hi) == 1.0 and float(lo) == pytest.approx(1 - 0.277533, abs=1e-6)
    assert [float(t) for t in wilson_interval(0, 0)] == [0.0, 1.0]


def test_wilson_vectorised_and_level() -> None:
    lo, hi = wilson_interval(torch.tensor([0, 5, 81]), torch.tensor([10, 10, 263]))
    assert lo.shape == hi.shape == (3,)
    assert float(hi[2]) == pytest.approx(0.3662, abs=5e-5)
    lo90, hi90 = wilson_interval(81, 263, level=0.90)
    assert float(lo[2]) < float(lo90)
    assert float(hi90) < float(hi[2])
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


# ---------------------------------------------------------------- bootstrap


def _binary_eval(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    scores = torch.randn(n, generator=g) + 1.5 * y
    return (scores > 0.75).long(), y, scores


def test_bootstrap_bit_identical_for_seed_despite_global_rng() -> None:
    pred, y, scores = _binary_eval(500, 0)
    stats = classification_stats(pred, y, scores=scores)
    torch.manual_seed(1)
    first = bootstrap_intervals(stats, 500, samples=200, seed=7)
    torch.manual_seed(12345)
    torch.rand(1000)  # disturb the global RNG
    second = bootstrap_intervals(stats, 500, samples=200, seed=7)
    assert first == second  # exact floats
    other = bootstrap_intervals(stats, 500, samples=200, seed=8)
    assert all(other[k] != first[k] for k in first)
    # the global RNG was neither read nor advanced
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    bootstrap_intervals(stats, 500, samples=50, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_bootstrap_shares_draws_and_chunks() -> None:
    pred, y, scores = _binary_eval(300, 1)
    stats = classification_stats(pred, y, scores=scores)
    together = bootstrap_intervals(stats, 300, samples=300, seed=0)
    # one statistic alone sees the same replicates as inside the dict
    assert bootstrap_interval(stats["auroc"], 300, samples=300, seed=0) == together["auroc"]
    # counts: each replicate resamples n samples
    chunks = list(resample_weights(300, samples=300, seed=0, max_elements=300 * 64))
    assert [w.shape[0] for w in chunks] == [64, 64, 64, 64, 44]
    assert all(torch.equal(w.sum(1), torch.full((w.shape[0],), 300.0, dtype=torch.float64)) for w in chunks)
    # intervals bracket the point estimates
    point = {"error": float((pred != y).double().mean()), "balanced_error": 1 - balanced_accuracy(pred, y),
             "macro_f1": macro_f1(pred, y), "auroc": auroc(scores, y)}
    for name, (lo, hi) in together.items():
        assert lo < point[name] < hi, name


def test_bootstrap_regression_multi_output() -> None:
    g = _gen(2)
    y = torch.randn(400, 3, generator=g, dtype=torch.float64)
    pred = 0.8 * y + 0.3 * torch.randn(400, 3, generator=g, dtype=torch.float64)
    ci = bootstrap_intervals(regression_stats(pred, y), 400, samples=400, seed=0, max_elements=400 * 100)
    assert ci["r2"][0] < r2_score(pred, y) < ci["r2"][1]
    assert ci["mse"][0] < mse(pred, y) < ci["mse"][1]
    assert 0.0 < ci["r2"][1] - ci["r2"][0] < 0.1


def test_bootstrap_rejects_bad_statistic() -> None:
    with pytest.raises(ValueError):
        bootstrap_interval(lambda w: w.sum(), 10, samples=5)


def test_coverage_wilson_and_bootstrap() -> None:
    # 400 simulated evaluations of n = 200 samples, each wrong with probability 0.1 independently of its class,
    # so the true error and the true balanced error are both 0.1
    p, n, sims = 0.1, 200, 400
    g = _gen(2024)
    wrong = torch.rand(sims, n, generator=g) < p
    y = torch.randint(0, 2, (sims, n), generator=g)
    pred = torch.where(wrong, 1 - y, y)
    lo, hi = wilson_interval(wrong.sum(1), n)
    wilson_cover = ((lo <= p) & (p <= hi)).double().mean().item()
    assert 0.93 <= wilson_cover <= 0.975
    boot_cover = 0
    with one_thread():  # 400 small bootstraps: two threads on a busy core run ten times slower
        for i in range(sims):
            blo, bhi = bootstrap_interval(weighted_balanced_error(pred[i], y[i], 2), n, samples=1000, seed=i)
            boot_cover += blo <= p <= bhi
    assert 0.90 <= boot_cover / sims <= 0.98


def test_weighted_error_is_plain_error_at_unit_weights() -> None:
    wrong = torch.tensor([1, 0, 0, 1, 0], dtype=torch.bool)
    assert weighted_error(wrong)(torch.ones(2, 5)).tolist() == [0.4, 0.4]
    w = torch.tensor([[2.0, 1, 1, 0, 1]])
    assert weighted_error(wrong)(w).tolist() == [0.4]


# ---------------------------------------------------------------- differences


def test_paired_one_discordant_sample_is_not_a_difference() -> None:
    a = torch.ones(1000, dtype=torch.bool)
    b = a.clone()
    b[17] = False
    t = paired_difference(a, b)
    assert isinstance(t, PairedTest)
    assert t.differ is False and t.p_value == 1.0
    assert t.difference == pytest.approx(0.001)
    assert t.lo < 0.0 < t.hi
    assert (t.n, t.only_a_correct, t.only_b_correct) == (1000, 1, 0)
    same = paired_difference(a, a)
    assert same.p_value == 1.0 and not same.differ and same.difference == 0.0


def test_paired_thirty_discordant_matches_exact_binomial() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = _gen(5)
    a = torch.rand(1000, generator=g) < 0.8
    b = a.clone()
    flip = torch.nonzero(a).reshape(-1)[:30]
    b[flip] = False  # 30 samples only a gets right, 0 only b gets right
    t = paired_difference(a, b)
    assert (t.only_a_correct, t.only_b_correct) == (30, 0)
    assert t.differ is True
    assert t.p_value == pytest.approx(stats.binomtest(0, 30, 0.5).pvalue, rel=1e-9)
    assert t.p_value == pytest.approx(2 * 0.5**30, rel=1e-9)
    assert t.difference == pytest.approx(0.03) and 0.0 < t.lo < 0.03 < t.hi
    # reversed roles: same p, opposite sign
    r = paired_difference(b, a)
    assert r.p_value == t.p_value and r.difference == pytest.approx(-0.03) and r.hi < 0.0


@pytest.mark.parametrize(("k", "d"), [(3, 10), (5, 10), (40, 100), (480, 1000)])
def test_paired_p_value_matches_scipy(k: int, d: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    a = torch.zeros(d + 5, dtype=torch.bool)
    b = torch.zeros(d + 5, dtype=torch.bool)
    a[:k] = True
    b[k:d] = True
    t = paired_difference(a, b)
    assert t.p_value == pytest.approx(stats.binomtest(k, d, 0.5).pvalue, rel=1e-9)
    assert t.differ == (t.p_value < 0.05)


def test_differs_beyond_noise_unpaired() -> None:
    assert not differs_beyond_noise(0.100, 0.101, 1000)  # one sample of 1000
    assert not differs_beyond_noise(0.0, 0.0, 1000)
    assert differs_beyond_noise(0.10, 0.20, 1000)
    # pooled z for 0.10 vs 0.13 at n = 1000: pooled 0.115, se = sqrt(0.115 * 0.885 * 2 / 1000) = 0.014267, z = 2.103
    assert differs_beyond_noise(0.10, 0.13, 1000)
    assert not differs_beyond_noise(0.10, 0.13, 1000, level=0.99)  # needs z > 2.576
    assert not differs_beyond_noise(0.10, 0.13, (1000, 300))
    assert math.isclose(0.03 / math.sqrt(0.115 * 0.885 * 2 / 1000), 2.1027, abs_tol=1e-3)


def test_bootstrap_over_prediction_label_cells_matches_the_per_sample_bootstrap():
    """Balanced error and macro-F1 depend only on the (prediction, label) pairs: resampling those cells (a Poisson
    count per cell) gives the per-sample bootstrap's intervals, at a cost in cells."""
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 4, (3000,), generator=g)
    pred = torch.where(torch.rand(3000, generator=g) < 0.7, y, torch.randint(0, 4, (3000,), generator=g))
    per_sample = bootstrap_intervals(classification_stats(pred, y, 4), 3000, samples=2000, seed=1)
    cells, counts = (pred * 4 + y).unique(return_counts=True)
    per_cell = bootstrap_intervals(classification_stats(cells // 4, cells % 4, 4), len(cells), samples=2000, seed=1,
                                   counts=counts)
    for name in ("error", "balanced_error", "macro_f1"):
        assert per_cell[name] == pytest.approx(per_sample[name], abs=0.004)  # Monte Carlo noise of 2,000 draws
    again = bootstrap_intervals(classification_stats(cells // 4, cells % 4, 4), len(cells), samples=2000, seed=1,
                                counts=counts)
    assert again == per_cell
