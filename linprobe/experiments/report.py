"""Experiment summaries: our numbers beside the paper's claim, as markdown."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scipy.stats import spearmanr

from linprobe.atomic import atomic_write_text

RISE = 0.01  # a rise of the probe error larger than this from one layer to the next counts as a kink


@dataclass
class Summary:
    """What an experiment claims, what we measured, and whether they agree."""

    name: str
    claim: str
    findings: list[str]
    agrees: bool | None
    settings: dict[str, object] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        """The summary page: claim, verdict, findings, settings, figures, tables."""
        verdict = {True: "reproduced", False: "not reproduced", None: "see notes"}[self.agrees]
        lines = [f"# {self.name}", "", f"**Paper:** {self.claim}", "", f"**Verdict:** {verdict}", "",
                 "## Our numbers", "", *[f"- {f}" for f in self.findings], ""]
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


def depth_trend(errors: dict[str, float], *, rise: float = RISE) -> tuple[float, list[tuple[str, str, float]]]:
    """Spearman correlation of error with position (-1: strictly falling) and every rise larger than ``rise``."""
    names, values = list(errors), list(errors.values())
    rho = float(spearmanr(range(len(values)), values).statistic)
    rises = [(a, b, eb - ea) for a, b, ea, eb in zip(names, names[1:], values, values[1:]) if eb - ea > rise]
    return rho, rises
