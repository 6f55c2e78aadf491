"""Experiment summaries: our numbers beside the paper's claim, checked by rules that can fail, as markdown."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from linprobe.atomic import atomic_write_text
from linprobe.fit.uncertainty import resample_weights
from linprobe.report.diagnose import rank_correlation

SIGNIFICANT = 2.0  # a difference between two errors counts only beyond this many standard errors of it
VERDICTS = ("reproduced", "partly", "not")


def standard_error(p: float, n: int) -> float:
    """The standard error of an error rate ``p`` measured on ``n`` samples: sqrt(p (1 - p) / n)."""
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"an error rate needs 0 <= p <= 1 and n >= 1 samples, got p={p}, n={n}")
    return math.sqrt(p * (1.0 - p) / n)


def with_se(p: float, n: int, *, digits: int = 1) -> str:
    """``p`` as a percentage with its standard error on ``n`` samples beside it in points, e.g. ``"2.8% (SE 0.5)"``;
    an SE too small for ``digits`` decimals keeps one significant digit (``"1.2% (SE 0.03)"``), never a bare 0."""
    se = 100 * standard_error(p, n)
    shown = f"{se:.{digits}f}" if se == 0 or se >= 10 ** -digits else f"{se:.1g}"
    return f"{p:.{digits}%} (SE {shown})"


def compare(a: float, b: float, n: int, *, k: float = SIGNIFICANT) -> int:
    """-1 when error ``b`` is below ``a`` beyond ``k`` standard errors of the difference, 1 when above, else 0.

    Both are rates on ``n`` samples; the difference's standard error is sqrt(se_a^2 + se_b^2), which treats the
    two as independent (conservative for errors measured on the same samples)."""
    margin = k * math.hypot(standard_error(a, n), standard_error(b, n))
    return 0 if abs(b - a) <= margin else (1 if b > a else -1)


def significant_steps(errors: dict[str, float], n: int, *, direction: int = 1,
                      k: float = SIGNIFICANT) -> list[tuple[str, str, float]]:
    """Every step ``(a, b, change)`` along ``errors`` (in depth order) where the error rises (``direction`` 1)
    or falls (-1) beyond ``k`` standard errors of the difference, each error a rate on ``n`` samples."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be 1 (rises) or -1 (falls), got {direction!r}")
    names, values = list(errors), list(errors.values())
    return [(a, b, eb - ea) for a, b, ea, eb in zip(names, names[1:], values, values[1:])
            if compare(ea, eb, n, k=k) == direction]


def listed(steps: Sequence[tuple[str, str, float]]) -> str:
    """Steps from :func:`significant_steps` as text, ``"none"`` when there are none."""
    return ", ".join(f"{a}->{b} ({d:+.1%})" for a, b, d in steps) or "none"


@dataclass(frozen=True)
class Check:
    """One claim of the paper tested on our numbers: whether it held and the numbers (with SEs) that say so.

    ``core`` marks the experiment's headline claim: if it fails the verdict is "not"."""

    claim: str
    passed: bool
    evidence: str
    core: bool = False
    seeds: tuple[int, int] | None = None
    """Over several seeds: (the seeds it held in, the seeds run); ``passed`` then means it held in every seed."""

    def __post_init__(self) -> None:
        if self.seeds is not None:
            held, of = self.seeds
            if not 0 <= held <= of or of < 1 or self.passed != (held == of):
                raise ValueError(f"a check over seeds holds in 0..{of} of {of} >= 1 seeds and passes only in all of "
                                 f"them, got seeds={self.seeds}, passed={self.passed}")

    @property
    def mostly(self) -> bool:
        """Held in every seed, or over several seeds in more than half of them (a single run: ``passed``)."""
        return self.passed or (self.seeds is not None and 2 * self.seeds[0] > self.seeds[1])

    def markdown(self) -> str:
        """One list item: pass/fail (over seeds: in how many), the claim, the evidence."""
        if self.seeds is None:
            state = "holds" if self.passed else "FAILS"
        else:
            held, of = self.seeds
            state = (f"holds in every seed ({of} of {of})" if self.passed else
                     f"FAILS in every seed (0 of {of})" if held == 0 else f"holds in {held} of {of} seeds")
        return f"{state}{' (core)' if self.core else ''}: {self.claim} -- {self.evidence}"


