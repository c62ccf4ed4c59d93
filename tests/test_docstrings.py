"""Docstrings with math survive Python's string escapes (write them as raw strings: r\"\"\"...\"\"\").

In a plain string ``\\top`` is a tab followed by "op" and ``\\arg`` a bell character followed by "rg": the rendered
formula is silently wrong.  Escapes Python does not know (``\\mid``, ``\\log``) still work but warn at compile time
(SyntaxWarning from Python 3.12).
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p for folder in ("pyro_vmm", "models", "benchmarks") for p in (ROOT / folder).rglob("*.py")
)
#: characters that a backslash sequence of a LaTeX command turns into (\a, \b, \f, \v, \t: \alpha, \beta, \frac, ...)
CONTROL = {"\a": r"\a", "\b": r"\b", "\f": r"\f", "\v": r"\v", "\t": r"\t"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_string_escapes_eaten_by_math(path: Path):
    source = path.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # invalid escape sequences: DeprecationWarning (3.11) / SyntaxWarning (3.12)
        tree = ast.parse(source, filename=str(path))
    bad = [
        (node.lineno, sorted(CONTROL[c] for c in CONTROL if c in node.value))
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and any(c in node.value for c in CONTROL)
    ]
    assert not bad, f"{path.name}: strings with escape characters (make them raw strings) at lines {bad}"


def test_the_check_catches_a_plain_math_docstring():
    tree = ast.parse('def f():\n    """:math:`x^\\top y`"""\n')
    doc = ast.get_docstring(tree.body[0], clean=False)
    assert "\t" in doc
    raw = ast.parse('def f():\n    r""":math:`x^\\top y`"""\n')
    assert "\t" not in ast.get_docstring(raw.body[0], clean=False)
