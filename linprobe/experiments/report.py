"""Experiment summaries: our numbers beside the paper's claim, as markdown."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from linprobe.atomic import atomic_write_text


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
        for t in self.tables:
            lines += ["", "```", t, "```"]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> Path:
        """Write ``summary.md`` atomically into ``out``."""
        atomic_write_text(out / "summary.md", self.markdown())
        return out / "summary.md"