def verdict(checks: Sequence[Check]) -> str:
    """"reproduced" when every check holds, "not" when a core check fails, otherwise "partly".

    Over several seeds a check holds when it holds in every seed, and a core check counts as failed only when it
    holds in at most half of them: in most seeds it makes the verdict "partly", in none (or too few) "not"."""
    if not checks or not any(c.core for c in checks):
        raise ValueError("a verdict needs at least one check marked core (the experiment's headline claim)")
    if all(c.passed for c in checks):
        return "reproduced"
    return "not" if any(c.core and not c.mostly for c in checks) else "partly"


@dataclass(frozen=True)
class HeadRefit:
    """001 Fig. 4b's comparison: a probe on exactly the features the model's head sees (``point``) against the
    model's own error, both rates on the same ``n`` samples of ``split``.

    The probe is a convex refit of the head (softmax regression, L2 chosen on valid, on ``probe_train`` samples);
    the head itself was trained by SGD together with the network (on ``model_train`` samples). Level means the
    head is about as good a linear classifier of its input as the refit; a probe clearly below the model means the
    head is not at its optimum; clearly above, the refit is held back by its L2 or its sample size."""

    point: str
    split: str
    probe: float
    model: float
    n: int
    probe_train: int
    model_train: int

    @property
    def side(self) -> int:
        """-1 when the probe is below the model's error beyond two SEs of the difference, 1 above, 0 level."""
        return compare(self.model, self.probe, self.n)

    def discussion(self) -> str:
        """The comparison with SEs, whether they agree within two SEs, and what the gap means."""
        margin = SIGNIFICANT * math.hypot(standard_error(self.probe, self.n), standard_error(self.model, self.n))
        samples = (f"the same {self.model_train:,} training samples as the model" if self.probe_train >= self.model_train
                   else f"{self.probe_train:,} training samples against the model's {self.model_train:,}")
        meaning = {
            0: ("level within 2 SE: the head, trained by SGD with the network, is about as good a linear classifier "
                "of its own input as the convex refit, as Fig. 4b shows for the last probe"),
            -1: ("the probe is clearly below the model: the head is not at its optimum on the features it sees (SGD "
                 "with the network, its regularisation and schedule, stopped short of the convex optimum); refitting "
                 "the head alone would lower the model's error"),
            1: ("the probe is clearly above the model: the refit is held back by its L2 (the path's choice on "
                "valid) or its training samples, not by the features, on which the head does better")}[self.side]
        return (f"Fig. 4b, the probe at the head's input ({self.point}) against the model itself on {self.split}: "
                f"probe {with_se(self.probe, self.n)}, model {with_se(self.model, self.n)}, gap "
                f"{self.probe - self.model:+.1%} (2 SE of the gap {margin:.1%}); {meaning}; the probe is a convex "
                f"refit with L2 chosen on valid on {samples}, the head was trained by SGD with the network")


@dataclass(frozen=True)
class Headline:
    """The numbers of one run that several seeds combine: probe error per layer on ``split``, one curve per label
    (e.g. untrained, trained), each a rate on ``n`` samples; the chance error; the model's own error on ``split``
    (None: not measured); the Fig. 4b comparison (None: none)."""

    split: str
    n: int
    chance: float
    curves: dict[str, dict[str, float]]
    model_error: float | None = None
    head: HeadRefit | None = None


@dataclass
class Summary:
    """What an experiment claims, what we measured, and the checks that judge whether they agree (none: nothing
    is measured, the verdict is left to the notes)."""

    name: str
    claim: str
    findings: list[str]
    checks: list[Check]
    settings: dict[str, object] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    headline: Headline | None = None
    """What a run over several seeds combines (:mod:`linprobe.experiments.seeds`); None: it cannot combine."""

    @property
    def verdict(self) -> str | None:
        """The checks' verdict (see :func:`verdict`), None when there are no checks."""
        return verdict(self.checks) if self.checks else None

    def markdown(self) -> str:
        """The summary page: claim, verdict and its checks, findings, notes, settings, figures, tables."""
        words = {"reproduced": "reproduced", "partly": "partly reproduced", "not": "not reproduced",
                 None: "see notes"}[self.verdict]
        lines = [f"# {self.name}", "", f"**Paper:** {self.claim}", "", f"**Verdict:** {words}", ""]
        if self.checks:
            lines += ["## Checks", "", (f"Reproduced when every check holds, not when a core check fails, partly "
                      f"otherwise; a difference counts only beyond {SIGNIFICANT:g} standard errors (SE of an error "
                      "p on n samples: sqrt(p(1-p)/n))."
                      + (" Over several seeds a check holds when it holds in every seed; a core check holding in at "
                         "most half of them gives not." if any(c.seeds for c in self.checks) else "")),
                      "", *[f"- {c.markdown()}" for c in self.checks], ""]
        lines += ["## Our numbers", "", *[f"- {f}" for f in self.findings], ""]
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        lines += ["## Settings", "", *[f"- {k}: {v}" for k, v in self.settings.items()],
                  f"- wall time: {self.seconds:.0f} s", ""]
        lines += [f"![{f}]({f})" for f in self.figures]
        for t in self.tables:  # markdown tables as they are, fixed-width text in a code block
            lines += ["", t] if t.startswith("|") else ["", "```", t, "```"]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> Path:
        """Write ``summary.md`` atomically into ``out``."""
        atomic_write_text(out / "summary.md", self.markdown())
        return out / "summary.md"


