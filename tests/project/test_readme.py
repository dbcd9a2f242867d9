"""The README's Python snippets are excerpts of files that run, so they cannot rot unseen.

Each ```python block of README.md follows a marker: ``<!-- excerpt of: PATH -->`` (a file of
this repository, e.g. a script in examples/ that tests/project/test_examples.py runs),
whose lines it must reproduce verbatim, in order; a line ``# ...`` in the block marks lines
left out, and each piece between such lines must be consecutive lines of the file
(indentation relative to the piece's first line). ``<!-- not checked: REASON -->`` marks a
block no test here can run; those are listed below, so that a new one fails until it is
checked or listed.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

# Blocks that `make test` cannot run, by reason.
NOT_CHECKED = {"needs anomalib 1.x": 1, "needs anomalib 2.x": 1}

_BLOCK = re.compile(r"(?:<!-- (excerpt of|not checked): ([^>]+?) -->\n)?```python\n(.*?)```", re.S)


def python_blocks(text: str) -> list[tuple[str | None, str | None, str]]:
    """``[(marker kind, marker value, code), ...]`` for every ```python block of ``text``."""
    return [(m[1], m[2], m[3]) for m in _BLOCK.finditer(text)]


def pieces(code: str) -> list[list[str]]:
    """The block split at ``# ...`` lines, each piece dedented as a whole."""
    out, current = [], []
    for line in code.splitlines():
        if line.strip() == "# ...":
            out.append(current)
            current = []
        else:
            current.append(line)
    out.append(current)
    return [textwrap.dedent("\n".join(p)).splitlines() for p in out if any(s.strip() for s in p)]


def find_excerpt(piece: list[str], lines: list[str], start: int) -> int:
    """Where ``piece`` occurs in ``lines`` at or after ``start`` (dedented alike), else -1."""
    n = len(piece)
    for i in range(start, len(lines) - n + 1):
        if textwrap.dedent("\n".join(lines[i : i + n])).splitlines() == piece:
            return i + n
    return -1


def check_excerpt(code: str, path: Path) -> None:
    lines = path.read_text().splitlines()
    at = 0
    for piece in pieces(code):
        found = find_excerpt(piece, lines, at)
        assert found >= 0, f"not an excerpt of {path.relative_to(REPO)} (in order):\n" + "\n".join(
            piece
        )
        at = found


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_snippets_and_each_is_marked():
    assert len(BLOCKS) >= 3
    unmarked = [code for kind, _, code in BLOCKS if kind is None]
    assert not unmarked, f"README python blocks without a marker: {unmarked}"
    reasons = [value for kind, value, _ in BLOCKS if kind == "not checked"]
    assert {r: reasons.count(r) for r in reasons} == NOT_CHECKED


@pytest.mark.parametrize(
    "path, code",
    [(value, code) for kind, value, code in BLOCKS if kind == "excerpt of"],
    ids=lambda v: v if v.endswith(".py") else "",
)
def test_snippet_is_an_excerpt_of_a_file_that_runs(path, code):
    check_excerpt(code, REPO / path)


def test_negative_control_an_edited_snippet_is_caught():
    kind, path, code = next(b for b in BLOCKS if b[0] == "excerpt of")
    edited = code.replace("(", "( ", 1)
    with pytest.raises(AssertionError, match="not an excerpt"):
        check_excerpt(edited, REPO / path)
    reordered = "\n# ...\n".join(reversed([("\n".join(p)) for p in pieces(code)]))
    if len(pieces(code)) > 1:
        with pytest.raises(AssertionError, match="not an excerpt"):
            check_excerpt(reordered, REPO / path)


def test_every_example_is_excerpted_in_the_readme():
    excerpted = {value for kind, value, _ in BLOCKS if kind == "excerpt of"}
    assert excerpted == {f"examples/{p.name}" for p in (REPO / "examples").glob("*.py")}


def _install_lines(text: str) -> list[str]:
    """The ``pip install -e ...`` lines of the first ```bash block under "## Install"."""
    section = text[text.index("\n## Install\n") :]
    block = section[
        section.index("```bash\n") + 8 : section.index("```", section.index("```bash") + 7)
    ]
    return [" ".join(line.split("#")[0].split()) for line in block.splitlines()]


def test_the_readme_and_the_docs_give_the_same_install_lines():
    # One set of extras in both places: the docs once listed `.[docs]` and the README not.
    readme = _install_lines(README.read_text())
    docs = _install_lines((REPO / "docs" / "getting-started.md").read_text())
    assert readme == docs
    extras = re.findall(r"\[(\w+)\]", " ".join(readme))
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]\n")[1].split("\n[")[0]
    listed = re.findall(r"^(\w+) = \[", section, re.M)
    # every extra a user installs is in both; `test` and `dev` are for developers
    assert sorted(extras) == sorted(set(listed) - {"test", "dev"})
