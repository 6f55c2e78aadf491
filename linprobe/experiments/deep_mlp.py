"""deep-mlp: a 128-layer MLP on MNIST, plain, with auxiliary heads, or with a skip to layer 64 (002 Figs. 6-8).

Exact probes on the input and the layers are fitted on the frozen model at chosen minibatches
(0, 500 and 5000 by default) and gathered in one table. The paper: the plain model cannot be
trained; a linear head every 16 layers makes it trainable (Fig. 7); feeding the input to layer 64
as well leaves layers 1-63 useless while layers 64-128 learn (Fig. 8).

The quick setting scales the design down to 64 layers of 64 units, with the skip into layer 32 and
a head every 8 layers: at full size the skip model needs thousands of minibatches before its upper
half learns anything, far beyond a run of seconds.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

import linprobe as lp
from linprobe.experiments.report import Check, Summary, compare, standard_error, with_se
from linprobe.experiments.training import model_error, train_epochs
from linprobe.models import DEEP_MLP_VARIANTS, MLP, deep_mlp
from linprobe.report.diagnose import Kink
from linprobe.report.plots import plot_error_by_depth, save_figure

CLAIMS = {
    "plain": "the 128-layer MLP cannot be trained by gradient descent: its deep layers stay useless",
    "aux": "a linear head every 16 layers, its loss added to the model's, makes it trainable: by 5000 minibatches "
           "the deep layers are useful too (Fig. 7)",
    "skip": "with the input also fed to layer 64, layers 1-63 stay useless even after long training while "
            "layers 64-128 learn; untrained, the error has two bumps, low at the input and again at layer 64 (Fig. 8)",
}
BATCH_SIZE = 120  # 003: 60,000 images x 10 epochs / 5,000 minibatches
FIG8_STEP = 2000  # the moment 002's Fig. 8 shows the skip model at
RECIPE = ("training follows 003 (centred RMSProp, lr 1e-5, decay 0.9, momentum 0.9, minibatches of 120, 5000 "
          "minibatches); the one translation is torch's eps = 1e-5 for TensorFlow's epsilon = 1e-10 inside the square "
          "root, which floors the step denominator and so decides how far the vanishing gradients move the weights")


@dataclass(frozen=True)
class Settings:
    """The model's size, the learning rate, and when, where and how the probes are fitted.

    The skip goes into layer ``depth / 2`` and the heads sit every ``depth / 8`` layers, as 64 and 16
    do at the paper's depth of 128.
    """

    depth: int
    width: int
    lr: float
    steps: tuple[int, ...]
    probe_every: int
    probe_train: int
    l2_path: tuple[float, ...]
    probe_bootstrap: bool = True  # bootstrap intervals of the probes' top-5 and cross-entropy (a third of a fit)

    @property
    def skip_to(self) -> int:
        return self.depth // 2

    @property
    def aux_every(self) -> int:
        return self.depth // 8


QUICK = Settings(depth=64, width=64, lr=1e-4, steps=(0, 400), probe_every=8, probe_train=1000, l2_path=(1e-2, 1e-3))
FULL = Settings(depth=128, width=128, lr=1e-5, steps=(0, 500, 5000), probe_every=1, probe_train=2000,
                l2_path=(1e-2, 1e-3))


def make_model(variant: str, settings: Settings, train: lp.ArrayDataset, *, seed: int) -> MLP:
    """The deep MLP ``variant`` at ``settings``' size, sized to ``train``'s inputs and classes, seeded."""
    return deep_mlp(variant=variant, depth=settings.depth, width=settings.width, in_features=train.x[0].numel(),
                    num_classes=train.num_classes, aux_every=settings.aux_every, skip_to=settings.skip_to, seed=seed)


def rmsprop(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """003's optimiser: centred RMSProp, decay 0.9, momentum 0.9.

    TensorFlow adds its epsilon (1e-10) inside the square root, torch outside; 1e-5 = sqrt(1e-10) keeps
    TF's floor under the step size, which decides how far the vanishing gradients of deep layers move them.
    """
    return torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.9, momentum=0.9, centered=True, eps=1e-5)


def train_minibatches(model: torch.nn.Module, train: lp.ArrayDataset, optimizer: torch.optim.Optimizer, *,
                      count: int, seed: int) -> None:
    """Exactly ``count`` minibatches: whole shuffled epochs, then a seeded random part of one more."""
    epochs, rest = divmod(count, math.ceil(len(train) / BATCH_SIZE))
    train_epochs(model, train, optimizer, epochs=epochs, batch_size=BATCH_SIZE, seed=seed)
    if rest:
        part = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:rest * BATCH_SIZE]
        train_epochs(model, train.subset(part), optimizer, epochs=1, batch_size=BATCH_SIZE, seed=seed)


def layer_index(name: str) -> int:
    """0 for ``"input"``, k for ``"layerk"``."""
    return 0 if name == "input" else int(name.removeprefix("layer"))


def range_mean(errors: dict[str, float], first: int, last: int) -> float:
    """Mean error over the probed layers ``first`` to ``last`` inclusive (NaN when none was probed)."""
    inside = [e for n, e in errors.items() if first <= layer_index(n) <= last]
    return statistics.fmean(inside) if inside else math.nan


def block_means(errors: dict[str, float], *, block: int, depth: int) -> dict[str, float]:
    """Mean error over layers 1 to ``block``, ``block + 1`` to ``2 * block``, ..., keyed like ``"1-16"``."""
    return {f"{a}-{a + block - 1}": range_mean(errors, a, a + block - 1) for a in range(1, depth + 1, block)}


USELESS, USEFUL = 0.8, 0.4  # a range of layers is useless above 80% of chance, useful below 40% of chance


def checks(variant: str, before: dict[str, float], after: dict[str, float], model_error: float, *, chance: float,
           n: int, settings: Settings) -> list[Check]:
    """The paper's claims for ``variant`` tested on the probes' test errors at the first (``before``) and last
    (``after``) moments and the model's own last test error, each a rate on ``n`` test images.

    A range of layers is one rate (its mean); it is useless above 80% of chance and useful below 40% of chance,
    each within two standard errors; a change counts beyond two SEs of the difference.
    plain (core): the last quarter stays useless; also: training does not improve it, the model stays useless.
    aux (core): the last quarter becomes useful; also: training improves it, the model becomes useful.
    skip (core): the layers from the skip on are useful and those below it worse by 20% of chance beyond two
    SEs; also: the layers below the skip do not improve, and untrained the skip layer is below the probed
    layer before it (the second bump)."""
    if variant not in DEEP_MLP_VARIANTS:
        raise ValueError(f"variant must be one of {DEEP_MLP_VARIANTS}, got {variant!r}")
    depth, skip = settings.depth, settings.skip_to
    quarter = f"the last quarter (layers {depth - depth // 4 + 1}-{depth})"
    deep0, deep = (range_mean(e, depth - depth // 4 + 1, depth) for e in (before, after))
    own = f"the model's own error {with_se(model_error, n)}"
    useless, useful = USELESS * chance, USEFUL * chance

    def above(p: float, level: float) -> bool:
        return p + 2 * standard_error(p, n) >= level

    def below(p: float, level: float) -> bool:
        return p - 2 * standard_error(p, n) < level

    def moved(a: float, b: float) -> str:
        return f"{with_se(a, n)} -> {with_se(b, n)}"

    if variant == "plain":
        return [Check(f"{quarter} stays useless (above {useless:.1%}, 80% of chance)", above(deep, useless),
                      f"{with_se(deep, n)}, chance {chance:.1%}", core=True),
                Check(f"training does not improve {quarter}", compare(deep0, deep, n) >= 0, moved(deep0, deep)),
                Check(f"the model stays useless (above {useless:.1%})", above(model_error, useless), own)]
    if variant == "aux":
        return [Check(f"{quarter} becomes useful (below {useful:.1%}, 40% of chance)", below(deep, useful),
                      f"{with_se(deep, n)}, chance {chance:.1%}", core=True),
                Check(f"training improves {quarter}", compare(deep0, deep, n) < 0, moved(deep0, deep)),
                Check(f"the model becomes useful (below {useful:.1%})", below(model_error, useful), own)]
    lower0, lower, learned = range_mean(before, 1, skip - 1), range_mean(after, 1, skip - 1), range_mean(after, skip,
                                                                                                        depth)
    gap = lower - learned - 2 * math.hypot(standard_error(lower, n), standard_error(learned, n))
    neighbour = max((k for k in map(layer_index, before) if 0 < k < skip), default=0)
    bump0, bump1 = before["input" if neighbour == 0 else f"layer{neighbour}"], before[f"layer{skip}"]
    return [Check(f"layers {skip}-{depth} learn (below {useful:.1%}) while layers 1-{skip - 1} stay worse by "
                  f"{0.2 * chance:.1%} (20% of chance) beyond 2 SE", below(learned, useful) and gap > 0.2 * chance,
                  f"layers 1-{skip - 1} {with_se(lower, n)}, {skip}-{depth} {with_se(learned, n)}", core=True),
            Check(f"layers 1-{skip - 1} do not improve with training", compare(lower0, lower, n) >= 0,
                  moved(lower0, lower)),
            Check(f"untrained, a second bump: layer {skip} below layer {neighbour}", compare(bump0, bump1, n) < 0,
                  f"layer {neighbour} {with_se(bump0, n)}, layer {skip} {with_se(bump1, n)}")]


def train_and_probe(model: MLP, splits: dict[str, lp.ArrayDataset], settings: Settings, *, moments: list[int],
                    cache: Path, seed: int, progress: bool) -> lp.ProbeResult:
    """Train, stopping at each moment for exact probes on the frozen model; one table over the moments.

    Probes train on a fixed seeded subset of the training split, choose their L2 on valid, report on test (with
    bootstrap intervals of their other metrics when ``settings.probe_bootstrap``).
    The model's own test error at each moment goes to ``meta["model_test_error"]``, keyed by the step as text.
    """
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    probe_train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
                               [:settings.probe_train])
    layers = ["input", *model.layer_names[settings.probe_every - 1::settings.probe_every]]
    optimizer = rmsprop(model, settings.lr)
    results, model_errors, done = [], {}, 0
    for step in moments:
        train_minibatches(model, train, optimizer, count=step - done, seed=seed + step)
        done = step
        results.append(lp.probe(model, probe_train, valid, test, layers=layers, cache_dir=cache, reduce="none",
                                l2_path=settings.l2_path, step=step, progress=progress, plot=False,
                                bootstrap=settings.probe_bootstrap))
        model_errors[str(step)] = model_error(model, test)
    result = lp.ProbeResult.concat(results)
    result.meta["model_test_error"] = model_errors
    return result


def plot_moments(result: lp.ProbeResult, out: Path, variant: str) -> list[str]:
    """A bar chart of the error per layer for each moment (its legend beside the axes, where it cannot cover the
    deep bars near chance), then the timeline (layer x minibatch heatmap, the animation through the moments,
    ``diagnostics.md``); the figures' file names."""
    paths = []
    for step in result.steps:
        fig = plot_error_by_depth(result, step=step,
                                  title=f"deep-mlp ({variant}): probe test error after {step} minibatches")
        fig.axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
        paths.append(save_figure(fig, out / f"errors_step{step}.png"))
    timeline = lp.save_timeline(result, out, split="test")
    return [p.name for p in [*paths, timeline["heatmap"], timeline["animation"]]]


