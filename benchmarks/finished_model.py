"""A finished model, every layer: wall time from a trained model and its data to the per-layer table.

* ``linprobe``: ``lp.probe`` (extract once into the cache, L-BFGS over the L2 path chosen on valid);
* ``sklearn (a)``: the CLIP-style recipe, features extracted once into memory, then per layer
  ``StandardScaler`` and ``LogisticRegression(lbfgs)`` along the same L2 path (strong to weak, warm
  start, the same tolerance, iteration cap, early stop and choice on valid);
* ``loop per probe (b)``: one training loop per probe (``OnlineProbes`` on that layer alone), each doing
  its own forward passes; for many layers it runs on an evenly spaced subset and its time is scaled up.

Forward passes are counted by a hook on the model (one per batch).
"""
from __future__ import annotations

import math
import tempfile
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

import linprobe as lp
from benchmarks.fixtures import Case, convnet, fashion, mlp
from benchmarks.timing import Row, seconds
from linprobe.capture.reduce import Standardizer, resolve_reductions
from linprobe.data.inputs import Split
from linprobe.fit.solvers import DEFAULT_L2_PATH, sklearn_C

TOL, PATIENCE = 1e-5, 2


class ForwardCounter:
    """Counts the model's forward calls (batches) through a pre-hook."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self._handle = model.register_forward_pre_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def ours(case: Case, l2_path: tuple[float, ...], max_iter: int) -> dict[str, tuple[float, float]]:
    """``lp.probe`` on a fresh cache: each layer's (valid, test) error."""
    with tempfile.TemporaryDirectory() as tmp:
        result = lp.probe(case.model, case.splits["train"], case.splits["valid"], case.splits["test"],
                          layers=case.layers, cache_dir=tmp, l2_path=l2_path, max_iter=max_iter, patience=PATIENCE,
                          progress=False, plot=False)
    valid, test = result.errors("valid"), result.errors("test")
    return {layer: (valid[layer], test[layer]) for layer in valid}


@torch.no_grad()
def extract_in_memory(case: Case) -> dict[str, dict[str, np.ndarray]]:
    """The recipe's extraction: hooks, one forward per batch, reduced features gathered in RAM (split -> layer)."""
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    with lp.Taps(case.model, case.layers) as taps:
        for split, data in case.splits.items():
            parts = out[split] = {n: [] for n in case.layers}
            for batch in Split.of(data).batches(256):
                features = taps.run(batch)
                if not taps.reductions:  # the first (discovering) forward: choose reductions; later hooks apply them
                    taps.reductions = resolve_reductions("auto", {n: tuple(h.shape[1:]) for n, h in features.items()},
                                                         layouts=taps.plan.layouts)
                    features = {n: taps.reductions[n](h) for n, h in features.items()}
                for n, f in features.items():
                    parts[n].append(f.numpy())
    return {s: {n: np.concatenate(f) for n, f in parts.items()} for s, parts in out.items()}


