"""Fashion-MNIST pixels: one wide, hard probe on 50,000 samples, the L2 path chosen on 10,000 valid images.

``linprobe`` is ``lp.probe`` on the pixels (``layers="input"``: extraction, cache, standardisation, the whole path
and the test evaluation); the reference is the scikit-learn recipe of ``finished_model`` on the same pixels and path
(``StandardScaler`` + ``LogisticRegression(lbfgs)``, the same tolerance, iteration cap, early stop and choice on
valid). Targets: linprobe within 90 s with its chosen probe converged, and its test error within 0.3 pp of
scikit-learn's. Split: 50,000 train and 10,000 valid drawn stratified (seed 0) from the 60,000 training images; test
is the shipped 10,000.
"""
from __future__ import annotations

import tempfile

from torch import nn

import linprobe as lp
from benchmarks.finished_model import PATIENCE, sklearn_path
from benchmarks.timing import Row, seconds
from linprobe.data.datasets import stratified_split
from linprobe.fit.solvers import DEFAULT_L2_PATH


def splits(train: int, valid: int, test: int) -> dict[str, lp.ArrayDataset]:
    """Seeded stratified train/valid from Fashion-MNIST's training images, test from its test images."""
    parts = lp.load_dataset("fashion-mnist")
    tr, va = stratified_split(parts["train"], [train, valid], seed=0)
    te = parts["test"] if test >= len(parts["test"]) else stratified_split(parts["test"], [test], seed=0)[0]
    return {"train": tr, "valid": va, "test": te}


def ours(data: dict[str, lp.ArrayDataset], max_iter: int) -> lp.ProbeResult:
    with tempfile.TemporaryDirectory() as tmp:
        return lp.probe(nn.Flatten(), data["train"], data["valid"], data["test"], layers="input", cache_dir=tmp,
                        max_iter=max_iter, patience=PATIENCE, progress=False, plot=False)


def run(quick: bool) -> tuple[list[Row], str]:
    sizes, max_iter = ((2000, 500, 500), 100) if quick else ((50000, 10000, 10000), 500)
    data = splits(*sizes)
    result, t_ours = seconds(lambda: ours(data, max_iter))
    x = {s: d.x.flatten(1).numpy() for s, d in data.items()}
    y = {s: d.y.numpy() for s, d in data.items()}
    (_, sk_test), t_sk = seconds(lambda: sklearn_path(x, y, DEFAULT_L2_PATH, max_iter))
    test = result.value("input", "test")
    converged = "input" not in result.meta.get("not_converged", {})
    gap = abs(test - sk_test) * 100
    label = f"Fashion-MNIST pixels ({sizes[0]:,}/{sizes[1]:,}/{sizes[2]:,}, D=784)"
    info = result.layers[0]
    rows = [Row("7 pixels", label, f"linprobe (l2={info.l2:g}, chosen probe {'converged' if converged else 'NOT converged'})",
                t_ours, "s", t_ours / t_sk, "sklearn's time", "<= 90 s, converged", t_ours <= 90 and converged),
            Row("7 pixels", label, "sklearn recipe", t_sk, "s", 1.0, "sklearn's time"),
            Row("7 pixels", label, f"linprobe test error {test:.2%} vs sklearn's {sk_test:.2%}", gap, "pp", gap / 0.3,
                "0.3 pp", "<= 0.3 pp", gap <= 0.3)]
    return rows, ""