def moment_line(result: lp.ProbeResult, step: int, settings: Settings, n: int) -> str:
    """One moment in words: the input's and the model's own test error with their SEs on ``n`` test images, and
    the mean probe test error of each block of ``settings.aux_every`` layers."""
    errors = result.errors("test", step=step)
    blocks = block_means(errors, block=settings.aux_every, depth=settings.depth)
    return (f"after {step} minibatches: input {with_se(errors['input'], n)}; layers "
            + ", ".join(f"{k} {v:.0%}" for k, v in blocks.items())
            + f"; the model's own test error {with_se(result.meta['model_test_error'][str(step)], n)}")


def findings(result: lp.ProbeResult, settings: Settings, n: int) -> list[str]:
    """Per moment the input, each block of layers and the model's own error; then the ranges the claims are about
    with their standard errors on ``n`` test images, and the diagnostics (kinks, at noise level in so deep a
    stack, are left to ``diagnostics.md``)."""
    depth, skip = settings.depth, settings.skip_to
    lines = [moment_line(result, step, settings, n) for step in result.steps]
    last = result.errors("test")
    lines.append(f"after {result.steps[-1]} minibatches: layers 1-{skip - 1} "
                 f"{with_se(range_mean(last, 1, skip - 1), n)}, {skip}-{depth} "
                 f"{with_se(range_mean(last, skip, depth), n)}, last quarter "
                 f"{with_se(range_mean(last, depth - depth // 4 + 1, depth), n)} (chance {result.chance_error:.1%})")
    diagnosed = lp.diagnose(result, split="test")
    return lines + [f"diagnostics: {f.describe()}" for f in diagnosed if not isinstance(f, Kink)]