def sklearn_path(x: dict[str, np.ndarray], y: dict[str, np.ndarray], l2_path: tuple[float, ...],
                 max_iter: int, scaler: str = "sklearn") -> tuple[float, float]:
    """scikit-learn along the L2 path on one layer's raw features (train/valid/test): standardised (``"sklearn"``:
    ``StandardScaler``; ``"linprobe"``: linprobe's ``Standardizer``, which floors tiny scales at 1% of the layer's
    RMS: the very features linprobe's solver sees), then ``LogisticRegression(lbfgs)`` strong to weak with warm
    start, the same tolerance, early stop and choice on valid as linprobe; the chosen probe's (valid, test) error."""
    if scaler == "sklearn":
        fitted = StandardScaler().fit(x["train"])
        x = {s: fitted.transform(f) for s, f in x.items()}
    else:
        std = Standardizer.fit([x["train"]])
        x = {s: std(torch.from_numpy(f)).double().numpy() for s, f in x.items()}
    clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, tol=TOL, warm_start=True)
    best, best_weights, last_ce, rises = None, None, math.inf, 0
    for l2 in sorted(l2_path, reverse=True):
        clf.set_params(C=sklearn_C(l2, len(y["train"])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x["train"], y["train"])
        p = clf.predict_proba(x["valid"])
        err = float((p.argmax(1) != y["valid"]).mean())
        ce = float(-np.log(np.maximum(p[np.arange(len(p)), y["valid"]], 1e-12)).mean())
        if best is None or (err, ce, -l2) < best:
            best, best_weights = (err, ce, -l2), (clf.coef_.copy(), clf.intercept_.copy())
        rises = rises + 1 if ce > last_ce else 0
        last_ce = ce
        if rises >= PATIENCE:
            break
    coef, intercept = best_weights
    test = float(((x["test"] @ coef.T + intercept).argmax(1) != y["test"]).mean())
    return best[0], test


def sklearn_layers(case: Case, feats: dict[str, dict[str, np.ndarray]], l2_path: tuple[float, ...], max_iter: int,
                   scaler: str = "sklearn") -> dict[str, tuple[float, float]]:
    """scikit-learn per layer along the L2 path on extracted features: each layer's (valid, test) error."""
    y = {s: d.y.numpy() for s, d in case.splits.items()}
    return {layer: sklearn_path({s: f[layer] for s, f in feats.items()}, y, l2_path, max_iter, scaler)
            for layer in case.layers}


def quality(ours_: dict[str, tuple[float, float]], ref: dict[str, tuple[float, float]], n_valid: int,
            label: str, name: str) -> list[Row]:
    """The equal-quality targets against a reference: valid error within max(0.3 pp, one valid sample) on >= 95% of
    layers, mean absolute test gap <= 0.2 pp, and the mean signed test gap (no systematic sign)."""
    band = max(0.003, 1.0 / n_valid)
    close = [abs(ours_[n][0] - ref[n][0]) <= band + 1e-9 for n in ref]
    test_gaps = [(ours_[n][1] - ref[n][1]) * 100 for n in ref]
    share = sum(close) / len(close)
    mean_abs = float(np.mean(np.abs(test_gaps)))
    signed = float(np.mean(test_gaps))
    return [Row("2 finished", label, f"linprobe vs {name}: layers with valid error within {band:.2%}", share * 100,
                "%", share / 0.95, "95%", ">= 95% of layers", share >= 0.95),
            Row("2 finished", label, f"linprobe vs {name}: mean absolute test-error gap", mean_abs, "pp",
                mean_abs / 0.2, "0.2 pp", "<= 0.2 pp", mean_abs <= 0.2),
            Row("2 finished", label, f"linprobe vs {name}: mean signed test-error gap", signed, "pp", 0.0, "")]


def loop_per_probe(case: Case, layers: list[str], epochs: int) -> dict[str, float]:
    """One training loop per probe, each with its own forwards over train (``epochs``), then valid: valid errors."""
    errors = {}
    for layer in layers:
        with lp.OnlineProbes(case.model, [layer], num_classes=10) as probes, torch.no_grad():
            for _ in range(epochs):
                for batch in Split.of(case.splits["train"]).batches(case.batch_size):
                    case.model(batch.inputs)
                    probes.step(batch.labels)
            errors[layer] = probes.evaluate(case.splits["valid"]).errors("valid")[layer]
    return errors


def measure(case: Case, l2_path: tuple[float, ...], max_iter: int, loop_layers: int, epochs: int,
            speedup: float, converged_iter: int) -> tuple[list[Row], str]:
    """Time and forward passes of every contender on one case, and the equal-quality targets against a converged
    reference (scikit-learn with ``converged_iter`` iterations on linprobe's standardised features, untimed: the
    solver's gap) and against (a) (its own ``StandardScaler``: the gap a user of the recipe sees)."""
    label = f"{case.name} ({len(case.layers)} taps, N={len(case.splits['train'])})"
    subset = case.layers[::max(1, math.ceil(len(case.layers) / loop_layers))]
    b_name = "loop per probe (b)" + ("" if len(subset) == len(case.layers) else f", {len(subset)} layers, scaled")
    feats: dict[str, dict[str, np.ndarray]] = {}  # (a)'s extraction, kept for the untimed converged reference

    def recipe() -> dict[str, tuple[float, float]]:
        """(a): extract once, then scikit-learn per layer."""
        feats.update(extract_in_memory(case))
        return sklearn_layers(case, feats, l2_path, max_iter)

    runs = {}
    for name, fn in (("linprobe", lambda: ours(case, l2_path, max_iter)),
                     ("sklearn (a)", recipe),
                     (b_name, lambda: {n: (e, math.nan) for n, e in loop_per_probe(case, subset, epochs).items()})):
        counter = ForwardCounter(case.model)
        errors, t = seconds(fn)
        counter.close()
        scale = len(case.layers) / len(errors)  # (b) on a subset of layers: time and forwards scaled up
        runs[name] = (errors, t * scale, counter.calls * scale)
    (ours_err, ours_t, ours_fwd), (ref_err, ref_t, _), (b_err, b_t, b_fwd) = runs.values()
    converged = sklearn_layers(case, feats, l2_path, converged_iter, scaler="linprobe")  # the solver's gap
    b_gap = max(b_err[n][0] - ref_err[n][0] for n in b_err) * 100
    n_valid = len(case.splits["valid"])
    rows = [Row("2 finished", label, "linprobe", ours_t, "s", ours_t / ref_t, "(a)'s time",
                f">= {speedup:g}x faster than (a)", ref_t / ours_t >= speedup),
            Row("2 finished", label, "sklearn (a)", ref_t, "s", 1.0, "(a)'s time"),
            Row("2 finished", label, b_name, b_t, "s", b_t / ref_t, "(a)'s time"),
            *quality(ours_err, converged, n_valid, label, f"converged sklearn on the same features (max_iter={converged_iter})"),
            *quality(ours_err, ref_err, n_valid, label, "(a)"),
            Row("2 finished", label, f"(b), {epochs} epochs: largest valid-error excess over (a)", b_gap, "pp",
                b_gap / 0.3, "0.3 pp"),
            Row("2 finished", label, "linprobe: forward passes", ours_fwd, "batches", ours_fwd / b_fwd, "(b)'s",
                f"<= 1/{len(case.layers)} of (b)", ours_fwd * len(case.layers) <= b_fwd)]
    errors = {"linprobe": ours_err, "sklearn (a)": ref_err, "sklearn converged": converged, b_name: b_err}
    return rows, f"Valid top-1 error per layer, {label}:\n\n" + layer_table(case, errors)


def layer_table(case: Case, errors: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Each layer's valid error per contender, as Markdown."""
    names = list(errors)
    lines = ["| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {layer} | " + " | ".join(f"{errors[c][layer][0]:.2%}" if layer in errors[c] else "" for c in names)
              + " |" for layer in case.layers]
    return "\n".join(lines)


def run(quick: bool) -> tuple[list[Row], str]:
    if quick:
        cases = [(convnet(fashion(200, 100, 100), train_steps=5), 3.0), (mlp(depth=8, limit=200, train_steps=5), 10.0)]
        settings = dict(l2_path=(1e-1, 1e-2), max_iter=30, loop_layers=2, epochs=1, converged_iter=100)
    else:
        cases = [(convnet(fashion(2000, 1000, 1000), train_steps=600), 3.0), (mlp(limit=2000, train_steps=300), 10.0)]
        settings = dict(l2_path=DEFAULT_L2_PATH, max_iter=500, loop_layers=10, epochs=2, converged_iter=5000)
    rows, details = [], []
    for case, speedup in cases:
        r, d = measure(case, speedup=speedup, **settings)
        rows += r
        details.append(d)
    return rows, "\n\n".join(details)
