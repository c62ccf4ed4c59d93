"""The README's Python example runs and does what it says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_finds_three_clusters():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})
    assert "utilized clusters: 3" in out.getvalue()


def test_readme_quick_start_commands_are_the_ci_commands():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -n 2 -q" in text and "python -m pytest -n 2 -q" in ci
    assert "pyro-vmm scrna --data ../shared/data/scrna/kang_ifnb_2800.h5ad" in text
