"""The documentation's code blocks run as pasted."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/transformers.md", "docs/vision.md"]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page, index", [pytest.param(p, i, marks=[pytest.mark.slow] if p == "README.md" else [])
                                         for p in PAGES for i in range(len(_blocks(p)))])
def test_code_block_runs_as_pasted(page, index, capsys, tmp_path, monkeypatch):
    if "transformers" in _blocks(page)[index]:
        pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(ROOT))  # `benchmarks` stays importable from the temporary folder
    monkeypatch.chdir(tmp_path)  # files a block writes (runs/...) go there
    exec(compile(_blocks(page)[index], f"{page}[{index}]", "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip()  # every block prints what it found
