"""The documentation reads offline: no formula needs MathJax from a CDN.

Sphinx renders math with MathJax, which it loads from a CDN on every page that holds math;
offline, a formula then shows as raw LaTeX. Formulas are plain text instead. ``make docs``
fails on a page that loads anything from the network (``_check_offline`` in docs/conf.py);
here ``make test`` finds math markup in what the site is built from, and checks that check.
"""

from __future__ import annotations

import ast
import re
import runpy
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The math directive and role (reST and MyST), and LaTeX's display and inline delimiters.
MATH = re.compile(r"\.\. math::|:math:`|\{math\}|\$\$|\\\[|\\\(")


def _docstrings(path: Path) -> list[str]:
    """The docstrings of a module and of its classes and functions: what autodoc renders."""
    tree = ast.parse(path.read_text())
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    return [doc for n in nodes if (doc := ast.get_docstring(n, clean=False))]


def test_no_page_or_docstring_holds_math_markup():
    found = [
        str(page.relative_to(REPO))
        for page in (REPO / "docs").rglob("*.md")
        if MATH.search(page.read_text())
    ]
    for package in ("jaxnorm", "torch_compat"):
        for module in (REPO / package).rglob("*.py"):
            found += [
                f"{module.relative_to(REPO)}: {m.group()}"
                for doc in _docstrings(module)
                if (m := MATH.search(doc))
            ]
    assert not found, "write formulas as plain text (a literal block): " + ", ".join(found)


def test_negative_control_math_markup_is_found(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('def f():\n    r"""Doc.\n\n    .. math::\n\n      \\frac{x}{y}\n    """\n')
    (doc,) = _docstrings(module)
    assert MATH.search(doc)


def test_the_docs_build_fails_on_a_page_that_loads_from_the_network(tmp_path):
    pytest.importorskip("sphinx", reason="the docs build needs the docs extra")
    from sphinx.errors import ExtensionError

    conf = runpy.run_path(str(REPO / "docs" / "conf.py"))
    app = types.SimpleNamespace(builder=types.SimpleNamespace(format="html"), outdir=tmp_path)
    (tmp_path / "api.html").write_text('<script src="_static/local.js"></script>')
    conf["_check_offline"](app, None)  # local files pass
    (tmp_path / "api.html").write_text(
        '<script defer="defer" src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js">'
    )
    with pytest.raises(ExtensionError, match=r"api\.html"):
        conf["_check_offline"](app, None)
