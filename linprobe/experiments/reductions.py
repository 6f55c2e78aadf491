"""reductions: none / pooling / random subset / random projection probed on one trained MNIST convnet (001 3.3-3.4).

The later paper argues that the valid error is the quantity to watch (section 3.3), that probes on layers with
too many features overfit and that reducing the features helps against it (section 3.4), and that for Inception v3
"we have had the most success by taking 1000 random features for each probe" (Appendix C). Our unreduced convnet
probes fit the training images perfectly on the 25,088-feature layers while erring on valid ones, so this
experiment trains the tutorial convnet once (mnist-convnet's recipe) and probes the same ten points of that one
model four ways: every feature, per-channel pooling, a fixed random subset of 1000 and a random projection to 1000.
It reports, per layer and reduction, train and valid top-1 error, their gap and the test error, and judges the
claims on the layers wider than 1000 features (the only ones a 1000-feature reduction changes).
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import linprobe as lp
from linprobe.atomic import atomic_write_text
from linprobe.experiments.mnist_convnet import train_tutorial
from linprobe.experiments.report import SIGNIFICANT, Check, Summary, compare, standard_error, with_se
from linprobe.experiments.training import model_error
from linprobe.models import MNIST_CONVNET_PROBES, mnist_convnet
from linprobe.report.plots import plot_layer_curves
from linprobe.report.results import format_value, markdown_table

CLAIM = ("probes on layers with too many features overfit; reducing the features helps against it (section 3.4), "
         "and a fixed random subset of 1000 features worked best (Appendix C); the valid error is the quantity "
         "to watch (section 3.3)")
WIDE = 1000  # a layer wider than this is one that subset:1000 / project:1000 actually reduce
REDUCTIONS = ("none", "pool", f"subset:{WIDE}", f"project:{WIDE}")
SUBSET, POOL, PROJECT = REDUCTIONS[2], REDUCTIONS[1], REDUCTIONS[3]


def folder(reduction: str) -> str:
    """The results folder of one reduction under the run's ``out`` (``subset:1000`` -> ``subset-1000``)."""
    return reduction.replace(":", "-")


def layer_specs(reduction: str, widths: Mapping[str, int]) -> str | dict[str, str]:
    """The ``reduce=`` argument for one reduction: ``none`` and ``pool`` as they are (pooling keeps flat layers
    whole by itself); a subset or projection only on layers wider than :data:`WIDE` features, the others kept
    whole (a subset of 1000 would keep them all anyway; a random projection would inflate 10 logits to 1000
    correlated features, changing only how the L2 penalty weighs them)."""
    if reduction in ("none", "pool"):
        return reduction
    return {layer: reduction if width > WIDE else "none" for layer, width in widths.items()}


def gap_se(train: float, valid: float, n_train: int, n_valid: int) -> float:
    """The standard error of ``valid - train`` (the two rates measured on different sets of samples)."""
    return math.hypot(standard_error(train, n_train), standard_error(valid, n_valid))


def mean_gap(train: Mapping[str, float], valid: Mapping[str, float], layers: Sequence[str], n_train: int,
             n_valid: int) -> tuple[float, float]:
    """The mean valid-minus-train gap over ``layers`` and its standard error.

    The layers' errors are measured on the same images, so they are not independent: the SE taken is the mean of
    the layers' SEs, the value for perfectly correlated layers and an upper bound on the mean's SE."""
    gaps = [valid[k] - train[k] for k in layers]
    ses = [gap_se(train[k], valid[k], n_train, n_valid) for k in layers]
    return sum(gaps) / len(gaps), sum(ses) / len(ses)


def _narrows(name: str, train: Mapping[str, Mapping[str, float]], valid: Mapping[str, Mapping[str, float]],
             wide: Sequence[str], n_train: int, n_valid: int) -> tuple[bool, str]:
    """Whether reduction ``name`` has a smaller mean gap over ``wide`` than ``none`` beyond two SEs, with the
    numbers that say so."""
    g0, s0 = mean_gap(train["none"], valid["none"], wide, n_train, n_valid)
    g1, s1 = mean_gap(train[name], valid[name], wide, n_train, n_valid)
    margin = SIGNIFICANT * math.hypot(s0, s1)
    return g0 - g1 > margin, (f"mean gap over the {len(wide)} wide layers: none {100 * g0:.1f} points (SE {100 * s0:.1f}), "
                              f"{name} {100 * g1:.1f} (SE {100 * s1:.1f}); narrower by {100 * (g0 - g1):+.1f}, "
                              f"2 SE of the difference {100 * margin:.1f}")