def described(settings: Settings, variant: str, splits: dict[str, lp.ArrayDataset],
              moments: list[int]) -> dict[str, object]:
    """The settings section of the summary."""
    extra = {"plain": "", "skip": f"; layer {settings.skip_to} also gets the flattened input (concatenated)",
             "aux": f"; linear heads after every {settings.aux_every} layers, their losses added to the model's"}
    sizes = {k: len(v) for k, v in splits.items()}
    return {"model": f"{settings.depth} x Linear({settings.width}) + LeakyReLU(0.5), Glorot normal, zero bias, "
                     f"linear classifier on top{extra[variant]}",
            "train/valid/test": f"{sizes['train']}/{sizes['valid']}/{sizes['test']}",
            "optimiser": f"centred RMSProp, lr {settings.lr:g}, decay 0.9, momentum 0.9, eps 1e-5 (TF's 1e-10 "
                         f"inside the root); minibatches of {BATCH_SIZE}",
            "probed at minibatches": moments,
            "probed layers": f"the input and every {settings.probe_every} layer(s)",
            "probe train/valid/test samples": f"{min(settings.probe_train, sizes['train'])}/{sizes['valid']}/"
                                              f"{sizes['test']}",
            "l2 path": settings.l2_path, "reported error": "test split",
            "torch threads": torch.get_num_threads()}


