"""Several label sets over one extraction: extra tasks, control tasks and selectivity, regression probes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import linprobe as lp
from linprobe.fit.tasks import control_task, labels, shuffled_labels, values

FAST = {"progress": False, "plot": False}


def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def digits():
    splits = lp.standard_splits("digits", seed=0)
    return splits["train"], splits["valid"], splits["test"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def test_extra_label_sets_cost_no_forward_and_equal_separate_runs(digits) -> None:
    train, valid, test = digits
    model = _model()
    calls = _count_forwards(model)
    parity = {name: d.y % 2 for name, d in zip(("train", "valid", "test"), digits)}
    together = lp.probe(model, train, valid, test, tasks={"parity": labels(**parity), "small": lambda y: y < 3},
                        **FAST)
    one_run = len(calls)
    assert one_run > 0 and together.tasks == ["main", "parity", "small"]
    alone = {"parity": lp.probe(model, (train.x, parity["train"]), (valid.x, parity["valid"]),
                                test=(test.x, parity["test"]), **FAST),
             "small": lp.probe(model, (train.x, train.y < 3), (valid.x, valid.y < 3), test=(test.x, test.y < 3),
                               **FAST)}
    assert len(calls) == 3 * one_run  # each separate run extracts again; the tasks added none
    for task, result in alone.items():
        for layer in result.names:
            for split in ("train", "valid", "test"):
                assert together.value(layer, split, task=task) == result.value(layer, split)
            assert together.value(layer, "valid", "l2", task=task) == result.value(layer, "valid", "l2")
    assert together.meta["tasks"]["small"]["classes"] == [0, 1]


def test_a_new_label_set_reuses_the_cached_features(tmp_path, digits) -> None:
    train, valid, _ = digits
    model = _model()
    lp.probe(model, train, valid, cache_dir=tmp_path, **FAST)
    calls = _count_forwards(model)
    again = lp.probe(model, (train.x, train.y % 3), (valid.x, valid.y % 3), cache_dir=tmp_path, **FAST)
    assert calls == []  # the same inputs, other labels: read back, no forward pass
    fresh = lp.probe(model, (train.x, train.y % 3), (valid.x, valid.y % 3), **FAST)
    assert [r.value for r in again.rows] == [r.value for r in fresh.rows]


def _token_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of 8 token ids from a vocabulary of 40; each token's label is a fixed function of its id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, 8), generator=g)
    return ids, (ids * 7 % 3)


class _TwoViews(nn.Module):
    """``identity``: a one-hot of the token id (it can memorise any function of the type); ``structure``: only the
    task's label, noisily (it carries the task and nothing else)."""

    def __init__(self) -> None:
        super().__init__()
        self.identity, self.structure = nn.Identity(), nn.Identity()

    def forward(self, ids: torch.Tensor) -> None:
        self.identity(nn.functional.one_hot(ids, 40).float())
        g = torch.Generator().manual_seed(int(ids.sum()))
        self.structure(nn.functional.one_hot(ids * 7 % 3, 3).float() + 0.3 * torch.randn(*ids.shape, 3, generator=g))


def test_control_task_selectivity_is_low_where_a_layer_memorises_and_high_where_it_holds_the_task() -> None:
    (xt, yt), (xv, yv), (xs, ys) = _token_data(60, 0), _token_data(30, 1), _token_data(30, 2)
    result = lp.probe(_TwoViews(), (xt, yt), (xv, yv), test=(xs, ys), layers=["identity", "structure"],
                      tasks={"control": control_task(), "shuffled": shuffled_labels()}, **FAST)
    task = result.errors("test")
    control = result.errors("test", task="control")
    selectivity = result.errors("test", "selectivity", task="control")
    assert task["identity"] < 0.02 and control["identity"] < 0.1  # the one-hot layer learns any labelling of types
    assert selectivity["identity"] < 0.1
    assert task["structure"] < 0.1 and control["structure"] > 0.4  # it cannot tell the random per-type labels
    assert selectivity["structure"] > 0.35
    assert result.errors("test", "selectivity", task="shuffled")["structure"] > 0.4
    assert result.meta["tasks"]["control"]["baseline_of"] == "main"


def test_control_labels_are_fixed_per_type_across_splits_and_follow_the_class_distribution() -> None:
    from linprobe.data.inputs import Split
    from linprobe.fit.tasks import resolve

    ids = torch.arange(4000).remainder(500).view(500, 8)  # 500 types, each in several sequences
    y = (torch.arange(4000) % 10 < 7).long().view(500, 8)  # 70% of the tokens are class 1
    splits = {"train": Split.of((ids[:300], y[:300])), "valid": Split.of((ids[300:], y[300:]))}
    one = resolve({"c": control_task(seed=3)}, splits, 256)[1]
    two = resolve({"c": control_task(seed=3)}, splits, 256)[1]
    other = resolve({"c": control_task(seed=4)}, splits, 256)[1]
    assert all(torch.equal(one.splits[s], two.splits[s]) for s in splits)
    assert not torch.equal(one.splits["train"], other.splits["train"])
    label_of: dict[int, int] = {}
    for split in splits:
        for token, label in zip(ids[:300].flatten() if split == "train" else ids[300:].flatten(),
                                one.splits[split].tolist()):
            assert label_of.setdefault(int(token), label) == label  # one label per type, in every split
    share = np.mean(list(label_of.values()))
    assert abs(share - 0.7) < 0.08  # drawn with the task's 30/70 class distribution


