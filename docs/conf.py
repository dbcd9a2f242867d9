"""Sphinx configuration of jaxnorm's documentation: ``make docs`` builds it into docs/_build.

Pages are MyST Markdown; the API reference is generated from the docstrings (Google style,
through napoleon). Nothing here reaches the network: no intersphinx, and a build fails if
a page would load anything from it (``_check_offline``), as MathJax does.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
# autodoc imports the packages: one CPU device is all it needs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jaxnorm  # noqa: E402

project = "jaxnorm"
author = "the jaxnorm authors"
copyright = "the jaxnorm authors"  # noqa: A001 - Sphinx's name
release = version = jaxnorm.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# docs/_generated/*.md are written by `python -m benchmarks` and included by performance.md.
exclude_patterns = ["_build", "_generated/*.md", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
# Types go with each parameter's description, where long ones read better than in the
# signature. These aliases keep their names (an alias used in a union would not: Sphinx 9
# prints it as a TypeAliasForwardRef).
autodoc_type_aliases = {"StatsMode": "StatsMode", "NonFinitePolicy": "NonFinitePolicy"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" as fields of the class description: an entry of their own would be a second
# description of a dataclass field whenever autodoc lists the class's members.
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"jaxnorm {release}"
html_static_path = ["_static"]

# -- generated files that a build may not have yet -------------------------------------
# `python -m benchmarks` writes the plot and the tables; a checkout without them (or without
# the plot, on a machine without matplotlib) still builds, with a note in their place.
GENERATED = {
    "_generated/benchmark-ratios.png": re.compile(
        r"^:::\{figure\} _generated/benchmark-ratios\.png\n.*?^:::\n", re.M | re.S
    ),
    "_generated/benchmarks.md": re.compile(
        r"^```\{include\} _generated/benchmarks\.md\n.*?^```\n", re.M | re.S
    ),
    "_generated/headline.md": re.compile(
        r"^```\{include\} _generated/headline\.md\n.*?^```\n", re.M | re.S
    ),
}
MISSING_NOTE = (
    ":::{{note}}\n`docs/{path}` is not in this checkout: `python -m benchmarks` writes it.\n:::\n"
)


def _note_missing_generated(app, docname: str, source: list[str]) -> None:
    for path, block in GENERATED.items():
        if not (DOCS / path).is_file():
            source[0] = block.sub(MISSING_NOTE.format(path=path), source[0])


# The generated tables link files by their path in the repository, which is right in the
# README; from docs/ those links would point nowhere, so they become plain paths there.
_REPO_LINK = re.compile(r"\[([^\]]+)\]\((?!https?://|#)([^)]+)\)")


def _plain_repo_links(app, relative_path, parent_docname, content: list[str]) -> None:
    if Path(relative_path).parts[:1] == ("_generated",):
        content[0] = _REPO_LINK.sub(r"\1 (`\2`)", content[0])


# The site must read offline: no page may load a script, a stylesheet or a font from the
# network (Sphinx adds MathJax from a CDN to any page with math; formulas are plain text).
_REMOTE = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)=[\"']?(?:https?:)?//", re.I)


def _check_offline(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    remote = sorted(
        str(page.relative_to(app.outdir))
        for page in Path(app.outdir).rglob("*.html")
        if _REMOTE.search(page.read_text(encoding="utf-8"))
    )
    if remote:
        from sphinx.errors import ExtensionError

        raise ExtensionError(
            f"pages that load from the network (a CDN script or stylesheet): {remote}. Write "
            "formulas as plain text (a literal block), not with the math directive or role."
        )


def setup(app):
    app.connect("source-read", _note_missing_generated)
    app.connect("include-read", _plain_repo_links)
    app.connect("build-finished", _check_offline)