def checks(train: Mapping[str, Mapping[str, float]], valid: Mapping[str, Mapping[str, float]], wide: Sequence[str],
           n_train: int, n_valid: int) -> list[Check]:
    """The paper's claims tested on train and valid top-1 errors per reduction (``train[reduction][layer]``), on the
    ``wide`` layers (wider than 1000 features unreduced), train measured on ``n_train`` images, valid on ``n_valid``.

    Core: subset:1000 narrows the mean train-valid gap against no reduction beyond two SEs (section 3.4), and its
    valid error is not significantly worse than no reduction's on most (more than half) of the wide layers
    (Appendix C: the reduction that worked). Also, where they were run: pooling and the random projection narrow
    the gap too (section 3.4 offers all three)."""
    missing = {"none", SUBSET} - set(train) | {"none", SUBSET} - set(valid)
    if missing:
        raise ValueError(f"the reductions' checks need train and valid errors for {sorted(missing)}")
    if not wide:
        raise ValueError("the reductions' checks need at least one layer wider than 1000 features")
    absent = {(r, k) for errors in (train, valid) for r in errors for k in wide if k not in errors[r]}
    if absent:
        raise ValueError(f"the reductions' checks need every wide layer under every reduction; missing {sorted(absent)}")
    narrows, evidence = _narrows(SUBSET, train, valid, wide, n_train, n_valid)
    worse = [f"{k} {with_se(valid['none'][k], n_valid)} -> {with_se(valid[SUBSET][k], n_valid)}"
             for k in wide if compare(valid["none"][k], valid[SUBSET][k], n_valid) > 0]
    found = [Check(f"{SUBSET} narrows the train-valid gap on the layers wider than {WIDE} features", narrows, evidence,
                   core=True),
             Check(f"{SUBSET}'s valid error is not significantly worse than no reduction's on most wide layers",
                   len(wide) - len(worse) > len(wide) / 2,
                   f"significantly worse on {len(worse)} of {len(wide)}" + (f": {'; '.join(worse)}" if worse else ""),
                   core=True)]
    for name, words in ((POOL, "per-channel pooling"), (PROJECT, f"a random projection to {WIDE}")):
        if name in train and name in valid:
            found.append(Check(f"{words} narrows the gap too", *_narrows(name, train, valid, wide, n_train, n_valid)))
    return found


@dataclass(frozen=True)
class Row:
    """One reduction of one layer: its feature counts, its train / valid / test top-1 error and the gap's SE."""

    reduction: str
    layer: str
    features_in: int
    features_out: int
    train_top1: float
    valid_top1: float
    gap: float
    gap_se: float
    test_top1: float
    overfit: bool


def combined_rows(results: Mapping[str, lp.ProbeResult], n_train: int, n_valid: int) -> list[Row]:
    """One row per reduction and layer (reductions in the order given, layers in execution order): features in and
    out, train / valid / test top-1 error, the gap valid - train with its SE, and whether the library flagged the
    probe as overfitting (``meta["overfit"]``: train <= 1% and valid at least 5 points worse, beyond noise)."""
    rows = []
    for reduction, result in results.items():
        train, valid, test = (result.errors(s) for s in ("train", "valid", "test"))
        overfit = result.meta.get("overfit", {})
        for info in result.layers:
            if info.name not in valid:
                continue  # a layer found invalid has no probe
            t, v = train[info.name], valid[info.name]
            rows.append(Row(reduction, info.name, info.features_in, info.features_out, t, v, v - t,
                            gap_se(t, v, n_train, n_valid), test[info.name], info.name in overfit))
    return rows


def write_tables(rows: Sequence[Row], out: Path) -> str:
    """``reductions.csv`` (tidy, one row per reduction and layer) and ``reductions.md`` (grouped by layer); returns
    the markdown table."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(f.name for f in fields(Row))
    writer.writerows([format_value(v) if isinstance(v, float) else v for v in astuple(r)] for r in rows)
    atomic_write_text(out / "reductions.csv", buf.getvalue())
    order = list(dict.fromkeys(r.layer for r in rows))
    table = markdown_table(
        ["layer", "reduction", "features", "train top1", "valid top1", "gap (SE), points", "test top1", "overfit"],
        [[r.layer, r.reduction, f"{r.features_in}->{r.features_out}", f"{r.train_top1:.4f}", f"{r.valid_top1:.4f}",
          f"{100 * r.gap:+.1f} ({100 * r.gap_se:.1f})", f"{r.test_top1:.4f}", "yes" if r.overfit else ""]
         for r in sorted(rows, key=lambda r: order.index(r.layer))])
    atomic_write_text(out / "reductions.md", table + "\n")
    return table


def notes(results: Mapping[str, lp.ProbeResult], *, wide: Sequence[str], n_train: int, n_valid: int, n_test: int,
          epochs: int, steps: int) -> list[str]:
    """What a reader needs to weigh the numbers, computed from the run: its sizes and noise, the feature counts per
    reduction, and where our reductions differ from the paper's."""
    widths = {r: [info.features_out for info in result.layers] for r, result in results.items()}
    counts = "; ".join(f"{r}: {min(w):,}-{max(w):,}" for r, w in widths.items())
    widest = max(info.features_in for info in next(iter(results.values())).layers)
    return [(f"the model trained on {n_train:,} images for {epochs} epoch(s), {steps} minibatches; the probes are fitted "
             f"on the same {n_train:,}, chosen (L2) on {n_valid:,} valid images and tested on {n_test:,}"),
            (f"one standard error of a valid error near 3% is {100 * standard_error(0.03, n_valid):.2f} points on these "
             f"{n_valid:,} valid images; a gap's SE combines it with the train error's on {n_train:,}; a mean over "
             "layers takes the mean of their SEs (the layers are measured on the same images)"),
            f"features per layer (fewest-most over the {len(widths[next(iter(widths))])} probes): {counts}",
            (f"{len(wide)} layers are wider than {WIDE} features ({', '.join(wide)}), the widest {widest:,}: subset and "
             f"projection keep {WIDE / widest:.0%} of it; Appendix C's 1000 random features were taken from Inception "
             "v3 layers of 100,000 and more"),
            (f"{PROJECT} is a fixed Gaussian random projection (Johnson-Lindenstrauss scaling), not the learned mapping "
             "section 3.4 suggests; pool averages each channel over its whole map (the paper's ResNet recipe), so the "
             "one-channel input becomes one number and the flat layers fc1 and logits stay whole"),
            (f"{SUBSET} and {PROJECT} reduce only the layers wider than {WIDE} features; the others are probed whole, "
             "as with none")]