def run_notes(settings: Settings, *, variant: str, data: str, n_train: int, moments: list[int], probes: int,
              quick: bool) -> list[str]:
    """The notes, computed from the run: 003's recipe, the epochs the minibatches make on this training set, how
    many probes were fitted on which L2 path, where the heads and the skip sit against 002 and 003, and (skip)
    the moments against the paper's Fig. 8."""
    depth, every, skip = settings.depth, settings.aux_every, settings.skip_to
    return [RECIPE,
            (f"data={data!r} leaves {n_train:,} images for training, so {moments[-1]} minibatches of {BATCH_SIZE} are "
             f"about {moments[-1] * BATCH_SIZE / n_train:.0f} epochs (002 and 003: 60,000 images, 10 epochs)"),
            ("the paper plots the probes' train error; we report test error (train and valid are in results.csv); "
             "probes are exact (L-BFGS to convergence) on a fixed subset of the training images with the L2 chosen "
             f"on valid from the {len(settings.l2_path)}-point path {settings.l2_path}, so that {len(moments)} x "
             f"{probes} probes fit the time budget (sizes under Settings)"),
            (f"aux: heads after layers {every}, {2 * every}, ..., {depth - every} plus the classifier after {depth}, "
             f"one loss every {every} layers as 002 describes (003's code puts them after layers 1, {every + 1}, ..., "
             f"{depth - every + 1} and {depth}); skip: the input is concatenated into layer {skip} as 002 describes "
             "(003 adds a projection of it instead)"),
            *([(f"the paper's Fig. 8 shows the skip model after {FIG8_STEP} minibatches; we probe it at {moments}, "
                f"so our last moment is {'later' if moments[-1] > FIG8_STEP else 'earlier'} than the figure's")]
              if variant == "skip" and FIG8_STEP not in moments else []),
            *([(f"quick: the design scaled to {depth} layers of {settings.width} units (see the module docstring), "
                f"lr {settings.lr:g}")] if quick else [])]