def test_regression_probe_matches_scikit_learn_ridge(digits) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    train, valid, test = digits
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 2, generator=g)
    target = {name: d.x.flatten(1) @ w + torch.randn(len(d.x), 2, generator=g) for name, d in
              zip(("train", "valid", "test"), digits)}
    result = lp.probe(nn.Flatten(), train, valid, test, layers="all", tasks={"y": values(**target)}, **FAST)
    probe = result.banks["y"]["input"]
    std = lambda x: ((x.flatten(1) - probe.mean) / probe.std).numpy()  # linprobe's standardisation
    ridge = Ridge(alpha=probe.l2 * len(train.x)).fit(std(train.x), target["train"].numpy())
    for name, data in zip(("train", "valid", "test"), digits):
        expected = r2_score(target[name].numpy(), ridge.predict(std(data.x)))
        assert result.value("input", name, "r2", task="y") == pytest.approx(expected, abs=1e-4)
    lo, hi = result.interval("input", "test", "r2", task="y")
    assert lo < result.value("input", "test", "r2", task="y") < hi
    assert result.value("input", "test", "r2", task="y") > 0.5


def test_bad_label_sets_are_refused_before_any_forward(digits) -> None:
    train, valid, _ = digits
    model = _model()
    calls = _count_forwards(model)
    with pytest.raises(ValueError, match="task 'short' has 10 targets for the train split"):
        lp.probe(model, train, valid, tasks={"short": labels(train.y[:10], valid.y)}, **FAST)
    with pytest.raises(ValueError, match="task 'v': the valid targets hold NaN"):
        lp.probe(model, train, valid, tasks={"v": values(train.y.float(), valid.y.float() / 0)}, **FAST)
    with pytest.raises(ValueError, match="built from task 'nope'"):
        lp.probe(model, train, valid, tasks={"c": control_task("nope")}, **FAST)
    with pytest.raises(ValueError, match="the task name 'main' is the data's own labels"):
        lp.probe(model, train, valid, tasks={"main": lambda y: y}, **FAST)
    with pytest.raises(ValueError, match="task 'one': the train split holds a single class"):
        lp.probe(model, train, valid, tasks={"one": lambda y: y * 0}, **FAST)
    assert calls == []


def test_predictions_give_paired_comparisons_that_survive_a_reload(tmp_path, digits) -> None:
    train, valid, test = digits
    result = lp.probe(_model(), train, valid, test, cache_dir=tmp_path, **FAST)
    first, last = result.names[0], result.names[-1]
    assert result.correct(first).mean() == pytest.approx(1 - result.value(first, "test"))
    same = lp.paired_difference(torch.from_numpy(result.correct(first)), torch.from_numpy(result.correct(first)))
    assert not same.differ and same.difference == 0 and same.p_value == 1.0
    apart = lp.paired_difference(torch.from_numpy(result.correct(first)), torch.from_numpy(result.correct(last)))
    assert apart.difference == pytest.approx(result.value(last, "test") - result.value(first, "test"))
    again = lp.ProbeResult.load(tmp_path)
    assert np.array_equal(again.correct(last, "valid"), result.correct(last, "valid"))


def test_a_probe_that_memorises_train_is_named(caplog) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(260, 200, generator=g), torch.randint(0, 2, (260,), generator=g)
    x[:, 0] += 1.5 * y  # one weak real feature among 199 of noise: 200 features, 100 training samples
    with caplog.at_level("WARNING", logger="linprobe"):
        result = lp.probe(nn.Identity(), (x[:100], y[:100]), (x[100:180], y[100:180]), layers="input",
                          l2_path=(1e-4,), **FAST)
    assert result.value("input", "train") == 0 and result.value("input", "valid") > 0.1
    assert "input" in result.meta["overfit"] and "overfit" in caplog.text


def test_without_bootstrap_only_the_closed_form_intervals_are_computed(digits) -> None:
    train, valid, _ = digits
    full = lp.probe(nn.Flatten(), train, valid, **FAST)
    quick = lp.probe(nn.Flatten(), train, valid, bootstrap=False, **FAST)
    assert [r.value for r in quick.rows] == [r.value for r in full.rows]  # the same numbers
    assert quick.interval("input", "valid") == full.interval("input", "valid")  # Wilson's, closed form
    assert full.row("input", "valid", "balanced_error").lo is not None
    assert quick.row("input", "valid", "balanced_error").lo is None
