"""depth: the plain deep MLP trained at depths 16 to 128, to find where training breaks down (002 Sec. 3.4).

002 chose its 128-layer MLP because "the maximal depth where things start to break down was depth 64", and
shows no numbers for it. This experiment trains the plain model of ``deep-mlp`` (same layers, initialisation and
recipe) at each depth of a sweep and, at the end of training, fits exact probes on the input and on every k-th
layer (a fixed number per model, so the curves compare at relative depth). Per depth it reports the model's own
test error and the probes' error curve; a depth is broken when its model stays near chance or its last quarter
of layers stays useless, and the shallowest broken depth is set beside the paper's 64.

The quick setting sweeps the same shape of design at width 32, a larger learning rate and a few hundred
minibatches: seconds, not minutes.
"""
from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import linprobe as lp
from linprobe.atomic import atomic_write_text
from linprobe.experiments.deep_mlp import (
    BATCH_SIZE,
    RECIPE,
    USEFUL,
    USELESS,
    layer_index,
    range_mean,
    rmsprop,
    train_minibatches,
)
from linprobe.experiments.report import Check, Summary, standard_error, with_se
from linprobe.experiments.training import at_most, model_error
from linprobe.models import deep_mlp as plain_mlp
from linprobe.report.plots import save_figure
from linprobe.report.results import format_value, markdown_table

CLAIM = ("a plain MLP (Glorot normal, LeakyReLU) gets hard to train by gradient descent with depth: \"the maximal "
         "depth where things start to break down was depth 64\" (002 Sec. 3.4)")
PAPER_BREAK = 64  # 002 Sec. 3.4
PAPER_MINIBATCHES = 5000  # 003: 60,000 images x 10 epochs / minibatches of 120


