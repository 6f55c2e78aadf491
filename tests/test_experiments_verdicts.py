"""Verdict rules that can fail: each experiment's checks fed made-up numbers that agree with the paper, contradict
it, or agree only in part (no training, no data)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
from conftest import rippling_result

from linprobe.experiments import deep_mlp, depth, inception, mnist_convnet, resnet, ripple, toy
from linprobe.experiments.report import Check, Summary, compare, significant_steps, standard_error, verdict, with_se
from linprobe.models import MNIST_CONVNET_PROBES
from linprobe.report.results import LayerInfo, ProbeResult


def test_standard_error_and_its_text() -> None:
    assert standard_error(0.1, 1000) == pytest.approx(math.sqrt(0.09 / 1000))
    assert with_se(0.028, 1000) == "2.8% (SE 0.5)"
    assert with_se(0.012, 100_000) == "1.2% (SE 0.03)" and with_se(0.0, 10) == "0.0% (SE 0.0)"
    with pytest.raises(ValueError, match="error rate"):
        standard_error(1.5, 10)
    with pytest.raises(ValueError, match="error rate"):
        standard_error(0.5, 0)


def test_a_difference_counts_only_beyond_two_standard_errors() -> None:
    # on 1000 samples two errors near 10% have a difference SE of about 1.3 points: 2 points is noise, 4 is not
    assert compare(0.10, 0.12, 1000) == 0
    assert compare(0.10, 0.14, 1000) == 1 and compare(0.14, 0.10, 1000) == -1
    assert compare(0.10, 0.12, 100_000) == 1  # more samples, tighter
    errors = {"a": 0.30, "b": 0.20, "c": 0.21, "d": 0.30}
    assert [s[:2] for s in significant_steps(errors, 1000)] == [("c", "d")]
    assert [s[:2] for s in significant_steps(errors, 1000, direction=-1)] == [("a", "b")]
    with pytest.raises(ValueError, match="direction"):
        significant_steps(errors, 1000, direction=0)


def test_verdict_rule() -> None:
    core, other = Check("core", True, "", core=True), Check("other", True, "")
    assert verdict([core, other]) == "reproduced"
    assert verdict([core, Check("other", False, "")]) == "partly"
    assert verdict([Check("core", False, "", core=True), other]) == "not"
    with pytest.raises(ValueError, match="core"):
        verdict([other])
    summary = Summary("x", "claim", [], [core, Check("other", False, "n=3")])
    text = summary.markdown()
    assert "**Verdict:** partly reproduced" in text and "- FAILS: other -- n=3" in text
    assert Summary("x", "claim", [], []).verdict is None


def _toy(input_error: float, shallow: float, deep: float) -> dict[str, float]:
    """An input then 32 layers rising linearly from ``shallow`` to ``deep``."""
    return {"input": input_error, **{f"layer{k}": shallow + (deep - shallow) * (k - 1) / 31 for k in range(1, 33)}}


def test_toy_verdicts() -> None:
    n = 100_000  # 100 repetitions of 1000 test points
    assert verdict(toy.checks(_toy(0.01, 0.15, 0.45), n)) == "reproduced"
    assert verdict(toy.checks(_toy(0.01, 0.30, 0.30), n)) == "not"  # flat with depth
    assert verdict(toy.checks(_toy(0.40, 0.30, 0.10), n)) == "not"  # falling with depth
    assert verdict(toy.checks(_toy(0.024, 0.15, 0.45), n)) == "partly"  # 2.4% on the input is not essentially 0
    assert verdict(toy.checks(_toy(0.01, 0.10, 0.30), n)) == "partly"  # climbs, but far from a coin flip
    wobbly = _toy(0.01, 0.15, 0.45) | {"layer20": 0.2}
    assert [c.passed for c in toy.checks(wobbly, n)] == [True, True, True, False]  # a significant fall
    with pytest.raises(ValueError, match="input"):
        toy.checks({"layer1": 0.1}, n)


def test_mnist_convnet_verdicts() -> None:
    n = 10_000
    untrained = {name: 0.05 + 0.04 * k for k, name in enumerate(MNIST_CONVNET_PROBES)} | {"input": 0.08,
                                                                                         "conv1_postact": 0.05}
    trained = {name: 0.015 for name in MNIST_CONVNET_PROBES} | {"input": 0.08, "fc1_preact": 0.03}
    assert verdict(mnist_convnet.checks(untrained, trained, 0.01, n)) == "reproduced"
    assert verdict(mnist_convnet.checks(untrained, trained, 0.217, n)) == "not"  # a model that is not trained
    assert verdict(mnist_convnet.checks(untrained, untrained, 0.01, n)) == "not"  # training improved nothing
    no_kink = trained | {"fc1_preact": 0.015}
    checks = mnist_convnet.checks(untrained, no_kink, 0.01, n)
    assert verdict(checks) == "partly" and [c.passed for c in checks] == [True, True, True, False, True]
    input_best = untrained | {"input": 0.01}
    assert verdict(mnist_convnet.checks(input_best, trained, 0.01, n)) == "partly"  # no fall at conv1_postact
    with pytest.raises(ValueError, match="missing"):
        mnist_convnet.checks({"input": 0.1}, trained, 0.01, n)


def _mlp(depth: int, levels: dict[tuple[int, int], float]) -> dict[str, float]:
    """The input at 12% and each layer at the level of the range ``(first, last)`` that holds it."""
    errors = {"input": 0.12}
    for (a, b), level in levels.items():
        errors |= {f"layer{k}": level for k in range(a, b + 1)}
    assert len(errors) == depth + 1
    return errors


def test_deep_mlp_verdicts() -> None:
    settings, n, chance = deep_mlp.FULL, 1000, 0.9

    def judge(variant: str, before: dict[str, float], after: dict[str, float], model: float) -> str:
        return verdict(deep_mlp.checks(variant, before, after, model, chance=chance, n=n, settings=settings))

    random = _mlp(128, {(1, 63): 0.45, (64, 128): 0.85})
    useful = _mlp(128, {(1, 128): 0.11})
    assert judge("plain", random, random, 0.9) == "reproduced"
    assert judge("plain", random, useful, 0.11) == "not"  # the plain model trained after all
    assert judge("plain", random, random, 0.2) == "partly"  # deep probes useless, yet the model learned
    assert judge("aux", random, useful, 0.11) == "reproduced"
    assert judge("aux", random, random, 0.9) == "not"
    skip_before = _mlp(128, {(1, 63): 0.45, (64, 64): 0.15, (65, 128): 0.5})
    skip_after = _mlp(128, {(1, 63): 0.45, (64, 128): 0.12})
    assert judge("skip", skip_before, skip_after, 0.12) == "reproduced"
    assert judge("skip", skip_before, useful, 0.11) == "not"  # the layers below the skip learned as well
    no_bump = skip_before | {"layer64": 0.6}
    assert judge("skip", no_bump, skip_after, 0.12) == "partly"
    with pytest.raises(ValueError, match="variant"):
        deep_mlp.checks("residual", random, random, 0.9, chance=chance, n=n, settings=settings)


def test_depth_verdicts() -> None:
    n, chance = 1000, 0.9

    def judge(*errors: tuple[int, float, float]) -> str:
        """The verdict on depths with (depth, model error, last-quarter probe error)."""
        return verdict(depth.checks([depth.Outcome(*e) for e in errors], chance=chance, n=n, shallow=32))

    agree = [(16, 0.05, 0.06), (32, 0.1, 0.12), (48, 0.2, 0.3), (64, 0.9, 0.88), (96, 0.9, 0.9), (128, 0.9, 0.9)]
    assert judge(*agree) == "reproduced"
    assert judge(*[(d, 0.05, 0.06) for d in (16, 32, 64, 128)]) == "not"  # the deepest model learned too
    assert judge(*[(d, 0.9, 0.9) for d in (16, 32, 64, 128)]) == "not"  # even the shallow models failed
    assert judge((64, 0.9, 0.9), (128, 0.9, 0.9)) == "not"  # no shallow depth swept: the core claim is untested
    assert judge(*agree[:4], (96, 0.1, 0.1), (128, 0.9, 0.9)) == "partly"  # not sharp: 96 trains after 64 broke
    assert judge(*agree[:3], (64, 0.2, 0.3), (96, 0.9, 0.9), (128, 0.9, 0.9)) == "partly"  # breaks at 96, not 64
    assert judge(*agree[:3], (64, 0.2, 0.75), (96, 0.9, 0.9), (128, 0.9, 0.9)) == "reproduced"  # its deep layers dead
    near = 0.8 * chance - standard_error(0.8 * chance, n)  # within 2 SE of the useless level counts as broken
    assert depth.state(depth.Outcome(64, near, 0.1), chance=chance, n=n) == "broken"
    assert depth.state(depth.Outcome(64, 0.5, 0.5), chance=chance, n=n) == "between"
    checks = depth.checks([depth.Outcome(*e) for e in agree[:3]], chance=chance, n=n, shallow=32)
    assert [c.passed for c in checks] == [True, False, True, False] and checks[2].evidence == "no depth broke"
    with pytest.raises(ValueError, match="at least one depth"):
        depth.checks([], chance=chance, n=n, shallow=32)


def test_resnet_verdicts() -> None:
    n = 6000
    falling = {"input": 0.75, **{f"add_{k}": 0.5 - 0.025 * k for k in range(1, 17)}}
    assert verdict(resnet.checks(falling, 0.1, n)) == "reproduced"
    rising = {k: 1 - v for k, v in falling.items()}
    assert verdict(resnet.checks(rising, 0.1, n)) == "not"
    kinked = falling | {"add_9": 0.40}  # one significant rise, the trend still monotone enough
    checks = resnet.checks(kinked, 0.1, n)
    assert verdict(checks) == "partly" and not checks[1].passed and "add_8->add_9" in checks[1].evidence
    assert verdict(resnet.checks(falling, 0.05, n)) == "partly"  # the model well ahead of its last probe
    with pytest.raises(ValueError, match="three"):
        resnet.checks({"input": 0.9}, 0.1, n)


def test_inception_verdicts() -> None:
    n = 6000
    main = {f"p{k}": 0.4 - 0.02 * k for k in range(14)}
    assert verdict(inception.checks(main, True, "ahead", n)) == "reproduced"
    assert verdict(inception.checks(main, None, "level", n)) == "partly"
    assert verdict(inception.checks(main, False, "behind", n)) == "partly"
    assert verdict(inception.checks({k: 0.1 + 0.02 * i for i, k in enumerate(main)}, True, "ahead", n)) == "not"


def test_notes_are_computed_from_the_run() -> None:
    quick = mnist_convnet.notes(n_train=700, n_test=200, epochs=1, steps=22)
    assert "200 test images" in quick[0] and "7.1 times tighter" in quick[0]  # sqrt(10,000 / 200)
    assert "700 images for 1 epoch(s), 22 minibatches" in quick[1]
    assert "3.2 times tighter" in mnist_convnet.notes(n_train=3500, n_test=1000, epochs=10, steps=1100)[0]
    full = deep_mlp.run_notes(deep_mlp.FULL, variant="plain", data="mnist", n_train=3500, moments=[0, 500, 5000],
                              probes=129, quick=False)
    assert "5000 minibatches of 120 are about 171 epochs" in full[1] and "3 x 129 probes" in full[2]
    assert "into layer 64" in full[3] and not any(n.startswith("quick") for n in full)
    small = deep_mlp.run_notes(deep_mlp.QUICK, variant="plain", data="mnist", n_train=700, moments=[0, 400],
                               probes=9, quick=True)
    assert "about 69 epochs" in small[1] and "2 x 9 probes" in small[2] and "into layer 32" in small[3]
    assert small[-1].startswith("quick: the design scaled to 64 layers")
    skip = deep_mlp.run_notes(deep_mlp.FULL, variant="skip", data="mnist", n_train=3500, moments=[0, 500, 5000],
                              probes=129, quick=False)
    assert skip[-1] == ("the paper's Fig. 8 shows the skip model after 2000 minibatches; we probe it at [0, 500, "
                        "5000], so our last moment is later than the figure's")
    assert len(deep_mlp.run_notes(deep_mlp.FULL, variant="skip", data="mnist", n_train=3500, moments=[0, 2000],
                                  probes=129, quick=False)) == len(full)


def test_ripple_verdicts() -> None:
    settings = replace(ripple.FULL, resamples=200)
    layers = [f"layer{k}" for k in range(4, 129, 4)]

    def judge(centres: list[float]) -> str:
        result = rippling_result({"input": 0.0, **dict(zip(layers, centres))}, list(settings.run.steps))
        return verdict(ripple.checks(ripple.measure(result, settings, seed=0), settings))

    rising = [3.0 * 1.15 ** k for k in range(len(layers))]  # each layer about 15% later than its parent
    assert judge(rising) == "reproduced"
    assert judge([30.0] * len(layers)) == "not"  # no lag: every layer at once
    assert judge(rising[::-1]) == "not"  # reversed: the output end first
    assert judge([rising[0] if k % 2 else rising[-1] for k in range(len(layers))]) == "not"  # no order with depth
    steps = list(settings.run.steps)
    flat = rippling_result({"layer4": 5.0, "layer8": 50.0}, steps, first=0.1, last=0.1)
    [core, *_] = ripple.checks(ripple.measure(flat, settings, seed=0), settings)
    assert not core.passed and "over 0 learning layers" in core.evidence  # nothing learned: nothing to order


def _head_result(probe: dict[int, float], model: dict[int, float], layer: str = "layer64") -> ProbeResult:
    """A result with the last layer's probe test error and the model's own at each step."""
    result = ProbeResult([LayerInfo(layer, (64,), 64, 64, {"kind": "none"}, 0.9)],
                         meta={"model_test_error": {str(s): e for s, e in model.items()}})
    for step, error in probe.items():
        result.add(step, layer, "test", {"top1_error": error})
    return result


def test_fig4b_note_compares_the_last_probe_with_the_model() -> None:
    def note(probe: float, model: float) -> str:
        [text] = deep_mlp.head_notes(_head_result({0: 0.88, 400: probe}, {0: 0.9, 400: model}), deep_mlp.QUICK,
                                     n=1000, n_train=3500)
        return text

    agree = note(0.113, 0.125)
    assert "layer64's probe sees exactly the input of the model's classifier head" in agree
    assert "11.3% (SE 1.0) against the model's 12.5% (SE 1.0)" in agree and "difference -1.2 points" in agree
    assert "they agree within 2 SE" in agree and "0: -2.0, 400: -1.2 points" in agree
    assert "the head is not at its optimum" in note(0.08, 0.125)
    assert "1,000 of the 3,500 training images" in note(0.17, 0.125)  # the probe's handicap
    assert deep_mlp.head_notes(_head_result({400: 0.1}, {400: 0.1}, layer="layer8"), deep_mlp.QUICK, n=1000,
                               n_train=3500) == []
def test_depth_notes_are_computed_from_the_run() -> None:
    full = depth.run_notes(depth.FULL, data="mnist", n_train=3500, quick=False)
    assert full[0] == deep_mlp.RECIPE  # 003's 5000 minibatches: nothing to add
    assert "5000 minibatches of 120 are about 171 epochs" in full[1]
    assert "depths [16, 32, 48, 64, 72, 80, 88, 96, 112, 128] at width 128" in full[2]
    assert "2,000 training images" in full[3] and "(16: every 1, 32: every 2, 48: every 3" in full[3]
    assert not any(n.startswith("quick") for n in full)
    small = depth.run_notes(depth.QUICK, data="mnist", n_train=700, quick=True)
    assert small[0].endswith("here 300 minibatches per depth, 6% of 003's 5000, so that the 5 depths fit the time "
                             "budget")
    assert "about 51 epochs" in small[1] and small[-1].startswith("quick: width 32, lr 0.0001, 300 minibatches")
    assert depth.FULL.moments[:2] == [100, 200] and depth.FULL.moments[-1] == 5000
    assert depth.FULL.probe_every(80) == 5 and depth.QUICK.probe_every(4) == 1
    assert depth.FULL.probed(88)[-3:] == ["layer80", "layer85", "layer88"]  # every 5th, and the last