def head_notes(result: lp.ProbeResult, settings: Settings, *, n: int, n_train: int) -> list[str]:
    """001 Fig. 4b (probe error beside the model's own) from the run: the last layer's probe reads exactly the
    features the classifier head reads, so the two are linear classifiers on one input and their test errors (rates
    on ``n`` test images) should be close. Judged at the last moment, two SEs of the difference; what a gap means
    depends on its side. No note when the last layer was not probed."""
    last = f"layer{settings.depth}"
    moments = [s for s in result.steps if last in result.errors("test", step=s)]
    if not moments:
        return []
    probe = {s: result.errors("test", step=s)[last] for s in moments}
    model = {s: result.meta["model_test_error"][str(s)] for s in moments}
    step = moments[-1]
    p, m = probe[step], model[step]
    margin = 2 * math.hypot(standard_error(p, n), standard_error(m, n))
    meaning = {
        0: ("they agree within 2 SE: the head the model trained by SGD reads its last layer about as well as a linear "
            "read-out refitted to convergence (convex, its L2 chosen on valid) can, so it is near its optimum"),
        -1: ("the probe is below the model beyond 2 SE: refitted to convergence (convex, its L2 chosen on valid), it "
             "reads the last layer better than the head trained by SGD, so the head is not at its optimum and the "
             "model's error overstates what its last layer holds"),
        1: (f"the probe is above the model beyond 2 SE: it trained on {min(settings.probe_train, n_train):,} of the "
            f"{n_train:,} training images with its L2 from a {len(settings.l2_path)}-point path, the head on all of "
            "them, so the gap measures the probe's handicap rather than the layer or the head"),
    }[compare(m, p, n)]
    return [(f"001 Fig. 4b (probe error beside the model's own): {last}'s probe sees exactly the input of the model's "
             f"classifier head; after {step} minibatches its test error is {with_se(p, n)} against the model's "
             f"{with_se(m, n)} (difference {100 * (p - m):+.1f} points, 2 SE of it {100 * margin:.1f}, unpaired and "
             f"so conservative: both are scored on the same {n:,} images): {meaning}; probe minus model per moment: "
             + ", ".join(f"{s}: {100 * (probe[s] - model[s]):+.1f}" for s in moments) + " points")]


def run(out: Path, *, quick: bool = False, data: str = "mnist", seed: int = 0, progress: bool = True,
        variant: str = "plain", steps: list[int] | None = None) -> Summary:
    """Train the deep MLP ``variant`` with RMSProp, probing the input and its layers at each of ``steps``."""
    if variant not in DEEP_MLP_VARIANTS:
        raise ValueError(f"variant must be one of {DEEP_MLP_VARIANTS}, got {variant!r}")
    settings = QUICK if quick else FULL
    moments = sorted(set(steps if steps is not None else settings.steps))
    splits = lp.standard_splits(data, seed=seed)
    train = splits["train"]
    model = make_model(variant, settings, train, seed=seed)
    result = train_and_probe(model, splits, settings, moments=moments, cache=out / "cache", seed=seed,
                             progress=progress)
    result.save(out)
    figures = plot_moments(result, out, variant)
    n = len(splits["test"])
    judged = checks(variant, result.errors("test", step=moments[0]), result.errors("test"),
                    result.meta["model_test_error"][str(moments[-1])], chance=result.chance_error, n=n,
                    settings=settings)
    notes = run_notes(settings, variant=variant, data=data, n_train=len(train), moments=moments,
                      probes=len(result.names), quick=quick) + head_notes(result, settings, n=n, n_train=len(train))
    return Summary(f"deep-mlp ({variant})", CLAIMS[variant], findings(result, settings, n), judged,
                   settings={"data": data, "variant": variant, **described(settings, variant, splits, moments),
                             "seed": seed},
                   figures=figures, tables=[result.table(step, markdown=True) for step in moments], notes=notes)