def depth_trend(errors: dict[str, float], n: int) -> tuple[float, list[tuple[str, str, float]]]:
    """Spearman correlation of error with position (-1: strictly falling) and every rise beyond two SEs on ``n``."""
    rho = float(rank_correlation(torch.tensor(list(errors.values()), dtype=torch.float64),
                                 torch.arange(len(errors), dtype=torch.float64)))
    return rho, significant_steps(errors, n)


TREND_LEVEL = 0.95  # the depth trend's bootstrap interval covers this much
TREND_SAMPLES = 1000  # bootstrap replicates of the evaluated samples behind that interval


def depth_trend_interval(wrong: np.ndarray, *, level: float = TREND_LEVEL, samples: int = TREND_SAMPLES,
                         seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the Spearman correlation of error with depth (see :func:`depth_trend`).

    ``wrong`` is ``(n, L)``: whether each of L probes (in depth order) got each of the same n evaluated samples
    wrong. Each replicate resamples the n samples (rows) with replacement, so all L errors move together as they
    do on one evaluation set, and ranks the L errors (ties averaged). The interval says how far the trend could
    move on another draw of n samples; it says nothing about the training run's own randomness (one seed)."""
    wrong = np.asarray(wrong, dtype=np.float64)
    if wrong.ndim != 2 or wrong.shape[0] < 1 or wrong.shape[1] < 3:
        raise ValueError(f"wrong must be (n samples, at least 3 probes), got shape {wrong.shape}")
    depth = torch.arange(wrong.shape[1], dtype=torch.float64)
    rhos = []
    for weights in resample_weights(wrong.shape[0], samples, seed=seed):
        errors = weights.double() @ torch.from_numpy(wrong)  # (b, L) wrong counts: the same resample for every probe
        rhos.append(rank_correlation(errors, depth).numpy())
    found = np.concatenate(rhos)
    found = found[np.isfinite(found)]  # a replicate with every error tied has no rank correlation
    if not found.size:
        return math.nan, math.nan
    lo, hi = np.quantile(found, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def trend_text(rho: float, interval: tuple[float, float], *, level: float = TREND_LEVEL) -> str:
    """A Spearman correlation with its interval, e.g. ``"-0.97 (95% -0.99 to -0.93)"``."""
    return f"{rho:.2f} ({level:.0%} {interval[0]:.2f} to {interval[1]:.2f})"


def difference_with_se(a: float, b: float, n: int) -> str:
    """``a - b`` of two error rates on ``n`` samples in points with the SE of the difference (as :func:`compare`
    takes it: independent), e.g. ``"-1.2% (SE 0.6)"``."""
    se = 100 * math.hypot(standard_error(a, n), standard_error(b, n))
    return f"{a - b:+.1%} (SE {se:.1f})"


def summary_settings(path: Path) -> dict[str, str]:
    """The ``## Settings`` list of a ``summary.md`` that :meth:`Summary.markdown` wrote, as text, wall time
    included: what another experiment's committed run says it used, for a summary that builds on its numbers."""
    lines = path.read_text().splitlines()
    if "## Settings" not in lines:
        raise ValueError(f"{path} has no '## Settings' section: not a summary.md that Summary.markdown wrote")
    found: dict[str, str] = {}
    for line in lines[lines.index("## Settings") + 1:]:
        if line.startswith(("## ", "![", "|")):
            break
        if line.startswith("- ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            found[key] = value
    return found