def run(out: Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True,
        epochs: int | None = None) -> Summary:
    """Train the tutorial convnet once, then probe its ten points with each reduction into ``out/<reduction>/``;
    write the combined table, the valid-error and gap figures and the checks."""
    splits = lp.standard_splits(data, seed=seed, limit=400 if quick else None)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    model = mnist_convnet(seed=seed)
    epochs = epochs or (1 if quick else 10)
    steps = train_tutorial(model, train, epochs=epochs, seed=seed)
    results: dict[str, lp.ProbeResult] = {}
    for reduction in REDUCTIONS:  # none first: its layer widths decide which layers the others reduce
        widths = {info.name: info.features_in for info in results["none"].layers} if results else {}
        results[reduction] = lp.probe(model, train, valid, test, layers=list(MNIST_CONVNET_PROBES),
                                      reduce=layer_specs(reduction, widths), cache_dir=out / "cache",
                                      out_dir=out / folder(reduction), step=steps, seed=seed, progress=progress)
    n_train, n_valid, n = len(train), len(valid), len(test)
    wide = [info.name for info in results["none"].layers if info.features_in > WIDE]
    train_err = {r: result.errors("train") for r, result in results.items()}
    valid_err = {r: result.errors("valid") for r, result in results.items()}
    gaps = {r: {k: v - train_err[r][k] for k, v in valid_err[r].items()} for r in results}
    table = write_tables(combined_rows(results, n_train, n_valid), out)
    chance = results["none"].chance_error
    plot_layer_curves(valid_err, out / "valid_error.png", ylabel="probe valid top-1 error", chance=chance,
                      title="one trained MNIST convnet, four feature reductions: valid error per layer")
    plot_layer_curves(gaps, out / "gap.png", ylabel="valid minus train top-1 error",
                      title="the probes' train-valid gap per layer and reduction")
    own = model_error(model, test)
    findings = [f"the model's own test error: {with_se(own, n)} after {steps} minibatches"]
    for r, result in results.items():
        g, s = mean_gap(train_err[r], valid_err[r], wide, n_train, n_valid)
        worse = sum(compare(valid_err["none"][k], valid_err[r][k], n_valid) > 0 for k in wide)
        better = sum(compare(valid_err["none"][k], valid_err[r][k], n_valid) < 0 for k in wide)
        findings.append(
            f"{r}: mean over the {len(wide)} wide layers: train {sum(train_err[r][k] for k in wide) / len(wide):.1%}, "
            f"valid {sum(valid_err[r][k] for k in wide) / len(wide):.1%}, gap {100 * g:.1f} points (SE {100 * s:.1f})"
            + ("" if r == "none" else f"; valid error against none: worse on {worse}, better on {better} "
               f"(beyond 2 SE)") + f"; probes flagged as overfitting: {len(result.meta.get('overfit', {}))} of "
            f"{len(result.layers)}")
    for k in wide[:1] + wide[-1:]:
        findings.append(f"{k}: " + "; ".join(f"{r} train {train_err[r][k]:.1%}, valid {with_se(valid_err[r][k], n_valid)}"
                                            for r in results))
    return Summary("reductions", CLAIM, findings, checks(train_err, valid_err, wide, n_train, n_valid),
                   figures=["valid_error.png", "gap.png"],
                   notes=notes(results, wide=wide, n_train=n_train, n_valid=n_valid, n_test=n, epochs=epochs,
                               steps=steps),
                   tables=[table],
                   settings={"data": data, "train/valid/test": f"{n_train}/{n_valid}/{n}", "epochs": epochs,
                             "reductions": ", ".join(REDUCTIONS) + f" (results in {', '.join(map(folder, REDUCTIONS))}/)",
                             "probe": "the library's default L2 path, chosen on valid", "seed": seed})