@dataclass(frozen=True)
class Settings:
    """The depths swept and what every model shares: width, learning rate, minibatches, and the probes.

    Each model is probed at its input and at ``probe_points`` evenly spaced layers (every ``depth //
    probe_points``-th and the last, all of them in a model no deeper than that), so every curve has about the same
    resolution in relative depth. Models up to ``shallow`` layers are the ones the claim says must train. The
    model's own test error is noted ``evaluations`` times during training (a forward pass over the test images, no
    probes).
    """

    depths: tuple[int, ...]
    width: int
    lr: float
    minibatches: int
    probe_points: int
    probe_train: int
    l2_path: tuple[float, ...]
    shallow: int
    evaluations: int

    def probe_every(self, depth: int) -> int:
        """The spacing of the probed layers in a model of ``depth`` layers."""
        return max(1, depth // self.probe_points)

    def probed(self, depth: int) -> list[str]:
        """The probed layers of a model of ``depth`` layers: the input, every ``probe_every``-th layer and the last."""
        every = self.probe_every(depth)
        return ["input", *(f"layer{k}" for k in sorted({*range(every, depth + 1, every), depth}))]

    @property
    def moments(self) -> list[int]:
        """The minibatches after which the model's own test error is noted: ``evaluations`` evenly spaced ones,
        the last the end of training (where the probes are fitted)."""
        return sorted({round(k * self.minibatches / self.evaluations) for k in range(1, self.evaluations + 1)})


QUICK = Settings(depths=(4, 8, 16, 32, 64), width=32, lr=1e-4, minibatches=300, probe_points=8, probe_train=1000,
                 l2_path=(1e-2,), shallow=8, evaluations=10)
FULL = Settings(depths=(16, 32, 48, 64, 72, 80, 88, 96, 112, 128), width=128, lr=1e-5, minibatches=5000,
                probe_points=16, probe_train=2000, l2_path=(1e-2, 1e-3), shallow=32, evaluations=50)


@dataclass(frozen=True)
class Outcome:
    """One trained depth: the model's own test error and the mean probe test error over its last quarter of layers
    (the layers a broken model leaves useless), both rates on the same test images."""

    depth: int
    model_error: float
    last_quarter: float


def last_quarter(errors: dict[str, float], depth: int) -> float:
    """Mean probe error over the probed layers of the deepest quarter of a ``depth``-layer model."""
    return range_mean(errors, depth - depth // 4 + 1, depth)


def trains(outcome: Outcome, *, chance: float, n: int) -> bool:
    """The model learned: its own error is below 40% of chance (useful) beyond two standard errors on ``n``."""
    p = outcome.model_error
    return p + 2 * standard_error(p, n) < USEFUL * chance


def broken(outcome: Outcome, *, chance: float, n: int) -> bool:
    """Training failed: the model's error or its last quarter's probe error is not below 80% of chance (useless)
    by two standard errors on ``n``."""
    return any(p + 2 * standard_error(p, n) >= USELESS * chance for p in (outcome.model_error, outcome.last_quarter))


def state(outcome: Outcome, *, chance: float, n: int) -> str:
    """``"trains"``, ``"broken"`` or ``"between"`` (neither: learned something, not enough to count as useful)."""
    if broken(outcome, chance=chance, n=n):
        return "broken"
    return "trains" if trains(outcome, chance=chance, n=n) else "between"


def break_depth(outcomes: Sequence[Outcome], *, chance: float, n: int) -> int | None:
    """The shallowest broken depth of the sweep, None when every depth escaped."""
    return min((o.depth for o in outcomes if broken(o, chance=chance, n=n)), default=None)


def checks(outcomes: Sequence[Outcome], *, chance: float, n: int, shallow: int) -> list[Check]:
    """The claim tested on each depth's model error and last-quarter probe error, rates on ``n`` test images.

    core: every model of at most ``shallow`` layers trains (model error below 40% of chance beyond two SEs), and
    the deepest model is broken (its model error or last quarter not below 80% of chance by two SEs); also: the
    break is sharp (every model deeper than the break depth is broken too), and it falls at the paper's depth 64.
    """
    if not outcomes:
        raise ValueError("the depth checks need at least one depth")
    ordered = sorted(outcomes, key=lambda o: o.depth)
    deepest, found = ordered[-1], break_depth(ordered, chance=chance, n=n)
    low = [o for o in ordered if o.depth <= shallow]
    after = [o for o in ordered if found is not None and o.depth > found]
    useful, useless = USEFUL * chance, USELESS * chance

    def said(o: Outcome) -> str:
        return f"{o.depth}: model {with_se(o.model_error, n)}, last quarter {with_se(o.last_quarter, n)}"

    return [Check(f"every model of at most {shallow} layers trains (model error below {useful:.1%}, 40% of chance, "
                  "beyond 2 SE)", bool(low) and all(trains(o, chance=chance, n=n) for o in low),
                  "; ".join(f"{o.depth}: {with_se(o.model_error, n)}" for o in low)
                  or f"no depth of at most {shallow} was swept", core=True),
            Check(f"the deepest model ({deepest.depth} layers) is broken (model error or last quarter not below "
                  f"{useless:.1%}, 80% of chance, by 2 SE)", broken(deepest, chance=chance, n=n),
                  f"{said(deepest)}; chance {chance:.1%}", core=True),
            Check("the break is sharp: every model deeper than the break depth is broken too",
                  all(broken(o, chance=chance, n=n) for o in after),
                  "no depth broke" if found is None else
                  f"break depth {found}; deeper: " + (", ".join(f"{o.depth} {state(o, chance=chance, n=n)}"
                                                               for o in after) or "none")),
            Check(f"training breaks down at the paper's depth {PAPER_BREAK}", found == PAPER_BREAK,
                  f"ours: {'none of ' + str([o.depth for o in ordered]) if found is None else found}; "
                  + ("" if PAPER_BREAK in {o.depth for o in ordered} else f"{PAPER_BREAK} was not swept; ")
                  + ", ".join(f"{o.depth} {state(o, chance=chance, n=n)}" for o in ordered))]


def train_depth(depth: int, splits: dict[str, lp.ArrayDataset], settings: Settings, *, out: Path, seed: int,
                progress: bool) -> lp.ProbeResult:
    """Build the plain model of ``depth`` layers and train it with deep-mlp's optimiser and minibatches, noting its
    own test error at each of ``settings.moments`` (``meta["model_test_error"]``, keyed by the step as text, as
    deep-mlp's); then probe the frozen model once and save its results into ``out/depth<depth>/``.

    Probes train on a fixed, stratified subset of the training split, choose their L2 on valid, report on test."""
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    model = plain_mlp(variant="plain", depth=depth, width=settings.width, in_features=train.x[0].numel(),
                      num_classes=train.num_classes, seed=seed)
    optimizer, done, errors = rmsprop(model, settings.lr), 0, {"0": model_error(model, test)}
    start = time.perf_counter()
    for step in settings.moments:
        train_minibatches(model, train, optimizer, count=step - done, seed=seed + step)
        done, errors[str(step)] = step, model_error(model, test)
    seconds = time.perf_counter() - start
    result = lp.probe(model, at_most(train, settings.probe_train, seed=seed), valid, test,
                      layers=settings.probed(depth), cache_dir=out / "cache", reduce="none",
                      l2_path=settings.l2_path, step=done, seed=seed, progress=progress, plot=False)
    result.meta |= {"depth": depth, "model_test_error": errors, "train_seconds": round(seconds, 3)}
    result.save(out / f"depth{depth}")
    return result


def model_curve(result: lp.ProbeResult) -> dict[int, float]:
    """The model's own test error along its training, by minibatch."""
    return {int(k): v for k, v in result.meta["model_test_error"].items()}


def escaped(curve: dict[int, float], *, chance: float, n: int) -> int | None:
    """The first minibatch at which the model's error is below 80% of chance (useless) by two standard errors on
    ``n``: when it left chance; None when it never did."""
    return min((step for step, p in curve.items() if p + 2 * standard_error(p, n) < USELESS * chance), default=None)


def outcome(depth: int, result: lp.ProbeResult) -> Outcome:
    """The numbers the checks need from one depth's probes."""
    errors = result.errors("test")
    return Outcome(depth, model_curve(result)[result.steps[-1]], last_quarter(errors, depth))


def relative_curve(result: lp.ProbeResult, depth: int) -> tuple[list[float], list[float]]:
    """The probe test errors of one model against relative depth (0: the input, 1: its last layer)."""
    errors = result.errors("test")
    return [layer_index(name) / depth for name in errors], list(errors.values())


def plot_depth_lines(lines: dict[int, tuple[list[float], list[float]]], path: Path, *, chance: float, xlabel: str,
                     ylabel: str, title: str) -> Path:
    """One line of errors per model depth (darker: deeper) on the absolute scale 0 to 1 with chance dotted, as every
    per-layer figure of the project, the legend beside the axes."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = plt.get_cmap("viridis_r")
    for k, (depth, (x, y)) in enumerate(lines.items()):
        ax.plot(x, y, marker="o", markersize=3, color=colours(0.15 + 0.85 * k / max(1, len(lines) - 1)),
                label=f"depth {depth}")
    ax.axhline(chance, linestyle=":", color="black", label=f"chance ({chance:.2f})")
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, path)


def plot_curves(results: dict[int, lp.ProbeResult], out: Path, *, chance: float) -> list[str]:
    """``probe_curves.png`` (probe test error against relative depth after training) and ``training.png`` (the
    model's own test error along training), one line per depth; the file names."""
    curves = {d: model_curve(r) for d, r in results.items()}
    plot_depth_lines({d: relative_curve(r, d) for d, r in results.items()}, out / "probe_curves.png", chance=chance,
                     xlabel="relative depth: layer / model depth (0 = input)", ylabel="test error (linear probe)",
                     title="plain deep MLP after training: probe test error along each model")
    plot_depth_lines({d: (list(map(float, c)), list(c.values())) for d, c in curves.items()}, out / "training.png",
                     chance=chance, xlabel="minibatches", ylabel="the model's own test error",
                     title="plain deep MLP: the model's test error along training")
    return ["probe_curves.png", "training.png"]


def plot_model_errors(outcomes: Sequence[Outcome], path: Path, *, chance: float, n: int) -> Path:
    """The model's own test error and its last quarter's probe error against depth, bars of two standard errors
    (the checks' margin), with chance, the checks' useful and useless levels, the paper's break depth and ours."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    depths = [o.depth for o in outcomes]
    for values, label, marker in (([o.model_error for o in outcomes], "the model's own test error", "o"),
                                  ([o.last_quarter for o in outcomes], "probes, last quarter of layers", "s")):
        ax.errorbar(depths, values, yerr=[2 * standard_error(v, n) for v in values], marker=marker, capsize=3,
                    label=label)
    ax.axhline(chance, linestyle=":", color="black", label=f"chance ({chance:.2f})")
    for level, words, style in ((USELESS, "useless above", "--"), (USEFUL, "useful below", "-.")):
        ax.axhline(level * chance, linestyle=style, linewidth=0.7, color="grey", label=f"{words} {level:.0%} of chance")
    ax.axvline(PAPER_BREAK, color="tab:red", linewidth=0.8, label=f"the paper's break ({PAPER_BREAK})")
    ours = break_depth(outcomes, chance=chance, n=n)
    if ours is not None:
        ax.axvline(ours, linestyle="--", color="tab:purple", linewidth=0.8, label=f"our break ({ours})")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_ylim(0, 1)
    ax.set_xlabel("model depth (layers)")
    ax.set_ylabel("test error")
    ax.set_title(f"plain deep MLP after training, by depth (bars: 2 SE on {n:,} test images)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, path)


@dataclass(frozen=True)
class Row:
    """One depth in ``depths.csv``: the outcome, its standard errors, the probed layers, the first noted minibatch
    at which the model had left chance (empty: never) and the state."""

    depth: int
    probed_layers: int
    model_error: float
    model_se: float
    left_chance: int | None
    input_error: float
    best_error: float
    last_quarter: float
    last_quarter_se: float
    state: str


def rows(results: dict[int, lp.ProbeResult], *, chance: float, n: int) -> list[Row]:
    """One row per depth, in the order swept."""
    found = []
    for depth, result in results.items():
        errors, o = result.errors("test"), outcome(depth, result)
        found.append(Row(depth, len(errors) - 1, o.model_error, standard_error(o.model_error, n),
                         escaped(model_curve(result), chance=chance, n=n), errors["input"], min(errors.values()),
                         o.last_quarter, standard_error(o.last_quarter, n), state(o, chance=chance, n=n)))
    return found


def write_table(found: Sequence[Row], out: Path, n: int) -> str:
    """``depths.csv`` (one row per depth) and the same as a markdown table, returned."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(f.name for f in fields(Row))
    writer.writerows([format_value(v) if isinstance(v, float) else v for v in astuple(r)] for r in found)
    atomic_write_text(out / "depths.csv", buf.getvalue())
    return markdown_table(["depth", "probed layers", "model test error", "left chance at minibatch", "input probe",
                           "best probe", "last quarter probes", "state"],
                          [[str(r.depth), str(r.probed_layers), with_se(r.model_error, n),
                            "never" if r.left_chance is None else str(r.left_chance), f"{r.input_error:.1%}",
                            f"{r.best_error:.1%}", with_se(r.last_quarter, n), r.state] for r in found])


def findings(found: Sequence[Row], results: dict[int, lp.ProbeResult], *, chance: float, n: int) -> list[str]:
    """Per depth the model's error and the probe curve at a few relative depths; then the depths that train and the
    break depth against the paper's."""
    lines = []
    for r in found:
        x, y = relative_curve(results[r.depth], r.depth)
        marks = {q: min(range(len(x)), key=lambda i: abs(x[i] - q)) for q in (0.25, 0.5, 0.75, 1.0)}
        left = "never left chance" if r.left_chance is None else f"below useless from minibatch {r.left_chance}"
        lines.append(f"depth {r.depth}: the model's own test error {with_se(r.model_error, n)} ({left}); probes: input "
                     f"{r.input_error:.1%}, " + ", ".join(f"layer {round(x[i] * r.depth)} {y[i]:.1%}"
                                                          for i in marks.values())
                     + f"; last quarter {with_se(r.last_quarter, n)} ({r.state})")
    outcomes = [Outcome(r.depth, r.model_error, r.last_quarter) for r in found]
    found_break = break_depth(outcomes, chance=chance, n=n)
    trained = [r.depth for r in found if r.state == "trains"]
    lines.append(f"models that train: {trained or 'none'}; the shallowest broken depth: "
                 f"{found_break if found_break is not None else 'none'} (the paper: {PAPER_BREAK}); chance "
                 f"{chance:.1%}, useful below {USEFUL * chance:.1%}, useless above {USELESS * chance:.1%}")
    return lines


def timing(results: dict[int, lp.ProbeResult]) -> str:
    """Seconds of training (with the model's test error noted along it) and of probing per depth: what a longer or
    deeper sweep would cost on this machine."""
    return ("seconds per depth, training + probes: " + ", ".join(
        f"{d}: {r.meta['train_seconds']:.0f} + {r.meta['provenance']['seconds']:.0f}" for d, r in results.items())
        + f" (torch threads: {torch.get_num_threads()})")


def run_notes(settings: Settings, *, data: str, n_train: int, quick: bool) -> list[str]:
    """The notes, computed from the run: the recipe and its length against the paper's, the epochs that makes,
    what the paper does not say about its depth experiments, the probes and their spacing, and one seed."""
    steps = settings.minibatches
    spacing = ", ".join(f"{d}: every {settings.probe_every(d)}" for d in settings.depths)
    return [RECIPE + ("" if steps == PAPER_MINIBATCHES else
                      f"; here {steps} minibatches per depth, {steps / PAPER_MINIBATCHES:.0%} of 003's "
                      f"{PAPER_MINIBATCHES}, so that the {len(settings.depths)} depths fit the time budget"),
            (f"data={data!r} leaves {n_train:,} images for training, so {steps} minibatches of {BATCH_SIZE} are "
             f"about {steps * BATCH_SIZE / n_train:.0f} epochs (002 and 003: 60,000 images, 10 epochs)"),
            ("002 gives no numbers, depths, widths or training lengths for its depth experiments, only the sentence "
             f"quoted; we sweep depths {list(settings.depths)} at width {settings.width} and call a depth broken when "
             f"its model's test error or its last quarter's mean probe error is not below {USELESS:.0%} of chance by "
             f"2 SE, trained when its model's error is below {USEFUL:.0%} of chance beyond 2 SE"),
            (f"probes are exact (L-BFGS to convergence) on a fixed subset of {settings.probe_train:,} training images, "
             f"L2 chosen on valid from {settings.l2_path}, fitted once at the end of training on the input and "
             f"{settings.probe_points} evenly spaced layers per model ({spacing}, and the last); we report test "
             "error, the paper plots train error (train and valid are in each depth<D>/results.csv)"),
            ("one seed: the standard errors count the test images only; another initialisation could move the break "
             "by one step of the sweep"),
            *([(f"quick: width {settings.width}, lr {settings.lr:g}, {steps} minibatches: the design scaled down, the "
               "break depth it finds is not the full setting's")] if quick else [])]


def described(settings: Settings, splits: dict[str, lp.ArrayDataset]) -> dict[str, object]:
    """The settings section of the summary."""
    sizes = {k: len(v) for k, v in splits.items()}
    return {"depths": list(settings.depths),
            "model": f"depth x Linear({settings.width}) + LeakyReLU(0.5), Glorot normal, zero bias, linear "
                     "classifier on top (deep-mlp's plain variant)",
            "train/valid/test": f"{sizes['train']}/{sizes['valid']}/{sizes['test']}",
            "optimiser": f"centred RMSProp, lr {settings.lr:g}, decay 0.9, momentum 0.9, eps 1e-5; minibatches of "
                         f"{BATCH_SIZE}, {settings.minibatches} of them per depth",
            "model test error noted at minibatches": settings.moments,
            "probed layers": f"the input and {settings.probe_points} evenly spaced layers per model, at the end",
            "probe train/valid/test samples": f"{min(settings.probe_train, sizes['train'])}/{sizes['valid']}/"
                                              f"{sizes['test']}",
            "l2 path": settings.l2_path, "reported error": "test split",
            "models that must train": f"depth <= {settings.shallow}", "torch threads": torch.get_num_threads()}


def run(out: Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True,
        depths: Sequence[int] | None = None) -> Summary:
    """Train and probe the plain deep MLP at each depth (``depths`` overrides the setting's), then tabulate, plot and
    judge where training breaks down."""
    settings = QUICK if quick else FULL
    if depths is not None:
        if not depths or any(d < 1 for d in depths):
            raise ValueError(f"depths must be whole numbers >= 1, got {depths!r}")
        settings = replace(settings, depths=tuple(sorted(set(depths))))
    splits = lp.standard_splits(data, seed=seed)
    results = {d: train_depth(d, splits, settings, out=out, seed=seed, progress=progress) for d in settings.depths}
    chance, n = next(iter(results.values())).chance_error, len(splits["test"])
    found = rows(results, chance=chance, n=n)
    table = write_table(found, out, n)
    outcomes = [outcome(d, r) for d, r in results.items()]
    figures = plot_curves(results, out, chance=chance)
    plot_model_errors(outcomes, out / "model_errors.png", chance=chance, n=n)
    judged = checks(outcomes, chance=chance, n=n, shallow=settings.shallow)
    return Summary("depth", CLAIM, findings(found, results, chance=chance, n=n), judged,
                   settings={"data": data, **described(settings, splits), "seed": seed},
                   figures=[*figures, "model_errors.png"], tables=[table],
                   notes=[*run_notes(settings, data=data, n_train=len(splits["train"]), quick=quick), timing(results)])
